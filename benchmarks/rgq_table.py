"""RGQ ablation (issue 5): group quantization with and without reordering, at several group sizes.

    python benchmarks/rgq_table.py                      # both tiny models, G 16/32/64, RGQ on/off, 100 samples
    python benchmarks/rgq_table.py --arc-ckpt tiny-dit=runs/tca_table/.../epoch=3-step=40.ckpt
    python benchmarks/rgq_table.py --quick              # 32 samples, 10 steps, small calibration: minutes
    python benchmarks/rgq_table.py --report             # the table of the rows finished so far

RGQ acts in the finalize step, after ARC has learned its rotations and scales, so one ARC calibration
per model serves every row: each row restarts ``fit`` from that ARC state's end-of-training checkpoint
(training is already complete, so only ``on_fit_end`` runs: bake, RGQ or not, GPTQ at group size G,
pack) and evaluates the result against FP on identical noise. Isolating RGQ this way keeps ARC's
randomness out of the comparison; the price is that ARC learned its transforms under G=32 fake quant
(the recipe of every other table), which is stated in the results. Without ``--arc-ckpt`` the script
first runs that ARC fit itself (the configs' full calibration budget).

Lightning's CLI takes a checkpoint's hyperparameters over the command line's (``_parse_ckpt_path``), so
the group size cannot be overridden next to ``--ckpt_path``: the script writes one copy of the ARC
checkpoint per G with only ``recipe.group_size`` changed.

The tiny models are 64 channels wide (fc2 reads 256), so G=128 does not divide most of their layers;
G=64 is already one group per token there (reordering cannot matter except in fc2), and G=16 stands
in for the real models' fine groups (DiT-XL/2: 1152 wide, G=128 is 1/9 of a row; here G=16 is 1/4).
Writes benchmarks/results/rgq_table{,_quick}.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

from common import CONFIGS, ROOT, accelerator_of, cli_args, earlier_rows, machine, now, run_many, threads_per_job, write_tables

COLUMNS = ("model", "group_size", "rgq", "wbits", "abits", "seed", "psnr_vs_fp", "mse_vs_fp", "fid", "kid", "cond_acc",
           "calib_seconds", "sampling_seconds", "num_samples", "device")


def arc_checkpoint(model: str, save_dir: Path, calib: list[str], env: dict) -> Path:
    """End-of-training checkpoint of one ARC fit on ``model`` (run here unless it already exists)."""
    import subprocess

    run_dir = save_dir / "arc" / model
    found = sorted(run_dir.glob("*/version_*/checkpoints/epoch=*.ckpt"))
    if found:
        return found[-1]
    args, _ = cli_args(model, [*calib, "--evaluate_after_fit", "false", "--trainer.callbacks.init_args.save", "false",
                               "--trainer.callbacks.init_args.pack", "false"], "fit")
    print(f"ARC fit for {model} (once; its checkpoint serves every row)", flush=True)
    subprocess.run([sys.executable, "-m", "tca_lightning", *args, "--trainer.logger.init_args.save_dir", str(run_dir)],
                   check=True, cwd=ROOT, env=env)
    found = sorted(run_dir.glob("*/version_*/checkpoints/epoch=*.ckpt"))
    if not found:
        raise RuntimeError(f"the ARC fit for {model} wrote no epoch checkpoint under {run_dir}")
    return found[-1]


def with_group_size(source: Path, group_size: int, target: Path) -> Path:
    """A copy of an ARC checkpoint whose recipe says ``group_size`` (written atomically; kept if present)."""
    if target.is_file():
        return target
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    hparams = ckpt.get("hyper_parameters", {})
    if "recipe" not in hparams:
        raise ValueError(f"{source} holds no ARC recipe in its hyper_parameters: pass a checkpoint written by "
                         "`python -m tca_lightning fit` (runs/.../checkpoints/epoch=*.ckpt)")
    if ckpt.get("tca_finalized"):
        raise ValueError(f"{source} is already finalized; pass the end-of-training checkpoint (epoch=*.ckpt), "
                         "not finalized.ckpt")
    ckpt = copy.deepcopy(ckpt)
    ckpt["hyper_parameters"]["recipe"] = {**hparams["recipe"], "group_size": group_size}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--groups", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--arc-ckpt", nargs="+", default=[], metavar="MODEL=PATH",
                        help="an ARC fit's end-of-training checkpoint per model (else the script runs one)")
    parser.add_argument("--samples", type=int, default=100, help="evaluation samples per row (paired PSNR vs FP)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true", help="write the table from the finished rows, run nothing")
    args = parser.parse_args()

    given = {}
    for item in args.arc_ckpt:
        model, sep, path = item.partition("=")
        if not sep or model not in CONFIGS or not Path(path).is_file():
            parser.error(f"--arc-ckpt {item!r}: expected MODEL=PATH with MODEL in {list(CONFIGS)} and PATH an existing "
                         "epoch=*.ckpt of a fit")
        given[model] = Path(path)
    samples, steps = (32, 10) if args.quick else (args.samples, 50)
    calib = ["--model.init_args.calibration.num_conditions", "16", "--model.init_args.calibration.num_steps", "10",
             "--model.init_args.sampler.num_steps", str(steps), "--trainer.max_epochs", "1"] if args.quick else []
    name = "rgq_table_quick" if args.quick else "rgq_table"
    save_dir = ROOT / "runs" / name
    header = {"date": now(), "machine": machine(threads_per_job(args.jobs)),
              "invocation": "python benchmarks/rgq_table.py " + " ".join(sys.argv[1:])}
    start = time.time()

    def keep(row: dict) -> bool:
        return "group_size" in row and row.get("num_samples") == samples and row.get("steps") == steps

    def write(rows: list[dict]) -> str:
        # one row per (model, G, RGQ), from this invocation and earlier ones
        identity = lambda r: (r["model"], r["group_size"], r["rgq"])  # noqa: E731
        rows = [*rows, *earlier_rows(save_dir, rows, keep, identity=identity)]
        rows = sorted(({**r, "device": accelerator_of(r)} for r in rows),
                      key=lambda r: (r["model"], r["group_size"], not r["rgq"]))
        wall = round(time.time() - start, 1)
        notes = [f"W4A4 (dynamic per-token activation groups, weight groups, FP16 weight scales), embedders and final "
                 f"layer W8A8; {samples} samples x {steps} DDIM/DPM steps; psnr/mse vs the FP model on identical noise",
                 "each model's rows share one ARC calibration (learned under G=32 fake quant, full budget 64 x 25 "
                 "unless --quick); each row re-finalizes it: RGQ on/off, then GPTQ and packing at group size G",
                 "calib_seconds: the finalize step only (statistics, RGQ, GPTQ), not ARC's training",
                 "G=128 does not divide the tiny models' 64-wide layers; G=64 is one group per token there "
                 "(reordering can only matter in fc2, 256 wide)",
                 f"FID/KID on {samples} samples are noisy: read PSNR for the RGQ effect",
                 f"wall time of this invocation: {wall} s"]
        return write_tables(name, "RGQ ablation: group quantization with vs without reordering (TCA-DiT W4A4)",
                            {**header, "wall_seconds": wall}, rows, COLUMNS, notes)

    if args.report:
        print(write([]))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_job(1))}
    runs = []
    for model in args.models:
        source = given.get(model) or arc_checkpoint(model, save_dir, calib, env)
        for group_size in args.groups:
            ckpt = with_group_size(source, group_size, save_dir / "arc" / f"{model}-G{group_size}.ckpt")
            # the checkpoint's hyperparameters (sampler, calibration budget) win over any model override, so a
            # row only sets what the trainer, callbacks and data read; max_epochs = the epochs ARC already ran
            epochs = torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] + 1
            for rgq in (True, False):
                overrides = ["--ckpt_path", str(ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt),
                             "--trainer.max_epochs", str(epochs), "--trainer.callbacks.init_args.rgq", str(rgq).lower(),
                             "--data.init_args.num_samples", str(samples)]
                runs.append((model, overrides, {"group_size": group_size, "rgq": rgq,
                                                "variant": f"G{group_size} {'rgq' if rgq else 'no-rgq'}"}, "fit"))
    rows = run_many(runs, save_dir, args.jobs, on_done=write, fresh=args.fresh, provenance=header)
    print(write(rows))


if __name__ == "__main__":
    main()
