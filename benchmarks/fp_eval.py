"""FP evaluation of the embedded tiny models, written to benchmarks/results/.

    python benchmarks/fp_eval.py                       # full: 1,000 samples, 50 steps, both models
    python benchmarks/fp_eval.py --quick               # 100 samples, same steps
    python benchmarks/fp_eval.py --guidance 1 1.5 2 3  # a guidance sweep (one row per scale)
    python benchmarks/fp_eval.py --seeds 0 1 2         # seed-to-seed spread of every metric
    python benchmarks/fp_eval.py --jobs 2              # two runs side by side

Each row is one ``python -m tca_lightning test`` run (the README's main job); the table records
the exact command, the machine and the library versions next to the numbers.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import CONFIGS, ROOT, machine, now, run_many, threads_per_job, write_tables

COLUMNS = ("model", "scheduler", "steps", "guidance_scale", "seed", "num_samples", "fid", "kid", "is", "cond_acc",
           "sampling_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--guidance", nargs="+", type=float, default=None, help="scales (default: the config's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="sampler noise seeds")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="100 samples")
    parser.add_argument("--accelerator", default=None, help="e.g. gpu on a lent GPU machine (configs say cpu)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, each on cpu_count/jobs threads")
    parser.add_argument("--name", default=None, help="results file stem (default fp_eval / fp_eval_quick)")
    args = parser.parse_args()
    num_samples = 100 if args.quick else args.num_samples
    name = args.name or ("fp_eval_quick" if args.quick else "fp_eval")
    runs, start = [], time.time()
    for model in args.models:
        for guidance in args.guidance or [None]:
            for seed in args.seeds:
                overrides = (["--trainer.accelerator", args.accelerator] if args.accelerator else []) + [
                             "--data.init_args.num_samples", str(num_samples),
                             "--model.init_args.sampler.num_steps", str(args.steps),
                             "--model.init_args.sampler.seed", str(seed)]
                if guidance is not None:
                    overrides += ["--model.init_args.sampler.guidance_scale", str(guidance)]
                runs.append((model, overrides, {}))
    rows = run_many(runs, ROOT / "runs" / "benchmarks", args.jobs, fresh=True)
    header = {"date": now(), "machine": machine(threads_per_job(args.jobs), args.accelerator), "invocation": "python benchmarks/fp_eval.py " + " ".join(sys.argv[1:]),
              "wall_seconds": round(time.time() - start, 1)}
    notes = ["FID/KID on mnist-features' 128-d penultimate features vs the 500 held-out real digits (mnist-heldout); "
             "IS on its class probabilities; cond_acc = share of samples the classifier assigns to the requested digit",
             f"wall time of the whole script: {header['wall_seconds']} s ({args.jobs} runs side by side)"]
    print(write_tables(name, "FP evaluation of the embedded tiny models", header, rows, COLUMNS, notes))


if __name__ == "__main__":
    main()
