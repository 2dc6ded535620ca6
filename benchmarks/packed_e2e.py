"""The tiny models end to end: FP vs fake-quant vs the packed INT4 checkpoint on the integer kernels.

    python benchmarks/packed_e2e.py                          # runs the main job (fit) first, then compares
    python benchmarks/packed_e2e.py --run runs/tiny_dit/version_0      # a finished fit's run folder
    python benchmarks/packed_e2e.py --run DIR --samples 50 --steps 20  # smaller

A ``fit`` run folder holds both forms of the calibrated model: ``checkpoints/finalized.ckpt`` (fake
quantization: FP32 weights on the INT grid, activations quantized and dequantized in FP32) and
``quantized/`` (packed INT4 weights + FP16 scales, run through ``tca_lightning.kernels``). All three
models sample the same conditions from the same noise; the table gives each one's sampling time
(ratio to FP) and the PSNR between their images: packed vs fake-quant says whether the real
low-bit model reproduces what the quality tables measured. Writes
benchmarks/results/packed_e2e.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, machine, now, write_tables

COLUMNS = ("model", "form", "kernels", "samples", "steps", "sampling_seconds", "time_vs_fp", "psnr_vs_fp",
           "psnr_vs_fake_quant", "weight_mb", "threads")


def run_main_job(config: str, save_dir: Path) -> Path:
    """``python -m tca_lightning fit --config <config>`` (the README's main job); returns its run folder."""
    before = set(save_dir.glob("*/version_*"))
    subprocess.run([sys.executable, "-m", "tca_lightning", "fit", "--config", config,
                    "--trainer.logger.init_args.save_dir", str(save_dir)], cwd=ROOT, check=True)
    (run,) = set(save_dir.glob("*/version_*")) - before
    return run


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Over the whole image set, images in [0, 1]."""
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def weight_mb(module: torch.nn.Module) -> float:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def load_forms(run: Path):
    """(model name, sampler config, scheduler config, vae, {form: (adapter, kernels)}) from a fit run folder."""
    from tca_lightning.arc import ARC
    from tca_lightning.export import load_quantized
    from tca_lightning.models.adapters import get_adapter

    ckpt, packed = run / "checkpoints" / "finalized.ckpt", run / "quantized"
    for path in (ckpt, packed / "quantized.json"):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: --run must be the folder of a finished `fit` "
                             "(with the Finalize callback's pack=true, the default)")
    module = ARC.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    module.eval()
    for q in module.qlinears.values():
        q.freeze()
    fp = get_adapter(module.reference_model, module.caption_encoder)
    forms = {"fp": (fp, "fp32"), "fake-quant": (module.adapter, "fp32 fake quant"),
             "packed": (get_adapter(load_quantized(packed).eval(), module.caption_encoder), "integer")}
    return module.hparams.model, module.sampler, module.scheduler_config, module.vae, forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="a finished fit's run folder (default: run the main job)")
    parser.add_argument("--config", default="configs/tiny_dit.yaml", help="the fit to run when --run is not given")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    args = parser.parse_args()
    run = args.run or run_main_job(args.config, ROOT / "runs" / "packed_e2e")

    from tca_lightning.data.conditions import batch_condition, condition_batch
    from tca_lightning.models.samplers import decode, sample

    model, sampler, scheduler_config, vae, forms = load_forms(run)
    if args.steps:
        sampler = dataclasses.replace(sampler, num_steps=args.steps)
    images: dict[str, list[torch.Tensor]] = {form: [] for form in forms}
    seconds = dict.fromkeys(forms, 0.0)
    for offset in range(0, args.samples, args.batch_size):
        batch = condition_batch(min(args.batch_size, args.samples - offset), offset=offset)
        for form, (adapter, _) in forms.items():
            start = time.perf_counter()
            x0 = sample(adapter, batch_condition(adapter, batch), batch["index"], sampler, scheduler_config)
            images[form].append(decode(x0, vae))
            seconds[form] += time.perf_counter() - start
        print(f"{offset + len(batch['index'])}/{args.samples} samples: "
              + ", ".join(f"{f} {s:.1f} s" for f, s in seconds.items()), flush=True)
    stacked = {form: torch.cat(v) for form, v in images.items()}
    rows = [{"model": model, "form": form, "kernels": kernels, "samples": args.samples, "steps": sampler.num_steps,
             "sampling_seconds": round(seconds[form], 2), "time_vs_fp": seconds[form] / seconds["fp"],
             "psnr_vs_fp": psnr(stacked[form], stacked["fp"]),
             "psnr_vs_fake_quant": psnr(stacked[form], stacked["fake-quant"]),
             "weight_mb": weight_mb(adapter.transformer), "threads": torch.get_num_threads()}
            for form, (adapter, kernels) in forms.items()]
    record = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    header = {"date": now(), "machine": machine(torch.get_num_threads()),
              "invocation": "python benchmarks/packed_e2e.py " + " ".join(sys.argv[1:]), "run": str(run),
              "fit_metrics": record}
    notes = [f"run folder: {run} (fit's own evaluation: PSNR vs FP {record.get('psnr_vs_fp', 'n/a')} dB on "
             f"{record.get('num_samples', '?')} samples)",
             "fake-quant: the finalized checkpoint as fit evaluated it (FP32 weights on the INT grid, activations "
             "quantized-dequantized); packed: quantized/ through tca_lightning.kernels (INT4 weights, FP16 scales, "
             "integer dots); the two differ by the FP16 rounding of the scales",
             "time_vs_fp: sampling time / the FP model's, measured in this run on the same samples",
             "weight_mb: parameters + buffers of the transformer as held in memory"]
    print(write_tables("packed_e2e", "Tiny models end to end: FP, fake-quant and the packed INT4 model", header,
                       rows, COLUMNS, notes))


if __name__ == "__main__":
    main()
