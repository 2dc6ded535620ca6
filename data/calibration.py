"""The calibration-data path every method shares: FP trajectories, then per-linear input statistics.

Trajectories are what the FP model sees with its real sampler: for N conditions, x_t at every
sampler step (stored compact: inputs, timesteps and conditions, never activations). Statistics
are recomputed from them on demand by one FP forward per step with hooks on the linears:
per-timestep, per-input-channel absmax (the anomaly profile the whole project is about) and,
for GPTQ-style methods, the input Gram matrix X^T X.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tca_lightning.models.adapters import Condition, DiffusionAdapter
from tca_lightning.models.samplers import SamplerConfig, sample


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration budget, shared by every method (baselines and TCA-DiT) so comparisons are fair."""

    num_conditions: int = 64
    """Conditions sampled with the FP model (PTQ4DiT uses 64 for DiT-XL/2-256)."""
    num_steps: int = 25
    """Sampler steps of the calibration trajectories (PTQ4DiT calibrates DiT-XL/2-256 on 25 timesteps)."""
    seed: int = 1000
    """Noise seed of the calibration trajectories (differs from the evaluation's)."""
    batch_size: int = 64
    """Items per forward when collecting statistics."""
    cache_dir: str | None = "cache/calibration"
    """Where trajectories are cached (None: regenerate every run)."""
    captions: str | None = None
    """Caption models: a caption file (COCO / MJHQ-30K / txt, as data's ``captions``) whose captions
    ``0 .. num_conditions-1`` are the calibration conditions; give one disjoint from the evaluation's.
    None: the tiny model's digit captions."""
    device: str | None = None
    """Where calibration runs: None for the trainer's device (the GPU under ``--trainer.accelerator gpu``),
    e.g. "cpu" to keep it off a GPU that is short of memory."""

    def __post_init__(self):
        if self.num_conditions < 1 or self.num_steps < 1:
            raise ValueError(f"calibration needs num_conditions >= 1 and num_steps >= 1, got {self}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"calibration.device {self.device!r} is not a torch device (e.g. cpu, cuda, "
                                 f"cuda:1), or leave it unset for the trainer's device: {err}") from None


@dataclass
class Trajectories:
    """x_t (T, N, C, H, W) before each model call, timesteps (T,), the N conditions, and the sampler used."""

    x: torch.Tensor
    timesteps: torch.Tensor
    cond: Condition
    sampler: SamplerConfig

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"x": self.x, "timesteps": self.timesteps, "cond": asdict(self.cond),
                    "sampler": asdict(self.sampler)}, tmp)
        os.replace(tmp, path)

    def subset(self, steps) -> "Trajectories":
        """The same conditions at only some sampler steps (e.g. ATG's representatives)."""
        steps = torch.as_tensor(steps, dtype=torch.long)
        return Trajectories(self.x[steps], self.timesteps[steps], self.cond, self.sampler)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectories":
        d = torch.load(path, weights_only=True)
        return cls(d["x"], d["timesteps"], Condition(**d["cond"]), SamplerConfig(**d["sampler"]))


@torch.no_grad()
def generate_trajectories(adapter: DiffusionAdapter, cond: Condition, indices, sampler: SamplerConfig,
                          progress: bool = True) -> Trajectories:
    """Sample the FP model and keep every x_t (the samples' noise is seeded by ``indices``)."""
    xs, ts = [], []
    sample(adapter, cond, indices, sampler, progress=progress,
           on_step=lambda step, t, x: (xs.append(x.detach().cpu().clone()), ts.append(int(t))))
    return Trajectories(torch.stack(xs), torch.tensor(ts), cond.to("cpu"), sampler)


