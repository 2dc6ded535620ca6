"""TCA-DiT (``fit``) on the tiny models, with the ablations of issue 4, in the baselines' setting.

    python benchmarks/tca_table.py                 # full: 1,000 samples, 50 steps, W4A4 + W4A8 + ablations
    python benchmarks/tca_table.py --quick         # 64 samples, 20 steps, calibration 16 x 10, W4A4 only
    python benchmarks/tca_table.py --jobs 2        # two runs side by side; rerun the same command to resume
    python benchmarks/tca_table.py --seeds 0 1 2   # the main W4A4 rows on three sampling seeds (FID spread):
                                                   # seeds other than 0 re-sample seed 0's finalized checkpoint
    python benchmarks/tca_table.py --report        # the table of every row finished so far (any machine), running nothing

Every row is ``python -m tca_lightning fit --config configs/<model>.yaml`` plus overrides: the same
recipe (groups of 32, embedders and final layer W8A8), calibration budget (64 conditions x 25
steps), sampler and noise as benchmarks/ptq_table.py, so its rows compare with the baselines'.
Ablations at W4A4: (a) no alignment loss, (b) fixed randomized Hadamard instead of a learned
rotation, (c) no scaling, (d) uniform-K and all-T timesteps instead of ATG. Writes
benchmarks/results/tca_table{,_quick}.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import CONFIGS, ROOT, accelerator_of, at_budget, earlier_rows, machine, now, run_many, threads_per_job, write_tables

A = "--model.init_args.arc."
ABLATIONS = {
    "tca-dit": [],
    "no-align (a)": [A + "lambda_align=0.0"],
    "fixed-hadamard (b)": [A + "learn_rotation=false", A + "rotation_init=hadamard"],
    "no-scale (c)": [A + "scale=false"],
    "uniform-K (d)": ["--data.init_args.selection=uniform"],
    "all-T (d)": ["--data.init_args.selection=all"],
}
TUNING = {  # how the defaults were chosen (run with --variants; not part of the default table)
    "align-0.01": [A + "lambda_align=0.01"],
    "align-0.03": [A + "lambda_align=0.03"],
    "scale-ones": [A + "scale_init=ones"],
    "align-0.01 scale-ones": [A + "lambda_align=0.01", A + "scale_init=ones"],
    "no-align scale-ones": [A + "lambda_align=0.0", A + "scale_init=ones"],
    "lr-1e-3": [A + "lr=0.001"],
    "fp-weights": [A + "fake_quant_weights=false"],
    "no-align fp-weights": [A + "lambda_align=0.0", A + "fake_quant_weights=false"],
    "epochs-16": ["--trainer.max_epochs=16"],
    "rtn-weights": ["--trainer.callbacks.init_args.gptq=false"],  # finalize rounds weights instead of GPTQ
    "no-rgq": ["--trainer.callbacks.init_args.rgq=false"],
    "no-align epochs-16": [A + "lambda_align=0.0", "--trainer.max_epochs=16"],
    "guided-1": [A + "lambda_guided=1.0"],  # the guided-update reconstruction term (tiny-pixart's FID gap)
    "output-1": [A + "lambda_output=1.0"],  # the whole-model output term
    "on-policy": ["--trainer.callbacks+=tca_lightning.callbacks.OnPolicyStates",  # epochs 2-3 on the student's states
                  "--trainer.callbacks.start_epoch=2"],
    "lowrank-fc1": ["--trainer.callbacks.init_args.pack=false", "--trainer.callbacks.init_args.lowrank_rank=32",
                    "--trainer.callbacks.init_args.lowrank_roles=[fc1]"],  # SVDQuant's FP branch on fc1 (finalize)
    "lowrank-all": ["--trainer.callbacks.init_args.pack=false", "--trainer.callbacks.init_args.lowrank_rank=32"],
    "arc-lowrank-fc1": [A + "lowrank_rank=32", A + "lowrank_roles=[fc1]"],  # learned with the branch (Finalize adds it)
    "arc-lowrank-all": [A + "lowrank_rank=32"],
    "stats-all": ["--trainer.callbacks.init_args.stats_steps=all"],  # RGQ/GPTQ statistics at every step, ARC on ATG's
    "stats-all w4a8": ["--model.init_args.recipe.abits=8", "--trainer.callbacks.init_args.stats_steps=all"],
    # the main recipe on other calibration data and rotation seeds: the spread a single calibration has
    "calib-seed-1": ["--model.init_args.calibration.seed=1001", A + "seed=1"],
    "calib-seed-2": ["--model.init_args.calibration.seed=1002", A + "seed=2"],
    "debias-gelu": ["--trainer.callbacks.init_args.debias_gelu=true"],  # fc1's GELU debiased (quant/debias.py)
    "lowrank-fc1 debias-gelu": ["--trainer.callbacks.init_args.pack=false", "--trainer.callbacks.init_args.lowrank_rank=32",
                                "--trainer.callbacks.init_args.lowrank_roles=[fc1]",
                                "--trainer.callbacks.init_args.debias_gelu=true"],
    "on-policy output-1": ["--trainer.callbacks+=tca_lightning.callbacks.OnPolicyStates",
                           "--trainer.callbacks.start_epoch=2", A + "lambda_output=1.0"],
}
COLUMNS = ("model", "method", "variant", "device", "wbits", "abits", "seed", "fid", "kid", "is", "cond_acc", "psnr_vs_fp",
           "calib_seconds", "calib_groups", "sampling_seconds", "peak_rss_mb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(ABLATIONS), choices=[*ABLATIONS, *TUNING])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="sampling seeds of the main W4A4 rows")
    parser.add_argument("--accelerator", default=None, help="e.g. gpu on a lent GPU machine (configs say cpu)")
    parser.add_argument("--w4a8", action=argparse.BooleanOptionalAction, default=True,
                        help="the W4A8 row of each model (full budget only)")
    parser.add_argument("--main", action=argparse.BooleanOptionalAction, default=True,
                        help="the W4A4 TCA-DiT calibration row of each model (--no-main: only W4A8 and the variants, "
                             "e.g. on a GPU when the main rows were run on the CPU: the device joins a row's key)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="write the table from the rows finished so far (e.g. on a GPU machine), run nothing")
    args = parser.parse_args()
    samples, steps, calib_n, calib_t = (64, 20, 16, 10) if args.quick else (1000, 50, 64, 25)
    common = ["--data.init_args.num_samples", str(samples), "--model.init_args.sampler.num_steps", str(steps),
              "--model.init_args.calibration.num_conditions", str(calib_n),
              "--model.init_args.calibration.num_steps", str(calib_t)]
    common += ["--trainer.accelerator", args.accelerator] if args.accelerator else []
    runs = []
    for model in args.models:  # the calibration row (sampling seed 0); other seeds re-sample its checkpoint
        if args.main:
            runs.append((model, common + ["--model.init_args.sampler.seed", "0"], {"variant": "tca-dit"}, "fit"))
        if not args.quick and args.w4a8:
            runs.append((model, common + ["--model.init_args.recipe.abits=8"], {"variant": "tca-dit"}, "fit"))
        for variant in args.variants:
            if variant != "tca-dit":
                runs.append((model, common + {**ABLATIONS, **TUNING}[variant], {"variant": variant}, "fit"))
    name = "tca_table_quick" if args.quick else "tca_table"
    start = time.time()
    header = {"date": now(), "machine": "none (--report: each row's machine is listed under 'Rows by invocation')"
              if args.report else machine(threads_per_job(args.jobs), args.accelerator),
              "invocation": "python benchmarks/tca_table.py " + " ".join(sys.argv[1:])}

    # rows depend on what the overrides leave implicit: ARC's defaults and the configs
    defaults = arc_defaults() + "".join((ROOT / c).read_text() for c in CONFIGS.values())
    save_dir = ROOT / "runs" / name

    def same_budget(row: dict) -> bool:
        return "variant" in row and at_budget(row, samples, steps, calib_n, calib_t)

    def write(rows: list[dict]) -> str:
        finished = len(rows)
        rows = [*rows, *earlier_rows(save_dir, rows, same_budget, defaults)]  # other invocations' rows
        order = [*ABLATIONS, *TUNING]
        rows = sorted(({**r, "device": accelerator_of(r)} for r in rows), key=lambda r: (
            r["model"], r.get("abits", 4), order.index(r["variant"]) if r["variant"] in order else len(order),
            r.get("seed", 0)))
        wall = round(time.time() - start, 1)
        notes = [f"{samples} samples, {steps} sampler steps; calibration {calib_n} conditions x {calib_t} steps "
                 "(the baselines' budget, benchmarks/ptq_table.py); W4A4/W4A8 in groups of 32, embedders and final "
                 "layer W8A8", "psnr/mse vs the FP model on identical noise; FID/KID vs the 500 held-out digits",
                 f"{len(rows)} rows" + ("" if args.report else f"; this invocation finished {finished} of its {len(runs)} runs"),
                 "device: where each row ran", f"wall time of this invocation: {wall} s"]
        return write_tables(name, "TCA-DiT and its ablations on the tiny models", {**header, "wall_seconds": wall},
                            rows, COLUMNS, notes)

    if args.report:
        print(write([]))
        return
    rows = run_many(runs, save_dir, args.jobs, on_done=write, fresh=args.fresh, defaults=defaults, provenance=header)
    reseeds = seed_runs(args.models, [s for s in args.seeds if s != 0], [*rows, *earlier_rows(
        save_dir, rows, same_budget, defaults)], common, save_dir)
    if reseeds:
        rows += run_many(reseeds, save_dir, args.jobs, on_done=lambda new: write([*rows, *new]), fresh=args.fresh,
                         defaults=defaults, provenance=header)
    print(write(rows))


# ARC settings that leave results as they were at their defaults (checkpoint_blocks: the same gradients;
# lambda_guided=0, lambda_output=0: the term is off): left out of the rows' key, so adding them kept the finished rows.
RESULT_NEUTRAL = {"checkpoint_blocks": False, "lambda_guided": 0.0, "lambda_output": 0.0, "lowrank_rank": 0,
                  "lowrank_roles": None}


def arc_defaults() -> str:
    """ARCConfig's defaults as its repr, without the result-neutral fields at their neutral values."""
    import dataclasses

    from tca_lightning.arc import ARCConfig

    config = ARCConfig()
    shown = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
             if RESULT_NEUTRAL.get(f.name, object()) != getattr(config, f.name)]
    return f"ARCConfig({', '.join(shown)})"


