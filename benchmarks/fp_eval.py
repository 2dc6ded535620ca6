"""FP evaluation of the embedded tiny models, written to benchmarks/results/.

    python benchmarks/fp_eval.py                       # full: 1,000 samples, 50 steps, both models
    python benchmarks/fp_eval.py --quick               # 100 samples, same steps
    python benchmarks/fp_eval.py --guidance 1 1.5 2 3  # a guidance sweep (one row per scale)

Each row is one ``python -m tca_lightning test`` run (the README's main job); the table records
the exact command, the machine and the library versions next to the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"tiny-dit": "configs/tiny_dit.yaml", "tiny-pixart": "configs/tiny_pixart.yaml"}
COLUMNS = ("model", "scheduler", "steps", "guidance_scale", "num_samples", "fid", "kid", "is", "cond_acc",
           "sampling_seconds")


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def run(model: str, guidance: float | None, num_samples: int, steps: int, save_dir: Path) -> tuple[dict, str]:
    args = ["test", "--config", CONFIGS[model], "--data.init_args.num_samples", str(num_samples),
            "--model.init_args.sampler.num_steps", str(steps),
            "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false"]
    if guidance is not None:
        args += ["--model.init_args.sampler.guidance_scale", str(guidance)]
    command = "python -m tca_lightning " + " ".join(args)
    before = set(save_dir.glob("*/version_*"))
    subprocess.run([sys.executable, "-m", "tca_lightning", *args], cwd=ROOT, check=True)
    new = sorted(set(save_dir.glob("*/version_*")) - before, key=lambda p: p.stat().st_mtime)
    return json.loads((new[-1] / "metrics.json").read_text()), command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--guidance", nargs="+", type=float, default=None, help="scales (default: the config's)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="100 samples")
    parser.add_argument("--name", default=None, help="results file stem (default fp_eval / fp_eval_quick)")
    parser.add_argument("--save-dir", type=Path, default=ROOT / "runs" / "benchmarks")
    args = parser.parse_args()
    num_samples = 100 if args.quick else args.num_samples
    name = args.name or ("fp_eval_quick" if args.quick else "fp_eval")
    rows = []
    start = time.time()
    for model in args.models:
        for guidance in args.guidance or [None]:
            metrics, command = run(model, guidance, num_samples, args.steps, args.save_dir)
            rows.append({**metrics, "model": model, "command": command})
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = {"date": stamp, "machine": machine(), "invocation": "python benchmarks/fp_eval.py " + " ".join(sys.argv[1:]),
              "wall_seconds": round(time.time() - start, 1)}
    (RESULTS / f"{name}.json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# FP evaluation of the embedded tiny models", "",
             f"- produced by `{header['invocation']}` on {stamp}",
             f"- machine: {header['machine']}",
             "- FID/KID on mnist-features' 128-d features vs the 500 held-out real digits; IS on its class "
             "probabilities; cond_acc = share of samples classified as the requested digit", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