def cached_trajectories(adapter: DiffusionAdapter, cond: Condition, indices, sampler: SamplerConfig,
                        cache_dir: str | os.PathLike | None, model_name: str) -> Trajectories:
    """generate_trajectories, memoized in ``cache_dir`` by (model, conditions, indices, sampler)."""
    if cache_dir is None:
        return generate_trajectories(adapter, cond, indices, sampler)
    key = hashlib.sha256(json.dumps({
        "model": model_name, "sampler": asdict(sampler), "indices": [int(i) for i in indices],
        "cond": {k: None if v is None else hashlib.sha256(v.cpu().numpy().tobytes()).hexdigest()
                 for k, v in asdict(cond).items()},
        "weights": weights_digest(adapter.transformer, adapter.caption_encoder),
    }, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"trajectories-{key}.pt"
    if path.is_file():
        return Trajectories.load(path)
    traj = generate_trajectories(adapter, cond, indices, sampler)
    traj.save(path)
    return traj


def calibration_trajectories(adapter: DiffusionAdapter, sampler: SamplerConfig, config: CalibrationConfig,
                             model_name: str) -> "Trajectories":
    """The FP trajectories of a calibration budget: conditions drawn like the evaluation's (class i mod the
    model's classes / a caption naming digit i mod 10) with their own noise seed, sampled with the evaluation's scheduler and guidance."""
    from tca_lightning.data.conditions import batch_condition, condition_batch, read_caption_file

    num_classes = adapter.num_classes if adapter.kind == "dit" else 10  # DiT-XL/2: the 1,000 ImageNet classes
    if adapter.kind != "dit" and config.captions is None and not uses_digit_captions(adapter):
        raise ValueError("calibration.captions is missing: a caption model other than tiny-pixart calibrates on "
                         "captions from a file (--model.init_args.calibration.captions FILE: COCO captions JSON, "
                         "MJHQ-30K meta_data.json or txt; disjoint from the evaluation's)")
    batch = condition_batch(config.num_conditions, num_classes=num_classes, seed=config.seed,
                            captions=read_caption_file(config.captions) if adapter.kind != "dit" else None)
    device = next(adapter.transformer.parameters()).device
    traj_sampler = SamplerConfig(scheduler=sampler.scheduler, num_steps=config.num_steps,
                                 guidance_scale=sampler.guidance_scale, seed=config.seed)
    return cached_trajectories(adapter, batch_condition(adapter, batch, device), batch["index"], traj_sampler,
                               config.cache_dir, model_name)


def uses_digit_captions(adapter: DiffusionAdapter) -> bool:
    """Whether a caption model reads the tiny digit captions (tiny-pixart's encoder) rather than a caption file."""
    from tca_lightning.models.captions import TinyCaptionEncoder

    return isinstance(adapter.caption_encoder, TinyCaptionEncoder)


def weights_digest(*modules) -> str:
    """A content hash of the modules' parameters and buffers (what a cached reference depends on)."""
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LinearStats:
    """Per quantizable linear (by qualified name): absmax (T, in_features) per timestep and channel,
    and optionally the Gram matrix X^T X (in, in) summed over all tokens, with its token count."""

    timesteps: torch.Tensor
    absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)  # weighted when collected with step_weights


@torch.no_grad()
def collect_linear_stats(adapter: DiffusionAdapter, traj: Trajectories, names: list[str] | None = None,
                         gram: bool = False, batch_size: int = 64, progress: bool = True,
                         modules: dict[str, torch.nn.Module] | None = None, of: str = "input",
                         step_weights: torch.Tensor | None = None) -> LinearStats:
    """One forward per step over the trajectories (conditional and, with guidance, unconditional
    halves, as at inference), hooks recording each linear's input statistics.

    ``modules`` (name -> module) and ``of="output"`` record other tensors the same way, e.g. what
    ARC's learned transforms hand to the quantizer. ``step_weights`` (T,) weight each step's share of
    the Gram matrices and token counts (ATG: a representative step stands for its whole group).
    """
    if step_weights is not None and len(step_weights) != traj.num_steps:
        raise ValueError(f"step_weights has {len(step_weights)} entries for {traj.num_steps} steps")
    if of not in ("input", "output"):
        raise ValueError(f"of must be 'input' or 'output', got {of!r}")
    if modules is None:
        refs = {r.name: r.module for r in adapter.linears()}
        modules = {n: refs[n] for n in (list(refs) if names is None else names)}
    stats = LinearStats(traj.timesteps.clone())
    step_holder = [0]

    def record(name: str, t: torch.Tensor) -> None:
        x = t.detach().float().reshape(-1, t.shape[-1])
        if name not in stats.absmax:
            stats.absmax[name] = torch.zeros(traj.num_steps, x.shape[1])
            if gram:
                stats.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                stats.tokens[name] = 0
        s = step_holder[0]
        stats.absmax[name][s] = torch.maximum(stats.absmax[name][s], x.abs().amax(0).cpu())
        if gram:
            w = 1.0 if step_weights is None else float(step_weights[s])
            stats.gram[name] += w * (x.t() @ x).double().cpu()
            stats.tokens[name] += w * x.shape[0]

    if of == "input":
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0])) for n, m in modules.items()]
    else:
        handles = [m.register_forward_hook(lambda mod, args, out, n=n: record(n, out)) for n, m in modules.items()]
    run_trajectories(adapter, traj, batch_size, handles, step_holder, progress)
    return stats


