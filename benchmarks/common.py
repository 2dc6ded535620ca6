"""Shared by the benchmark scripts: run one CLI evaluation, describe the machine, write tables."""

from __future__ import annotations

import csv
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"tiny-dit": "configs/tiny_dit.yaml", "tiny-pixart": "configs/tiny_pixart.yaml"}


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_cli(model: str, overrides: list[str], save_dir: Path) -> tuple[dict, str]:
    """``python -m tca_lightning test`` on a model's config plus overrides; returns (metrics.json, command)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{model}-", dir=save_dir.mkdir(parents=True, exist_ok=True) or save_dir))
    args = ["test", "--config", CONFIGS[model], "--trainer.logger.init_args.save_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", *overrides]
    command = "python -m tca_lightning " + " ".join(a for a in args if a != str(run_dir)).replace(
        "--trainer.logger.init_args.save_dir ", "")
    subprocess.run([sys.executable, "-m", "tca_lightning", *args], cwd=ROOT, check=True)
    (metrics,) = run_dir.glob("*/version_*/metrics.json")  # a private folder per run: parallel runs cannot mix
    return json.loads(metrics.read_text()), command


def write_tables(name: str, title: str, header: dict, rows: list[dict], columns: tuple[str, ...],
                 notes: list[str] = ()) -> str:
    """benchmarks/results/<name>.{json,csv,md}; returns the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = [f"# {title}", "", f"- produced by `{header['invocation']}` on {header['date']}",
             f"- machine: {header['machine']}", *[f"- {n}" for n in notes], "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows if "command" in r]
    markdown = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(markdown)
    return markdown
