"""The finalize step of TCA-DiT: after ARC, make the quantized model final (RGQ, GPTQ), then keep it.

On fit end, for the ARC module being fit:
1. ``bake``: every learned transform becomes its QuantLinears' fixed (smooth, rotation) buffers;
2. statistics of the FP inputs at ATG's representative timesteps, each weighted by its group's share
   of the trajectory (one forward pass over K x N items, not T x N);
3. RGQ (quant/rgq.py): permute each activation-grouped input by decreasing energy of X T, i.e. the
   diagonal of T^T (X^T X) T, so every group of G channels holds channels of like magnitude;
3b. optionally (``lowrank_rank``), SVDQuant's floating-point low-rank branch (Li et al., ICLR 2025) on the
   baked weights of ``lowrank_roles`` (factors rounded to FP16): the quantized weight carries only the residual,
   the packed checkpoint the branch beside the INT4 codes;
4. GPTQ (methods/gptq.py) on every quantized weight in that basis, against the same ATG-weighted
   Hessian: error feedback for the 4-bit weights, visiting columns in decreasing energy (act-order);
4b. with ``debias_gelu``, each quantized fc1's output noise variance per channel, measured at the same
   representatives and group weights, debiases the GELU after it (quant/debias.py): the quantization
   noise no longer shifts the mean of the hidden units, which the sampler would accumulate;
5. a checkpoint of the finalized module (``checkpoints/finalized.ckpt``), which ``test --ckpt_path``
   evaluates exactly as fit's own evaluation did;
6. the packed checkpoint (``quantized/``: INT4 codes two per byte, FP16 group scales, safetensors + JSON,
   written atomically by :func:`tca_lightning.export.save_quantized`), which ``tca_lightning.load_quantized``
   runs on the integer kernels and ``test --model.init_args.quantized <run_dir>/quantized`` evaluates.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from tca_lightning.data.calibration import collect_linear_stats, collect_output_noise, output_error_per_step
from tca_lightning.export import save_quantized
from tca_lightning.methods.gptq import GPTQ
from tca_lightning.methods.svdquant import apply_svdquant, lowrank_rank
from tca_lightning.quant.debias import gelu_parents, install_debiased_gelu
from tca_lightning.quant.rgq import magnitude_order
from tca_lightning.quant.transforms import fp16_values, transform_gram


PACKED_DIR = "quantized"  # <run_dir>/quantized: the packed checkpoint


class Finalize(L.Callback):
    def __init__(self, rgq: bool = True, gptq: bool = True, percdamp: float = 0.01, save: bool = True,
                 pack: bool = True, lowrank_rank: int = 0, lowrank_roles: list[str] | None = None,
                 debias_gelu: bool = False, stats_steps: str = "representatives", step_weighting: str = "share"):
        """
        Args:
            rgq: reorder channels by calibrated magnitude before group quantization.
            gptq: quantize weights with GPTQ (else round-to-nearest on the recipe's grid).
            percdamp: GPTQ's Hessian dampening (fraction of the mean diagonal).
            save: write ``checkpoints/finalized.ckpt`` in the run directory.
            pack: write the packed INT4 checkpoint ``quantized/`` in the run directory (rank 0).
            lowrank_rank: SVDQuant's low-rank FP branch at this rank for a 1152-wide layer (scaled to the
                layer's width as SVDQuant's ``rank_scale_to_width``: 2 on the 64-wide tiny models); 0: the branch
                ARC learned with (``arc.lowrank_rank``/``arc.lowrank_roles``) if any, else none.
            lowrank_roles: the roles that get it (None: every quantized weight inside and outside the blocks).
            debias_gelu: subtract the mean shift fc1's quantization noise causes through its GELU (step 4b).
            stats_steps: the timesteps whose statistics RGQ, GPTQ and the debias read: ``representatives``
                (ATG's K, group-weighted) or ``all`` (every calibration step, one forward pass each: cheap
                next to ARC, which ATG's selection is for).
            step_weighting: how those steps weigh in the statistics: ``share`` (each group's share of the
                trajectory; all steps equally) or ``output_error`` (that times the baked model's relative output
                error at the step, measured before RGQ and GPTQ: the late, low-noise steps, where 4-bit
                activations cost the most and where the images' fine detail is made, weigh more).
        """
        if step_weighting not in ("share", "output_error"):
            raise ValueError(f"step_weighting must be 'share' or 'output_error', got {step_weighting!r}")
        if stats_steps not in ("representatives", "all"):
            raise ValueError(f"stats_steps must be 'representatives' or 'all', got {stats_steps!r}")
        if lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be >= 0 (0: no low-rank branch), got {lowrank_rank}")
        self.rgq, self.gptq, self.percdamp, self.save, self.pack = rgq, gptq, percdamp, save, pack
        self.lowrank_rank, self.lowrank_roles, self.debias_gelu = lowrank_rank, lowrank_roles, debias_gelu
        self.stats_steps, self.step_weighting = stats_steps, step_weighting

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not hasattr(module, "bake") or getattr(module, "finalized", False):
            return
        start = time.perf_counter()
        module.bake()
        batch = trainer.datamodule.hparams.calib_batch_size * 2
        traj = weights = None
        weighted = {}  # the measured step weights, for metrics.json
        if self.rgq or self.gptq or self.debias_gelu:  # the steps (and weights) the statistics read
            traj, weights = statistics_steps(trainer.datamodule, self.stats_steps)
            if self.step_weighting == "output_error":
                weights = error_weighted(module, traj, weights, batch)
                weighted = {"stats_step_weights": [round(float(w), 4) for w in weights]}
        if self.rgq or self.gptq:
            stats = self.gram_stats(module, traj, weights, batch)
            if self.rgq:
                reorder_groups(module.qlinears, stats)
        rank, roles = self.lowrank_rank, self.lowrank_roles
        if not rank and getattr(getattr(module, "arc", None), "lowrank_rank", 0):
            rank, roles = module.arc.lowrank_rank, module.arc.lowrank_roles  # the branch ARC learned with
        if rank:
            self.add_lowrank(module.qlinears, rank, roles)
        if self.gptq:
            GPTQ(module.recipe, percdamp=self.percdamp).calibrate(module.adapter, module.qlinears, stats)
        for q in module.qlinears.values():
            q.freeze()
        if self.debias_gelu:
            debias_gelus_on(module, traj, weights, batch_size=batch)
        module.finalized = True
        record = getattr(module, "_quant_record", {})
        record["calib_seconds"] = round(record.get("calib_seconds", 0.0) + time.perf_counter() - start, 2)
        record.update(rgq=self.rgq, gptq=self.gptq, **({"lowrank_rank": rank} if rank else {}),
                      **({"debias_gelu": True} if self.debias_gelu else {}), **weighted)
        if not (self.save or self.pack):
            return
        run_dir = module.run_dir()  # on every rank: under DDP it is a collective
        if self.save:
            trainer.save_checkpoint(run_dir / "checkpoints" / "finalized.ckpt")
        if self.pack:
            record["packed_checkpoint"] = str(run_dir / PACKED_DIR)
        if self.pack and trainer.is_global_zero:
            save_quantized(module, run_dir / PACKED_DIR, module.recipe, module.hparams.model,
                           method=module.record_overrides().get("method", "tca-dit"))

    @torch.no_grad()
    def add_lowrank(self, qlinears: dict, rank: int, roles=None) -> None:
        present = {q.role for q in qlinears.values()}
        unknown = set(roles or ()) - present
        if unknown:
            raise ValueError(f"lowrank_roles {sorted(unknown)} match no quantized linear; roles here: {sorted(present)}")
        for q in qlinears.values():
            if q.weight_spec.enabled and (roles is None or q.role in roles):
                apply_svdquant(q, lowrank_rank(rank, q.in_features, q.out_features))
                q.set_lowrank(fp16_values(q.lowrank_a), fp16_values(q.lowrank_b))  # stored in FP16, losslessly

    @staticmethod
    @torch.no_grad()
    def gram_stats(module, traj, weights, batch_size: int):
        """Input Gram matrices of every quantized linear over the statistics' steps (:func:`statistics_steps`)."""
        return collect_linear_stats(module.teacher, traj, names=list(module.qlinears), gram=True, progress=False,
                                    batch_size=batch_size, step_weights=weights)


def statistics_steps(dm, steps: str):
    """(trajectories, step weights) the finalize statistics read: ATG's representatives with their groups'
    weights, or every calibration step equally."""
    if getattr(dm, "groups", None) is None:
        raise ValueError("Finalize needs the ATG DataModule's trajectories and groups (fit with ATGDataModule)")
    if steps == "all":
        return dm.traj, None
    return dm.traj.subset(dm.groups.representatives), dm.groups.weights


def error_weighted(module, traj, weights, batch_size: int = 64) -> torch.Tensor:
    """Step weights (sum 1): ``weights`` (None: equal) times the module's relative output error at each step."""
    error = output_error_per_step(module.adapter, module.teacher, traj, batch_size)
    base = torch.full_like(error, 1.0 / len(error)) if weights is None else weights.to(error)
    weighted = base * error
    return weighted / weighted.sum()


@torch.no_grad()
def debias_gelus_on(module, traj, step_weights=None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Measure each quantized fc1's output noise on the quantized model over ``traj`` and debias the GELU
    after it; returns {GELU module name: noise variance per channel}."""
    parents = gelu_parents(module.transformer, list(module.qlinears))
    if not parents:
        raise ValueError("debias_gelu: no quantized linear feeds a diffusers GELU (ff.net.0.proj) in this model; "
                         "set debias_gelu: false")
    layers = {f"{p}.proj": module.qlinears[f"{p}.proj"] for p in parents}
    noise = collect_output_noise(module.adapter, traj, layers, batch_size=batch_size, step_weights=step_weights)
    variances = {p: noise[f"{p}.proj"] for p in parents}
    install_debiased_gelu(module.transformer, variances)
    return variances


def reorder_groups(qlinears: dict, stats) -> dict[str, torch.Tensor]:
    """RGQ on every activation-grouped QuantLinear: perm = channels of X T by decreasing energy."""
    perms = {}
    for name, q in qlinears.items():
        if not q.act_spec.enabled or q.act_spec.granularity != "group" or name not in stats.gram:
            continue
        energy = torch.diagonal(transform_gram(stats.gram[name].to(q.weight.device), q.smooth, q.input_rotation))
        perms[name] = magnitude_order(energy)
        q.set_transform(perm=perms[name])
    return perms
