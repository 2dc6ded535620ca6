"""The baselines side by side: methods x {W8A8, W4A8, W4A4} on tiny-dit and tiny-pixart.

    python benchmarks/ptq_table.py            # full: 1,000 samples, 50 steps, calibration 64 x 25
    python benchmarks/ptq_table.py --quick    # 64 samples, 20 steps, calibration 16 x 10, W4A4 only
    python benchmarks/ptq_table.py --jobs 2   # two runs side by side; rerun the same command to resume
    python benchmarks/ptq_table.py --report   # the table of every row finished so far (any machine), running nothing

Same seeds and noise for every row (sample i uses noise seed i), same recipe (bits, group size,
per-role overrides), same calibration budget. psnr_vs_fp compares with the FP model's images
on identical noise (the FP images are sampled once and cached). Writes
benchmarks/results/ptq_table{,_quick}.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import CONFIGS, ROOT, accelerator_of, at_budget, earlier_rows, machine, now, run_many, threads_per_job, write_tables

Q = "--model.init_args.quantization"
METHODS = {  # row name -> CLI arguments selecting the method
    "rtn": [Q, "tca_lightning.methods.RTN"],
    "smoothquant": [Q, "tca_lightning.methods.SmoothQuant"],
    "quarot": [Q, "tca_lightning.methods.QuaRot"],
    "gptq": [Q, "tca_lightning.methods.GPTQ"],
    "qdit": [Q, "tca_lightning.methods.QDiT"],
    "ptq4dit": [Q, "tca_lightning.methods.PTQ4DiT"],
    "viditq": [Q, "tca_lightning.methods.ViDiTQ"],
    "svdquant": [Q, "tca_lightning.methods.SVDQuant"],
    # GPTQ weights on top of a transform, as QuaRot's paper runs it: the strongest combinations we know
    "smoothquant+gptq": [Q, "tca_lightning.methods.GPTQ", f"{Q}.base", "tca_lightning.methods.SmoothQuant"],
    "quarot+gptq": [Q, "tca_lightning.methods.GPTQ", f"{Q}.base", "tca_lightning.methods.QuaRot"],
}
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
COLUMNS = ("model", "method", "device", "wbits", "abits", "fid", "kid", "is", "cond_acc", "psnr_vs_fp", "mse_vs_fp",
           "calib_seconds", "sampling_seconds", "peak_rss_mb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bits", nargs="+", default=None, choices=list(BITS))
    parser.add_argument("--group-size", type=int, default=32, help="weights and activations, every method")
    parser.add_argument("--accelerator", default=None, help="e.g. gpu on a lent GPU machine (configs say cpu)")
    parser.add_argument("--calibration-device", default=None,
                        help="where baselines calibrate (default: the run's device; e.g. cpu)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, each on cpu_count/jobs threads")
    parser.add_argument("--fresh", action="store_true", help="rerun rows already finished in runs/ptq_table*/done")
    parser.add_argument("--skip-fp", action="store_true",
                        help="no FP rows (e.g. an earlier invocation has them); quantized rows then sample the FP "
                             "reference images themselves unless the reference cache has them")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the table from the rows finished so far (any machine)")
    args = parser.parse_args()
    samples, steps, calib_n, calib_t = (64, 20, 16, 10) if args.quick else (1000, 50, 64, 25)
    bits = args.bits or (["W4A4"] if args.quick else ["W4A4", "W4A8", "W8A8"])  # the separating setting first
    common = ["--data.init_args.num_samples", str(samples), "--model.init_args.sampler.num_steps", str(steps)]
    common += ["--trainer.accelerator", args.accelerator] if args.accelerator else []
    calib = ["--model.init_args.calibration.num_conditions", str(calib_n),
             "--model.init_args.calibration.num_steps", str(calib_t)]
    calib += ["--model.init_args.calibration.device", args.calibration_device] if args.calibration_device else []
    name = "ptq_table_quick" if args.quick else "ptq_table"
    save_dir = ROOT / "runs" / name
    fp_runs = [] if args.skip_fp else [(model, common, {"method": "fp"}) for model in args.models]
    quant_runs = []
    for tag in bits:
        wbits, abits = BITS[tag]
        for model in args.models:
            for method in args.methods:
                recipe = [f"--model.init_args.quantization.recipe.{k}={v}" for k, v in (
                    ("wbits", wbits), ("abits", abits), ("weight_granularity", "group"),
                    ("act_granularity", "group"), ("group_size", args.group_size))]
                quant_runs.append((model, common + calib + METHODS[method] + recipe, {"method": method}))
    start = time.time()
    header = {"date": now(), "machine": "none (--report: each row's machine is listed under 'Rows by invocation')"
              if args.report else machine(threads_per_job(args.jobs), args.accelerator),
              "invocation": "python benchmarks/ptq_table.py " + " ".join(sys.argv[1:])}
    total = len(fp_runs) + len(quant_runs)

    def same_budget(row: dict) -> bool:
        if row.get("method") == "fp":  # no calibration in its command
            return row.get("num_samples") == samples and row.get("steps") == steps
        return (row.get("method") in METHODS and at_budget(row, samples, steps, calib_n, calib_t)
                and f"group_size={args.group_size} " in row["command"] + " ")

    def write(rows: list[dict], fp_rows: list[dict] = ()) -> str:
        rows = [*fp_rows, *rows]
        finished = len(rows)
        rows += earlier_rows(save_dir, rows, same_budget)  # rows other invocations (machines) finished
        rows = [{**r, "device": accelerator_of(r)} for r in rows]
        rows.sort(key=lambda r: (r["model"], r["method"] != "fp", -r["wbits"], -r["abits"]))
        wall = round(time.time() - start, 1)
        notes = [f"{samples} samples, {steps} sampler steps; calibration {calib_n} conditions x {calib_t} steps; "
                 f"weights and activations quantized per group of {args.group_size} (activations dynamic per token)",
                 "embedders and final layer kept at W8A8 for every method (DEFAULT_ROLE_OVERRIDES), as DiT PTQ papers do",
                 "FID/KID vs the 500 held-out real digits on mnist-features; psnr/mse vs the FP model on identical noise",
                 f"{len(rows)} rows" + ("" if args.report else f"; this invocation finished {finished} of its {total} runs"
                                        + ("" if finished == total else " (rerun the same command to resume)")),
                 "device: where each row ran; rows finished by earlier invocations (another machine) are included, "
                 "each compared with the FP images sampled on its own device",
                 f"wall time of this invocation: {wall} s ({args.jobs} runs side by side)"]
        return write_tables(name, "DiT PTQ baselines on the tiny models", {**header, "wall_seconds": wall}, rows,
                            COLUMNS, notes)

    if args.report:
        print(write([]))
        return
    fp_rows = run_many(fp_runs, save_dir, args.jobs, on_done=write, fresh=args.fresh, provenance=header)  # fills the reference cache

    printed: set[int] = set()

    def progress(rows: list[dict]) -> None:
        last = next(r for r in rows if id(r) not in printed)  # the run that just finished
        printed.add(id(last))
        print(f"[{time.time() - start:7.0f}s] {len(rows)}/{len(quant_runs)} {last['model']} {last['method']} "
              f"W{last['wbits']}A{last['abits']}: psnr_vs_fp {last.get('psnr_vs_fp')} fid {last['fid']:.3g} "
              f"cond_acc {last['cond_acc']:.3f}", flush=True)
        write(rows, fp_rows)

    rows = run_many(quant_runs, save_dir, args.jobs, on_done=progress, fresh=args.fresh, provenance=header)
    print(write(rows, fp_rows))


if __name__ == "__main__":
    main()
