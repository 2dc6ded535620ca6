"""Where a quantized tiny model's FID goes: FID split into its mean and covariance terms, and a probe of
per-timestep output bias correction (issue 4: tiny-pixart's TCA-DiT has the best PSNR but not the best FID).

    python benchmarks/output_bias_probe.py --ckpt runs/tca_table/<run>/tiny_pixart/version_0/checkpoints/finalized.ckpt

For a finalized TCA-DiT checkpoint it samples ``--samples`` images (the evaluation's noise: sample i has
seed i) twice: as calibrated, and with the model output corrected by the mean output error on the
calibration trajectories, E[eps_q - eps_fp] per calibration step (or per ``--groups`` contiguous groups of
steps), for the conditional and the unconditional half separately (PTQD, He et al. 2023, corrects the
correlated part of the quantization noise in the same spirit). Against the FP model's images on the same
noise (the evaluator's reference cache) and the held-out real digits it reports FID = |mu_1 - mu_2|^2 +
covariance term on the mnist-features classifier, PSNR, and the mean pixel shift. Samples are kept as
shards under ``--cache`` (a rerun samples nothing). Writes benchmarks/results/output_bias_probe.{md,csv,json}.

``--fp-roles fc2 embedders ...`` adds one row per role with that role's linears put back to the FP model's
(weights and inputs unquantized, no transform): which layers the FID excess comes from. ``--fp-acts fc1``:
that role's inputs unquantized, its weights as calibrated; ``--act-clip fc1=0.9``: its activation range
clipped to that fraction; ``--fp-steps-below 200``: the sampler's steps at t < 200 run the FP model. ``--baselines svdquant``: a row for that baseline, calibrated on the checkpoint's model, recipe and budget
(its FID against the FP model's images, which FID against real digits does not give). ``--no-correction``
skips the corrected row.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from common import BASELINES, ROOT, baseline_student, load_finalized, machine, now, write_tables

COLUMNS = ("variant", "samples", "fid_vs_real", "fid_mean_term", "fid_cov_term", "fid_vs_fp", "fid_vs_fp_mean_term",
           "psnr_vs_fp", "mean_pixel_shift", "mean_abs_pixel_error")


def correction_tables(module, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (T,), tables (T, 2, C, H, W)): mean output error of the quantized model on the FP calibration
    trajectories per step, conditional and unconditional halves; averaged within ``groups`` contiguous groups."""
    from tca_lightning.data.calibration import calibration_trajectories

    fp, q = module.teacher, module.adapter
    traj = calibration_trajectories(fp, module.sampler, module.calibration, module.hparams.model)
    steps, n = traj.x.shape[:2]
    tables = []
    with torch.no_grad(), torch.nn.utils.parametrize.cached():
        for s in range(steps):
            x, cond = torch.cat([traj.x[s]] * 2), traj.cond.cat(q.null_condition(n))
            err = q.forward(x, traj.timesteps[s], cond) - fp.forward(x, traj.timesteps[s], cond)
            tables.append(torch.stack([half.mean(0) for half in err.chunk(2)]))
    tables = torch.stack(tables)
    if groups < steps:
        member = torch.arange(steps) * groups // steps
        tables = torch.stack([tables[member == g].mean(0) for g in range(groups)])[member]
    return traj.timesteps.float(), tables


def install_correction(transformer: torch.nn.Module, timesteps: torch.Tensor, tables: torch.Tensor):
    """Subtract the nearest calibration step's table from every guided forward's output ([cond; uncond] rows)."""
    def hook(module, args, kwargs, output):
        step = int((timesteps - kwargs["timestep"].float().reshape(-1)[0]).abs().argmin())
        half = output.sample.shape[0] // 2
        output.sample = output.sample - tables[step].repeat_interleave(half, dim=0).to(output.sample.dtype)
        return output
    return transformer.register_forward_hook(hook, with_kwargs=True)


@contextmanager
def fp_role(module, role: str):
    """Every quantized linear of ``role`` swapped for the FP model's own, swapped back on exit."""
    names = [n for n, q in module.qlinears.items() if q.role == role]
    if not names:
        raise SystemExit(f"no quantized linear has role {role!r}; roles here: "
                         f"{sorted({q.role for q in module.qlinears.values()})}")
    teacher = module.teacher.transformer
    for n in names:
        module.transformer.set_submodule(n, teacher.get_submodule(n))
    try:
        yield
    finally:
        for n in names:
            module.transformer.set_submodule(n, module.qlinears[n])


