"""Time and memory of one ARC calibration step at the real architectures' full size (random weights).

    python benchmarks/arc_step.py                              # DiT-XL/2 256 and 512, PixArt-alpha 512, on the CPU
    python benchmarks/arc_step.py --accelerator gpu            # the same on a GPU (peak = torch.cuda.max_memory_allocated)
    python benchmarks/arc_step.py --archs dit-xl-2-256 --layers 4 --batch 2   # a quick look

Each row is one process: ARC (TCA-DiT's LightningModule) over ``random:<arch>`` with the configs' recipe
(W4A4, groups of 128), its transforms built, then ``--steps`` training steps (teacher capture, every block's
fake-quant forward, reconstruction + alignment loss, backward, AdamW) on a batch of ``--batch`` items with
classifier-free guidance (2x the rows), with and without ``arc.checkpoint_blocks``. Reports seconds per
step (after one warm-up step) and, on a GPU, the step's peak memory above what the models and optimizer
state hold (the allocator's peak minus its allocation before the step). On the CPU memory is left out: RSS
keeps what glibc's allocator freed, so a peak-minus-before there measures the allocator, not the step.
Writes benchmarks/results/arc_step.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import ROOT, machine, now, write_tables

ARCHS = {"dit-xl-2-256": 256, "dit-xl-2-512": 1024, "pixart-alpha-512": 1024}  # tokens per image
COLUMNS = ("arch", "device", "layers", "tokens", "batch", "checkpoint_blocks", "seconds_per_step",
           "step_peak_gb", "models_gb", "params_m")


def one_row(arch: str, layers: int, batch: int, checkpoint: bool, steps: int, device: str) -> dict:
    """Runs in its own process (peak RSS is per process)."""
    import torch

    from tca_lightning.arc import ARC, ARCConfig
    from tca_lightning.methods.base import QuantRecipe

    torch.manual_seed(0)
    recipe = QuantRecipe(wbits=4, abits=4, weight_granularity="group", act_granularity="group", group_size=128,
                         role_overrides={"embedders": {"wbits": 8, "abits": 8}, "final": {"wbits": 8, "abits": 8}})
    pixart = arch.startswith("pixart")
    module = ARC(model=f"random:{arch}", model_config={"num_layers": layers}, recipe=recipe,
                 arc=ARCConfig(checkpoint_blocks=checkpoint), real_images=None, reference_cache=None,
                 sampler={"scheduler": "dpm-solver" if pixart else "ddpm", "guidance_scale": 4.5 if pixart else 1.5},
                 text_encoder="hashed" if pixart else None, text_encoder_cache=None)
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer: nothing to log to
    module.build(None)
    module.to(device)
    optimizer = module.configure_optimizers()
    size = module.adapter.config.sample_size
    g = torch.Generator().manual_seed(0)
    item = {"x": torch.randn(batch, 4, size, size, generator=g), "timestep": torch.full((batch,), 500),
            "weight": torch.full((batch,), 1.0 / batch), "group": torch.arange(batch) % 2}
    if pixart:
        cond = module.adapter.encode_captions([f"a photo of object {i}" for i in range(batch)])
        item.update(tokens=cond.tokens, mask=cond.mask)
    else:
        item["labels"] = torch.arange(batch) % 1000
    item = {k: v.to(device) for k, v in item.items()}
    cuda = device.startswith("cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        module.training_step(item, 0).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: allocator, parametrization caches, AdamW state
    before = torch.cuda.memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    params = sum(p.numel() for p in module.transformer.parameters()) / 1e6
    return {"arch": arch, "device": torch.cuda.get_device_name() if cuda else "cpu", "layers": layers,
            "tokens": ARCHS[arch], "batch": batch, "checkpoint_blocks": checkpoint,
            "seconds_per_step": round(seconds, 2), "step_peak_gb": round(peak - before, 2) if cuda else None,
            "models_gb": round(before, 2) if cuda else None, "params_m": round(params, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--layers", type=int, default=28, help="transformer blocks (28: the real depth)")
    parser.add_argument("--batch", type=int, default=2, help="calibration items per step (x2 with guidance)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print it as JSON
    args = parser.parse_args()
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if args.row:
        arch, checkpoint = args.row.split(",")
        print(json.dumps(one_row(arch, args.layers, args.batch, checkpoint == "1", args.steps, device)))
        return
    import torch

    rows, start = [], time.time()
    header = {"date": now(), "machine": machine(torch.get_num_threads(), args.accelerator),
              "invocation": "python benchmarks/arc_step.py " + " ".join(sys.argv[1:])}
    notes = ["random weights at the real widths (1152, 16 heads); W4A4 groups of 128, embedders/final W8A8; "
             "classifier-free guidance doubles the rows of a step",
             "step_peak_gb (GPU only): peak memory of a training step above what the models (teacher, student, "
             "optimizer state) hold, from the CUDA allocator; a row that ran out of memory is missing (see the log)",
             "the step's time and memory grow linearly with batch; calibration = items x epochs / batch steps"]
    for arch in args.archs:
        for checkpoint in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--row", f"{arch},{checkpoint}", "--layers", str(args.layers),
                                  "--batch", str(args.batch), "--steps", str(args.steps), "--accelerator",
                                  args.accelerator], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"FAILED {arch} checkpoint={checkpoint}: {out.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            # after every row: a run cut short by a time limit keeps what it measured
            markdown = write_tables("arc_step", "ARC calibration step at full size",
                                    {**header, "wall_seconds": round(time.time() - start, 1)}, rows, COLUMNS, notes)
    print(markdown if rows else "no rows")


if __name__ == "__main__":
    main()
