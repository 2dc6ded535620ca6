"""ARC — Anomaly-aware Rotation Calibration (TCA-DiT), as a LightningModule.

Every quantized linear input X gets a learnable T = diag(1/s) (R_a ⊗ R_b) (one T per shared
input: q/k/v share one), so that X T is easy to quantize while the weight absorbs T^-1 exactly
(quant/learnable.py). All blocks are calibrated in parallel on FP inputs: each training step
runs the frozen FP model once with hooks (every block's inputs and output), then each block's
quantized copy on its own FP inputs, and sums

    recon_b = ||Block_b^q(X_b) - Block_b(X_b)||^2 / ||Block_b(X_b) - X_b||^2   (weighted by ATG group weight)
    align   = sum over transformed inputs of the spread across ATG groups of the normalized
              per-channel magnitude profile of X T (anomaly channels pushed to the same place at
              every timestep, so one static transform fits all)
    loss    = mean_b recon_b + lambda_align * align

The reconstruction is normalized by the block's residual update, not its output: a DiT block's
output is mostly its input passed through, so ||Block(X)||^2 would make every block's relative
error ~1e-4 and let the alignment term dominate (measured on tiny-dit); the update norm puts
every block on the same scale. One optimizer over all transform parameters (and learnable weight clipping when enabled), so
one ordinary ``Trainer.fit`` does it and DDP all-reduces the gradients for free. Rotations are
initialized from a randomized Hadamard (or identity), scales from ones (or SmoothQuant's rule over all
calibration timesteps). In this fake-quant stage every T is applied online; the finalize step
folds s into the adaLN modulation / to_v and the per-head parts where exact (RGQ, export).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

from tca_lightning.data.calibration import CalibrationConfig
from tca_lightning.evaluate import DiffusionEvaluator
from tca_lightning.methods.base import QuantRecipe, wrap_linears
from tca_lightning.models.adapters import ROLES, Condition, get_adapter
from tca_lightning.models.samplers import SamplerConfig
from tca_lightning.quant.debias import install_debiased_gelu
from tca_lightning.quant.learnable import KronTransform
from tca_lightning.quant.transforms import fp16_values, smoothquant_scales



@dataclass(frozen=True)
class ARCConfig:
    """What ARC learns and how."""

    lr: float = 5e-3
    """Learning rate of the transform parameters (AdamW)."""
    lambda_align: float = 0.01
    """Weight of the anomaly-alignment loss (0 disables it: ablation (a)). 0.01 with ``scale_init=ones``:
    best mean PSNR of the quick-budget sweep (benchmarks/results/arc_tuning_quick.md); at 0.1 it hurt."""
    lambda_guided: float = 0.0
    """Weight of the guided reconstruction: the relative error of each block's classifier-free-guided update
    (1 - g) u + g c (g the sampler's guidance scale, c/u the conditional and unconditional halves). The
    sampler amplifies the difference of the halves' errors g-fold, which recon (each half alone) does not
    see; 0 leaves it out."""
    lambda_output: float = 0.0
    """Weight of the whole-model output loss: the relative error of the quantized model's noise prediction
    (guided when the sampler guides) against the FP model's on the same x_t, the quantized blocks run one
    after another as at inference. The block losses see FP inputs only, so the error one block hands the
    next (and its accumulation into a systematic output drift) is invisible to them; 0 leaves it out.
    One more forward and backward of the whole model per step."""
    rotate: bool = True
    """Learn Kronecker-factored rotations (False: scales only)."""
    learn_rotation: bool = True
    """False keeps the initial randomized Hadamard fixed (ablation (b))."""
    scale: bool = True
    """Learn per-channel scales (False: rotations only, ablation (c))."""
    rotation_init: str = "hadamard"
    """``hadamard`` (randomized) or ``identity``."""
    scale_init: str = "ones"
    """``ones``, or ``smoothquant`` (SmoothQuant's rule over all calibration timesteps, alpha ``smooth_alpha``).
    From ones the scales are shaped by the reconstruction and alignment losses alone; SmoothQuant's
    start already flattens the profiles, and the alignment loss then fights the reconstruction."""
    smooth_alpha: float = 0.5
    """SmoothQuant alpha of the scale initialization."""
    weight_clipping: bool = False
    """Learn per-output-channel weight clipping (OmniQuant LWC)."""
    fake_quant_weights: bool = True
    """Quantize the weights inside the blocks while learning (False: learn against activation
    quantization alone and leave the weights' error to the finalize step's GPTQ; bake() restores them)."""
    lowrank_rank: int = 0
    """SVDQuant's FP low-rank branch (Li et al., ICLR 2025) *while learning*: before every step, the top
    singular directions of each transformed weight of ``lowrank_roles`` (rank scaled to the layer's width as
    SVDQuant's: this value at 1152) run in floating point on the unquantized input and only the residual is
    quantized, so the scales and rotations are learned for the split the finalize step deploys (Finalize adds
    the same branch on the baked weights); 0 leaves it out."""
    lowrank_roles: tuple[str, ...] | None = None
    """Roles with the learned-with low-rank branch (None: every role)."""
    roles: tuple[str, ...] = ROLES
    """Roles whose inputs get a transform. Inputs inside the transformer blocks get a learned one;
    the rest (PixArt's adaLN-single and caption projection, the final layer) a fixed SmoothQuant
    scale, since no block reconstruction sees them."""
    seed: int = 0
    """Seed of the randomized Hadamard initialization."""
    checkpoint_blocks: bool = False
    """Recompute each block's quantized forward during backward (torch.utils.checkpoint) instead of keeping
    its activations: a step holds one block's activations at a time rather than every block's (DiT-XL/2 has
    28, at 512 px with 1,024 tokens each). The same gradients (tests/test_arc.py), for one more block forward."""

    def __post_init__(self):
        if self.scale_init not in ("smoothquant", "ones"):
            raise ValueError(f"arc.scale_init must be 'smoothquant' or 'ones', got {self.scale_init!r}")
        if self.lowrank_rank < 0:
            raise ValueError(f"arc.lowrank_rank must be >= 0 (0: no low-rank branch), got {self.lowrank_rank}")
        if self.rotation_init not in ("hadamard", "identity"):
            raise ValueError(f"arc.rotation_init must be 'hadamard' or 'identity', got {self.rotation_init!r}")


def guide(x: torch.Tensor, g: float) -> torch.Tensor:
    """Classifier-free guidance's combination (1 - g) u + g c of rows [conditional; unconditional]."""
    c, u = x.chunk(2)
    return (1 - g) * u + g * c


# Checkpoints keep the config dataclasses in their hyperparameters; torch.load(weights_only=True), Lightning's
# default, refuses unknown classes, so ours are allowlisted (plain data, no code runs when they load).
torch.serialization.add_safe_globals([ARCConfig, QuantRecipe, SamplerConfig, CalibrationConfig])


class ARC(DiffusionEvaluator):
    """TCA-DiT calibration (``fit``) and its evaluation (``test``) in one module."""

    def __init__(self, model: str = "tiny-dit", recipe: QuantRecipe = QuantRecipe(wbits=4, abits=4), arc: ARCConfig = ARCConfig(),
                 **evaluator_args):
        """
        Args:
            model: embedded name (tiny-dit, tiny-pixart), local folder, hub id, or random:<arch>.
            recipe: bits, granularities and per-role overrides (the same dataclass as the baselines').
            arc: what ARC learns and how.
            evaluator_args: everything DiffusionEvaluator takes (sampler, classifier, ...).
        """
        super().__init__(model=model, **evaluator_args)
        self.recipe = recipe if isinstance(recipe, QuantRecipe) else QuantRecipe(**recipe)
        self.arc = arc if isinstance(arc, ARCConfig) else ARCConfig(**arc)
        teacher = copy.deepcopy(self.transformer).requires_grad_(False)
        if self.hparams.reference is None:
            self.reference_model, self.reference_captions = teacher, self.caption_encoder  # teacher and reference
        else:
            self.teacher_model = teacher  # the FP teacher; an explicit ``reference`` stays the PSNR reference
        self.transforms = torch.nn.ModuleDict()
        self._fit_start = None
        self._setup_seconds = 0.0
        self._built = False
        self.finalized = False  # set by callbacks.Finalize: transforms baked, RGQ and GPTQ applied

    # --- what test evaluates ----------------------------------------------------------------
    # One config serves three jobs: ``fit`` calibrates TCA-DiT and evaluates it; ``test`` with
    # ``--ckpt_path`` evaluates a calibrated checkpoint; plain ``test`` evaluates the FP model, or the
    # baseline named by ``quantization`` (so baselines and TCA-DiT share every other setting).
    @property
    def is_quantized(self) -> bool:
        return self._built or self.quantization is not None

    @property
    def compares_to_reference(self) -> bool:
        return self.is_quantized or self.hparams.reference is not None

    @property
    def teacher(self):
        """The FP model whose block outputs ARC reconstructs (the FP reference unless another was given)."""
        return get_adapter(getattr(self, "teacher_model", None) or self.reference_model, self.caption_encoder)

    def calibration_source(self):
        """(model name, FP adapter, sampler, calibration budget) for the ATG DataModule."""
        self.move_to_calibration_device(self.teacher)
        return self.hparams.model, self.teacher, self.sampler, self.calibration

    # --- construction ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.quantization is not None:
            raise ValueError(f"`fit` calibrates TCA-DiT, but model.init_args.quantization selects the baseline "
                             f"{type(self.quantization).__name__}: evaluate baselines with `test`, or drop "
                             "--model.init_args.quantization")
        if self._built:
            return
        if stage == "fit":
            self._setup_seconds = getattr(self.trainer.datamodule, "seconds", 0.0) if self.trainer.datamodule else 0.0
            self._fit_start = time.perf_counter()
            self.build(getattr(self.trainer.datamodule, "stats", None))
        elif self.quantization is not None:
            super().setup(stage)  # a baseline

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tca_finalized"] = self.finalized

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """``test --ckpt_path``: build the (uncalibrated) transforms so the checkpoint's values have a home;
        a finalized checkpoint carries them baked into the layers' buffers instead."""
        super().on_load_checkpoint(checkpoint)
        if not self._built and any(k.startswith("transforms.") for k in checkpoint["state_dict"]):
            self.build(None)
        noise_vars = {k[len("transformer."):-len(".noise_var")]: torch.zeros_like(v)
                      for k, v in checkpoint["state_dict"].items()
                      if k.startswith("transformer.") and k.endswith(".noise_var")}
        if noise_vars:  # Finalize(debias_gelu=True): the debiased GELUs' home (the values load next)
            install_debiased_gelu(self.transformer, noise_vars)
        if checkpoint.get("tca_finalized", False):
            for q in self.qlinears.values():
                q.transform = None  # the loaded smooth/rotation/perm/weight_q buffers are the transforms now
            self.finalized = True

    def build(self, stats=None) -> None:
        """Wrap the linears and attach one learnable transform per shared input (scales from ``stats``)."""
        adapter = self.adapter
        self.qlinears = wrap_linears(adapter, self.recipe)
        for i, group in enumerate(adapter.shared_input_groups(list(self.qlinears))):
            first = self.qlinears[group[0]]
            if first.role not in self.arc.roles or not first.act_spec.enabled:
                continue
            smooth = None
            if self.arc.scale and stats is not None and group[0] in stats.absmax:
                weight = torch.cat([self.qlinears[n].weight for n in group])
                smooth = smoothquant_scales(stats.absmax[group[0]].amax(0), weight, self.arc.smooth_alpha)
            if first.block is None:  # outside every block: no reconstruction loss sees it, keep it fixed
                if smooth is not None:
                    for n in group:
                        self.qlinears[n].set_transform(smooth=smooth)
                continue
            init_scale = smooth if self.arc.scale_init == "smoothquant" else None
            transform = KronTransform(first.in_features, rotate=self.arc.rotate, scale=self.arc.scale,
                                      init_scale=init_scale, init=self.arc.rotation_init, seed=self.arc.seed + i,
                                      learnable_rotation=self.arc.learn_rotation)
            self.transforms[group[0].replace(".", "__")] = transform
            for n in group:
                self.qlinears[n].set_learnable_transform(transform)
        self._weight_specs = {}
        if not self.arc.fake_quant_weights:
            for name, q in self.qlinears.items():
                if q.weight_spec.enabled and q.block is not None:
                    self._weight_specs[name] = q.weight_spec
                    q.set_specs(weight_spec=dataclasses.replace(q.weight_spec, bits=16))
        if self.arc.weight_clipping:
            for q in self.qlinears.values():
                if q.weight_spec.enabled and q.block is not None:
                    q.enable_weight_clipping(1.0 - 1e-3)
        self._built = True

    def configure_optimizers(self):
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        if not params:
            raise ValueError("ARC has nothing to learn: enable rotate/scale/weight_clipping or quantized roles")
        return torch.optim.AdamW(params, lr=self.arc.lr, weight_decay=0.0)

    # --- one calibration step ----------------------------------------------------------------
    def _condition(self, batch: dict) -> Condition:
        return Condition(labels=batch.get("labels"), tokens=batch.get("tokens"), mask=batch.get("mask"))

    @torch.no_grad()
    def refresh_lowrank(self) -> None:
        """Re-split every learned layer of ``arc.lowrank_roles`` into its rank-r SVD branch and the residual the
        quantizer sees, for the transforms as they are now (the branch is a constant within a step)."""
        from tca_lightning.methods.svdquant import lowrank_rank, svd_lowrank

        roles = self.arc.lowrank_roles
        for q in self.qlinears.values():
            if q.transform is None or not q.weight_spec.enabled or (roles is not None and q.role not in roles):
                continue
            q.lowrank_a = q.lowrank_b = None
            q.set_lowrank(*svd_lowrank(q.transformed_weight().detach(),
                                       lowrank_rank(self.arc.lowrank_rank, q.in_features, q.out_features)))

    def training_step(self, batch: dict, batch_idx: int):
        if self.arc.lowrank_rank:
            self.refresh_lowrank()
        fp = self.teacher
        q = self.adapter
        x, t, cond = batch["x"], batch["timestep"], self._condition(batch)
        if self.sampler.guidance_scale > 1.0:  # inference runs both halves: calibrate on both
            x, t = torch.cat([x, x]), torch.cat([t, t])
            cond = cond.cat(q.null_condition(len(cond)).to(self.device))
            weight, group = torch.cat([batch["weight"]] * 2), torch.cat([batch["group"]] * 2)
        else:
            weight, group = batch["weight"], batch["group"]
        with torch.no_grad():
            fp_out, captured = fp.capture(x, t, cond)
        profiles: dict[str, torch.Tensor] = {}
        transformed: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_hook(self._keep_output(name, transformed)) for name, m in self.transforms.items()]
        recon, guided = [], []
        g = self.sampler.guidance_scale
        try:
            for i, block in enumerate(q.blocks()):
                target, block_in = captured[i].output, captured[i].args[0]
                if self.arc.checkpoint_blocks:
                    out = torch.utils.checkpoint.checkpoint(q.run_block, i, captured[i], block, use_reentrant=False)
                else:
                    out = q.run_block(i, captured[i], block)
                # profiles outside the (possibly recomputed) block: the recomputation runs without these hooks
                profiles.update({name: self._profile(x) for name, x in transformed.items()})
                transformed.clear()
                update = (target - block_in).pow(2).flatten(1).sum(1).clamp_min(1e-12)
                err = (out - target).pow(2).flatten(1).sum(1) / update
                recon.append((err * weight).sum() / weight.sum())
                self.log(f"recon/block{i}", recon[-1], on_step=True, on_epoch=False)
                if self.arc.lambda_guided > 0 and g > 1.0:
                    guided.append(self._guided_error(out, target, block_in, g, weight.chunk(2)[0]))
        finally:
            for h in handles:
                h.remove()
        recon_loss = torch.stack(recon).mean()
        align_loss = self._alignment(profiles, group) if self.arc.lambda_align > 0 else recon_loss.new_zeros(())
        loss = recon_loss + self.arc.lambda_align * align_loss
        logged = {"train/loss": loss, "train/recon": recon_loss, "train/align": align_loss}
        if guided:
            logged["train/guided"] = torch.stack(guided).mean()
            loss = loss + self.arc.lambda_guided * logged["train/guided"]
        if self.arc.lambda_output > 0:
            logged["train/output"] = self._output_error(q.forward(x, t, cond), fp_out, q.in_channels, g,
                                                        weight.chunk(2)[0] if g > 1.0 else weight)
            loss = loss + self.arc.lambda_output * logged["train/output"]
        logged["train/loss"] = loss
        self.log_dict(logged, prog_bar=True)
        return loss

    @staticmethod
    def _guided_error(out: torch.Tensor, target: torch.Tensor, block_in: torch.Tensor, g: float,
                      weight: torch.Tensor) -> torch.Tensor:
        """Relative error of the guided block update (1 - g) u + g c; rows are [conditional; unconditional]."""
        reference = guide(target - block_in, g).pow(2).flatten(1).sum(1).clamp_min(1e-12)
        err = guide(out - target, g).pow(2).flatten(1).sum(1) / reference
        return (err * weight).sum() / weight.sum()

    @staticmethod
    def _output_error(out: torch.Tensor, target: torch.Tensor, channels: int, g: float,
                      weight: torch.Tensor) -> torch.Tensor:
        """Relative error of the noise prediction the sampler uses: the first ``channels`` outputs (a learned
        variance is not guided), combined u + g (c - u) when rows are [conditional; unconditional]."""
        out, target = out[:, :channels].float(), target[:, :channels].float()
        if g > 1.0:
            out, target = guide(out, g), guide(target, g)
        err = (out - target).pow(2).flatten(1).sum(1) / target.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        return (err * weight).sum() / weight.sum()

    @staticmethod
    def _keep_output(name: str, outputs: dict):
        def hook(module, args, output):
            outputs[name] = output
        return hook

    @staticmethod
    def _profile(output: torch.Tensor) -> torch.Tensor:
        """Per-channel magnitude profile of a transformed input: absmax over tokens."""
        return output.abs().amax(dim=-2) if output.dim() == 3 else output.abs()

    @staticmethod
    def _alignment(profiles: dict[str, torch.Tensor], group: torch.Tensor) -> torch.Tensor:
        """Spread across ATG groups of each transformed input's normalized channel-magnitude profile."""
        groups = group.unique()
        total = []
        for p in profiles.values():
            p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            if len(groups) < 2:
                continue
            means = torch.stack([p[group == g].mean(0) for g in groups])
            total.append((means - means.mean(0, keepdim=True)).pow(2).sum(1).mean())
        return torch.stack(total).mean() if total else next(iter(profiles.values())).new_zeros(())

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        log_dir = self.run_dir()  # on every rank (a collective under DDP)
        if self.trainer.is_global_zero and getattr(dm, "stats", None) is not None:
            from tca_lightning.callbacks.anomaly import (atg_cluster_figure, pick_layers, write_anomaly_heatmaps,
                                                         write_figure)

            names = pick_layers([(n, q.role) for n, q in self.qlinears.items()])
            write_anomaly_heatmaps(dm.stats.absmax, dm.stats.timesteps, names, log_dir / "anomaly_heatmaps_fp.png",
                                   title=f"{self.hparams.model}: FP input absmax per timestep", logger=self.logger,
                                   tag="anomaly/fp")
            if getattr(dm, "signatures", None) is not None:
                fig = atg_cluster_figure(dm.signatures, dm.groups.assignment, dm.groups.representatives,
                                         dm.stats.timesteps)
                write_figure(fig, log_dir / "atg_clusters.png", self.logger, "atg/clusters")

    def on_train_end(self) -> None:
        dm = self.trainer.datamodule
        self._quant_record = {
            "calib_seconds": round(self._setup_seconds + time.perf_counter()
                                   - (self._fit_start or time.perf_counter()), 2),
            "num_quantized_linears": len(self.qlinears), "num_transforms": len(self.transforms),
            "max_orthogonality_error": max((t.orthogonality_error() for t in self.transforms.values()), default=0.0),
            **(dm.summary() if hasattr(dm, "summary") else {}),
        }
        log_dir = self.run_dir()  # on every rank (a collective under DDP)
        if self.trainer.is_global_zero and getattr(dm, "traj", None) is not None:
            self._write_transformed_heatmaps(dm, log_dir)

    @torch.no_grad()
    def _write_transformed_heatmaps(self, dm, log_dir: Path) -> None:
        """Per-timestep channel absmax of X T (what the quantizer sees) after ARC, next to the FP figure."""
        from tca_lightning.callbacks.anomaly import pick_layers, write_anomaly_heatmaps
        from tca_lightning.data.calibration import collect_linear_stats

        names = pick_layers([(n, q.role) for n, q in self.qlinears.items() if q.transform is not None])
        modules = {n: self.qlinears[n].transform for n in names}
        with torch.nn.utils.parametrize.cached():
            stats = collect_linear_stats(self.adapter, dm.traj, modules=modules, of="output", progress=False,
                                         batch_size=dm.hparams.calib_batch_size * 2)
        write_anomaly_heatmaps(stats.absmax, dm.traj.timesteps, names, log_dir / "anomaly_heatmaps_arc.png",
                               title=f"{self.hparams.model}: input absmax after ARC (X T)",
                               logger=self.logger, tag="anomaly/arc")

    @torch.no_grad()
    def bake(self) -> None:
        """Turn each learned transform into its QuantLinears' fixed ``smooth``/``rotation`` buffers.

        x (1/s) (R_a ⊗ R_b) is exactly transform_input(x, s, R_a ⊗ R_b); afterwards the layers look
        like any other method's, so GPTQ (transform_gram), RGQ and export read them unchanged.
        """
        if self.finalized:
            return
        for name, q in self.qlinears.items():
            t = q.transform
            if t is None:
                continue
            q.lowrank_a = q.lowrank_b = None  # the learned-with branch: Finalize re-splits the baked weight after RGQ
            if q.smooth is not None or q.input_rotation is not None:
                raise ValueError(f"{name} already has a fixed smooth/rotation: bake() would compose them silently")
            q.transform = None
            # FP16 values, so the packed checkpoint stores them in half the bytes losslessly; the weight
            # fold uses (A ⊗ B)^-T, exact for the rounded (no longer exactly orthogonal) factors; 2^-14 is
            # FP16's smallest normal
            smooth, factors = t.scale(), t.factors()
            q.set_transform(smooth=None if smooth is None else fp16_values(smooth.clamp_min(2.0**-14)),
                            rotation=None if factors is None else tuple(fp16_values(f) for f in factors))
        for name, spec in getattr(self, "_weight_specs", {}).items():
            self.qlinears[name].set_specs(weight_spec=spec)  # learned with FP weights: quantize them now
        self._weight_specs = {}

    def on_test_start(self) -> None:
        if self._built:
            for qlinear in self.qlinears.values():
                qlinear.freeze()
        super().on_test_start()

    def generate(self, adapter, batch: dict) -> torch.Tensor:
        with torch.nn.utils.parametrize.cached():  # the Cayley map once per call, not once per linear per step
            return super().generate(adapter, batch)

    def record_overrides(self) -> dict:
        if not self._built:
            return super().record_overrides()
        return {"method": "tca-dit", "wbits": self.recipe.wbits, "abits": self.recipe.abits}