@torch.no_grad()
def collect_output_noise(adapter: DiffusionAdapter, traj: Trajectories, qlinears: dict[str, torch.nn.Module],
                         batch_size: int = 64, progress: bool = False,
                         step_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{name: E[(y_q - y)^2] per output channel}: each quantized linear's output error against the same
    layer in floating point (its FP ``weight`` and ``bias`` on the same input; the input transforms fold
    exactly, so that is the unquantized result), over the trajectories, ``step_weights`` weighting steps."""
    if step_weights is not None and len(step_weights) != traj.num_steps:
        raise ValueError(f"step_weights has {len(step_weights)} entries for {traj.num_steps} steps")
    sums, tokens, step_holder = {}, {}, [0]

    def record(name: str, layer, x: torch.Tensor, y: torch.Tensor) -> None:
        err = (y - torch.nn.functional.linear(x, layer.weight.to(x.dtype), layer.bias)).float()
        err = err.reshape(-1, err.shape[-1])
        w = 1.0 if step_weights is None else float(step_weights[step_holder[0]])
        sums[name] = sums.get(name, 0.0) + w * err.square().sum(0).double().cpu()
        tokens[name] = tokens.get(name, 0.0) + w * err.shape[0]

    handles = [m.register_forward_hook(lambda mod, args, out, n=n: record(n, mod, args[0], out))
               for n, m in qlinears.items()]
    run_trajectories(adapter, traj, batch_size, handles, step_holder, progress, desc="output noise")
    return {n: (sums[n] / max(tokens[n], 1e-12)).float() for n in sums}


@torch.no_grad()
def output_error_per_step(student: DiffusionAdapter, teacher: DiffusionAdapter, traj: Trajectories,
                          batch_size: int = 64) -> torch.Tensor:
    """(T,) relative error ||eps_q - eps||^2 / ||eps||^2 of the student's noise prediction per step (both
    guidance halves), on the teacher's own x_t: where along the trajectory quantization hurts the output."""
    channels = traj.x.shape[2]  # learned-sigma outputs carry more channels; eps is the first ``channels``
    err, ref = torch.zeros(traj.num_steps, dtype=torch.float64), torch.zeros(traj.num_steps, dtype=torch.float64)
    for s, x, cond in trajectory_batches(student, traj, batch_size):
        fp = teacher.forward(x, traj.timesteps[s], cond)[:, :channels].float()
        err[s] += float((student.forward(x, traj.timesteps[s], cond)[:, :channels].float() - fp).square().sum())
        ref[s] += float(fp.square().sum())
    return (err / ref.clamp_min(1e-12)).float()


def trajectory_batches(adapter: DiffusionAdapter, traj: Trajectories, batch_size: int, progress: bool = False,
                       desc: str = ""):
    """(step, x_t, condition) batches over every step, on the adapter's device, with the unconditional half
    appended under guidance: the inputs one model call per step and batch sees."""
    device = next(adapter.transformer.parameters()).device
    guided = traj.sampler.guidance_scale > 1.0
    for s in tqdm(range(traj.num_steps), disable=not progress, desc=desc, leave=False):
        for lo in range(0, traj.x.shape[1], batch_size):
            x = traj.x[s, lo:lo + batch_size].to(device)
            cond = slice_condition(traj.cond, lo, lo + batch_size).to(device)
            if guided:
                cond, x = cond.cat(adapter.null_condition(len(x)).to(device)), torch.cat([x, x])
            yield s, x, cond


def run_trajectories(adapter: DiffusionAdapter, traj: Trajectories, batch_size: int, handles: list,
                     step_holder: list[int], progress: bool, desc: str = "calibration statistics") -> None:
    """One forward per step and batch (with the unconditional half under guidance), ``step_holder[0]``
    naming the step for the hooks; removes ``handles`` at the end."""
    try:
        for s, x, cond in trajectory_batches(adapter, traj, batch_size, progress, desc):
            step_holder[0] = s
            adapter.forward(x, traj.timesteps[s], cond)
    finally:
        for h in handles:
            h.remove()


def slice_condition(cond: Condition, lo: int, hi: int) -> Condition:
    cut = lambda a: None if a is None else a[lo:hi]  # noqa: E731
    return Condition(cut(cond.labels), cut(cond.tokens), cut(cond.mask))