@contextmanager
def act_spec_of(module, role: str, **changes):
    """The activation quantizer of every linear of ``role`` changed, changed back on exit."""
    old = {n: q.act_spec for n, q in module.qlinears.items() if q.role == role}
    if not old:
        raise SystemExit(f"no quantized linear has role {role!r}")
    for n, spec in old.items():
        module.qlinears[n].set_specs(act_spec=dataclasses.replace(spec, **changes))
    try:
        yield
    finally:
        for n, spec in old.items():
            module.qlinears[n].set_specs(act_spec=spec)


@contextmanager
def fp_steps_below(module, threshold: float):
    """Every forward at a timestep below ``threshold`` answered by the FP model (the rest quantized): how much of
    the images' distance from FP the late, low-noise steps carry."""
    teacher = module.teacher.transformer

    def hook(transformer, args, kwargs, output):
        return teacher(*args, **kwargs) if float(kwargs["timestep"].reshape(-1)[0]) < threshold else output
    handle = module.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def debiased_gelu(module):
    """Every GELU after a quantized fc1 debiased by fc1's output noise on the calibration trajectories."""
    from tca_lightning.callbacks.finalize import debias_gelus_on
    from tca_lightning.data.calibration import calibration_trajectories
    from tca_lightning.quant.debias import remove_debiased_gelu

    traj = calibration_trajectories(module.teacher, module.sampler, module.calibration, module.hparams.model)
    variances = debias_gelus_on(module, traj)
    print({p: round(float(v.mean()), 5) for p, v in variances.items()}, flush=True)
    try:
        yield
    finally:
        remove_debiased_gelu(module.transformer)


def sample_shards(module, folder: Path, samples: int, batch: int = 100) -> torch.Tensor:
    from tca_lightning.data.conditions import batch_condition, condition_batch
    from tca_lightning.evaluate import load_sample_shard, save_sample_shard
    from tca_lightning.models.samplers import decode, sample

    images = []
    for b, first in enumerate(range(0, samples, batch)):
        conditions = condition_batch(min(batch, samples - first), 10, 0, offset=first)
        path = folder / f"batch-{b:06d}.npz"
        if path.is_file():
            images.append(load_sample_shard(path, conditions))
            continue
        with torch.no_grad(), torch.nn.utils.parametrize.cached():
            x0 = sample(module.adapter, batch_condition(module.adapter, conditions), conditions["index"], module.sampler,
                        module.scheduler_config)
        images.append(save_sample_shard(path, decode(x0, module.vae), conditions))
        print(f"{folder.name}: {first + len(conditions['index'])}/{samples}", flush=True)
    return torch.cat(images)


def fp_images(module, samples: int, batch: int = 100) -> torch.Tensor:
    """The FP model's images on the same noise, from the evaluator's reference cache (sampled if absent)."""
    from tca_lightning.data.conditions import condition_batch

    out = []
    for first in range(0, samples, batch):
        conditions = condition_batch(min(batch, samples - first), 10, 0, offset=first)
        out.append(module.reference_images(conditions).cpu())
    return torch.cat(out)


