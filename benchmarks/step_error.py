"""Where along the trajectory each method's quantization error lands: the relative error of the noise
prediction, ||eps_q - eps||^2 / ||eps||^2, at every calibration step, on the FP model's own x_t.

    python benchmarks/step_error.py --ckpt runs/tca_table/<run>/tiny_pixart/version_0/checkpoints/finalized.ckpt

The TCA-DiT column is the given finalized checkpoint; the baselines (``--methods``) are calibrated here on the
same model, recipe and calibration budget as that checkpoint's (benchmarks/ptq_table.py's setting). Issue 4 asks
why tiny-pixart's TCA-DiT has the best PSNR but not the best FID: output_bias_probe.py --fp-steps-below shows the
FID excess is made at the last, low-noise steps; this table says whether TCA-DiT's error is larger there.
Writes benchmarks/results/step_error.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import BASELINES, baseline_student, load_finalized, machine, now, write_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a finalized.ckpt of a tiny model (fit's Finalize writes it)")
    parser.add_argument("--methods", nargs="*", default=list(BASELINES), choices=BASELINES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", default="step_error", help="results file name under benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    from tca_lightning.data.calibration import calibration_trajectories, output_error_per_step

    module = load_finalized(args.ckpt)
    fp = module.teacher
    traj = calibration_trajectories(fp, module.sampler, module.calibration, module.hparams.model)
    batch = module.calibration.batch_size
    with torch.no_grad():
        errors = {"tca-dit": output_error_per_step(module.adapter, fp, traj, batch)}
        for name in args.methods:
            errors[name] = output_error_per_step(baseline_student(module, name), fp, traj, batch)
            print(name, [round(float(e), 5) for e in errors[name]], flush=True)
    rows = [{"step": s, "timestep": int(t), **{name: round(float(e[s]), 6) for name, e in errors.items()}}
            for s, t in enumerate(traj.timesteps)]
    header = {"date": now(), "machine": machine(args.threads), "wall_seconds": round(time.time() - start, 1),
              "invocation": "python benchmarks/step_error.py " + " ".join(sys.argv[1:]), "checkpoint": args.ckpt}
    notes = [f"model {module.hparams.model}, checkpoint {args.ckpt}; {traj.x.shape[1]} calibration conditions x "
             f"{traj.num_steps} steps, both guidance halves; baselines calibrated on the same trajectories' budget "
             "and the checkpoint's recipe",
             "each cell: ||eps_q - eps_fp||^2 / ||eps_fp||^2 at that step (lower is better)"]
    print(write_tables(args.table, "Relative noise-prediction error per sampler step", header, rows,
                       ("step", "timestep", *errors), notes))


if __name__ == "__main__":
    main()