def finalized_checkpoint(row: dict, save_dir: Path) -> Path | None:
    """The finalized.ckpt of the fit that produced ``row``: its run folder holds the same metrics.json."""
    for metrics in sorted(save_dir.glob(f"{row['model']}-*/*/version_*/metrics.json")):
        found = json.loads(metrics.read_text())
        if all(found.get(k) == row.get(k) for k in ("fid", "psnr_vs_fp", "seed", "num_samples")):
            ckpt = metrics.parent / "checkpoints" / "finalized.ckpt"
            return ckpt if ckpt.is_file() else None
    return None


def seed_runs(models: list[str], seeds: list[int], rows: list[dict], common: list[str], save_dir: Path) -> list[tuple]:
    """``test`` runs of each model's seed-0 TCA-DiT W4A4 calibration (its finalized checkpoint) on other
    sampling seeds: the seed-to-seed spread of FID is sampling noise, so the calibration is not redone."""
    runs = []
    for model in models if seeds else []:
        base = [r for r in rows if r["model"] == model and r.get("variant") == "tca-dit" and r.get("abits") == 4
                and r.get("seed", 0) == 0 and " fit " in r.get("command", "")]
        ckpt = finalized_checkpoint(base[0], save_dir) if base else None
        if ckpt is None or not ckpt.is_file():
            print(f"seeds {seeds} of {model}: its seed-0 calibration's finalized checkpoint is not on this machine "
                  f"({ckpt or 'no seed-0 row yet'}); run the seed-0 row here first", file=sys.stderr, flush=True)
            continue
        for seed in seeds:
            runs.append((model, common + ["--ckpt_path", str(ckpt), "--model.init_args.sampler.seed", str(seed)],
                         {"variant": "tca-dit", "calibrated_by": base[0]["command"]}, "test"))
    return runs


if __name__ == "__main__":
    main()