def fid_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    from tca_lightning.reference_sets import feature_statistics, frechet_distance

    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    fid = frechet_distance(m1, s1, m2, s2)
    return fid, float((m1 - m2).square().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a finalized.ckpt of a tiny model (fit's Finalize writes it)")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--groups", type=int, default=25, help="contiguous groups of calibration steps (25: one per step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="runs/output_bias_probe")
    parser.add_argument("--table", default="output_bias_probe", help="results file name under benchmarks/results")
    parser.add_argument("--fp-roles", nargs="*", default=[], help="one row per role, its linears left in FP")
    parser.add_argument("--fp-acts", nargs="*", default=[], help="one row per role, its inputs left unquantized")
    parser.add_argument("--act-clip", nargs="*", default=[], metavar="ROLE=RATIO",
                        help="one row per entry, that role's activation range clipped to RATIO")
    parser.add_argument("--debias-gelu", action="store_true",
                        help="a row with fc1's GELU debiased by its calibrated output noise (quant/debias.py)")
    parser.add_argument("--baselines", nargs="*", default=[], choices=BASELINES,
                        help="one row per baseline, calibrated here on the checkpoint's model, recipe and budget")
    parser.add_argument("--fp-steps-below", nargs="*", type=float, default=[], metavar="T",
                        help="one row per T: sampler steps at timesteps below T run the FP model")
    parser.add_argument("--correction", action=argparse.BooleanOptionalAction, default=True,
                        help="the output-bias-corrected row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    from tca_lightning.evaluate import real_digits
    from tca_lightning.models.loading import load_classifier

    module = load_finalized(args.ckpt)
    key = hashlib.sha256(Path(args.ckpt).read_bytes()).hexdigest()[:12]
    cache = ROOT / args.cache / key
    images = {"as calibrated": sample_shards(module, cache / "plain", args.samples)}
    if args.correction:
        handle = install_correction(module.transformer, *correction_tables(module, args.groups))
        variant = f"output bias corrected ({args.groups} groups)"
        images[variant] = sample_shards(module, cache / f"corrected-{args.groups}", args.samples)
        handle.remove()
    for role in args.fp_roles:
        with fp_role(module, role):
            images[f"{role} in FP"] = sample_shards(module, cache / f"fp-{role}", args.samples)
    for role in args.fp_acts:
        with act_spec_of(module, role, bits=16):
            images[f"{role} inputs in FP"] = sample_shards(module, cache / f"actfp-{role}", args.samples)
    for entry in args.act_clip:
        role, ratio = entry.split("=")
        with act_spec_of(module, role, clip_ratio=float(ratio)):
            tag = f"clip{float(ratio):g}".replace(".", "")
            images[f"{role} inputs clipped to {float(ratio):g}"] = sample_shards(module, cache / f"{tag}-{role}",
                                                                               args.samples)
    for name in args.baselines:
        calibrated = module.transformer
        module.transformer = baseline_student(module, name).transformer
        images[f"baseline {name}"] = sample_shards(module, cache / f"baseline-{name}", args.samples)
        module.transformer = calibrated
    for threshold in args.fp_steps_below:
        with fp_steps_below(module, threshold):
            images[f"FP below t={threshold:g}"] = sample_shards(module, cache / f"fp-below-{threshold:g}", args.samples)
    if args.debias_gelu:
        with debiased_gelu(module):
            images["fc1 GELU debiased"] = sample_shards(module, cache / "debias-gelu", args.samples)
    fp = fp_images(module, args.samples)
    classifier = load_classifier().eval()
    with torch.no_grad():
        features = {name: classifier(x * 2 - 1).double() for name, x in {**images, "fp": fp, "real": real_digits(
            module.hparams.real_images)}.items()}
    rows = []
    for name in ("fp", *images):
        fid, mean_term = fid_terms(features["real"], features[name])
        row = {"variant": "FP model" if name == "fp" else name, "samples": args.samples, "fid_vs_real": round(fid, 3),
               "fid_mean_term": round(mean_term, 3), "fid_cov_term": round(fid - mean_term, 3)}
        if name != "fp":
            fid_fp, mean_fp = fid_terms(features["fp"], features[name])
            diff = images[name] - fp
            row.update(fid_vs_fp=round(fid_fp, 3), fid_vs_fp_mean_term=round(mean_fp, 3),
                       psnr_vs_fp=round(float(10 * torch.log10(1 / diff.pow(2).mean())), 2),
                       mean_pixel_shift=round(float(diff.mean()), 4), mean_abs_pixel_error=round(float(diff.abs().mean()), 4))
        rows.append(row)
        print(row, flush=True)
    header = {"date": now(), "machine": machine(args.threads), "wall_seconds": round(time.time() - start, 1),
              "invocation": "python benchmarks/output_bias_probe.py " + " ".join(sys.argv[1:]), "checkpoint": args.ckpt}
    notes = [f"checkpoint {args.ckpt}; {args.samples} samples (noise seeds 0..{args.samples - 1}), the model's sampler",
             "FID on the mnist-features classifier against the 500 held-out digits (fid_vs_real) and against the FP "
             "model's images on the same noise (fid_vs_fp); mean term = |mu_1 - mu_2|^2, the rest is the covariance term",
             "mean_pixel_shift: mean of (quantized - FP) pixels in [0, 1]: a systematic drift, which the sampler "
             "accumulates over its steps while zero-mean errors average out"]
    print(write_tables(args.table, "FID decomposition and output bias correction (probe)", header, rows,
                       COLUMNS, notes))


if __name__ == "__main__":
    main()
