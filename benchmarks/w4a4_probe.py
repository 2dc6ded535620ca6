"""A fast W4A4 probe: PSNR vs FP of a few samples for the baselines and ARC variants.

    python benchmarks/w4a4_probe.py --model tiny-dit                    # 40 samples, 20 DDIM steps
    python benchmarks/w4a4_probe.py --model tiny-dit --arc-epochs 0 6   # ARC at init and after 6 epochs

Minutes instead of the hour a full table takes: for deciding what to try next, not for claims.
Same recipe for all rows (W4A4, weights and activations per group of 32, embedders/final W8A8),
same calibration trajectories (16 conditions x 20 steps), same evaluation noise.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import lightning as L
import torch

from common import machine, now, write_tables
from tca_lightning.arc import ARC, ARCConfig
from tca_lightning.data.atg_datamodule import ATGDataModule
from tca_lightning.data.conditions import batch_condition, condition_batch
from tca_lightning.methods import RTN, PTQ4DiT, QuantRecipe, QuaRot, SmoothQuant, SVDQuant, ViDiTQ
from tca_lightning.models import samplers
from tca_lightning.models.adapters import get_adapter
from tca_lightning.models.loading import load_model
from tca_lightning.ptq import CalibrationConfig, calibration_statistics

BASELINES = {m.name: m for m in (RTN, SmoothQuant, QuaRot, PTQ4DiT, ViDiTQ, SVDQuant)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-dit")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--arc-epochs", nargs="*", type=int, default=[0, 6])
    parser.add_argument("--arc-lr", type=float, default=5e-3)
    parser.add_argument("--lambda-align", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sampler = samplers.SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance)
    recipe = QuantRecipe(wbits=4, abits=4, weight_granularity="group", act_granularity="group", group_size=32)
    batch = condition_batch(args.samples)
    calib = CalibrationConfig(num_conditions=16, num_steps=args.steps)

    def images(adapter):
        cond = batch_condition(adapter, batch)
        return samplers.decode(samplers.sample(adapter, cond, batch["index"], sampler))

    fp = load_model(args.model)
    fp_adapter = get_adapter(fp.transformer, fp.caption_encoder)
    reference = images(fp_adapter)
    stats = calibration_statistics(fp_adapter, sampler, calib, args.model)
    rows = []

    def record(method, adapter, seconds, **extra):
        psnr = float(10 * torch.log10(1 / (images(adapter) - reference).pow(2).mean()))
        rows.append({"model": args.model, "method": method, "psnr_vs_fp": round(psnr, 2),
                     "calib_seconds": round(seconds, 1), **extra})
        print(rows[-1], flush=True)

    for name in args.baselines:
        start = time.perf_counter()
        adapter = get_adapter(copy.deepcopy(fp.transformer), fp.caption_encoder)
        BASELINES[name](recipe).quantize(adapter, stats)
        record(name, adapter, time.perf_counter() - start)
    for epochs in args.arc_epochs:
        start = time.perf_counter()
        module = ARC(model=args.model, recipe=recipe, arc=ARCConfig(lr=args.arc_lr, lambda_align=args.lambda_align),
                     sampler=sampler, calibration=calib, reference_cache=None)
        data = ATGDataModule(k=5, calib_batch_size=16)
        L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False).fit(module, data)
        for q in module.qlinears.values():
            q.freeze()
        record(f"arc (epochs {epochs}, lr {args.arc_lr}, lambda {args.lambda_align})", module.adapter,
               time.perf_counter() - start)
    header = {"date": now(), "machine": machine(), "invocation": "python benchmarks/w4a4_probe.py " + " ".join(sys.argv[1:])}
    notes = [f"{args.samples} samples, {args.steps} DDIM steps, guidance {args.guidance}; PSNR vs the FP model on "
             "identical noise; a probe, not the full table"]
    name = f"w4a4_probe_{args.model.replace('/', '_').replace(':', '_')}"
    print(write_tables(name, "W4A4 probe", header, rows, ("model", "method", "psnr_vs_fp", "calib_seconds"), notes))


if __name__ == "__main__":
    main()
