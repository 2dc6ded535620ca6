"""Shared by the benchmark scripts: run one CLI evaluation, describe the machine, write tables."""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import platform
import subprocess
from collections import Counter
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"tiny-dit": "configs/tiny_dit.yaml", "tiny-pixart": "configs/tiny_pixart.yaml"}


BASELINES = ("svdquant", "quarot+gptq", "viditq")  # the strongest baselines of ptq_table.md (FID, PSNR)


def baseline_method(name: str, recipe):
    """A baseline of benchmarks/ptq_table.py by its row name, on ``recipe``."""
    from tca_lightning.methods import GPTQ, QuaRot, SVDQuant, ViDiTQ

    make = {"svdquant": lambda: SVDQuant(recipe), "quarot+gptq": lambda: GPTQ(recipe, base=QuaRot(recipe)),
            "viditq": lambda: ViDiTQ(recipe)}
    if name not in make:
        raise ValueError(f"unknown baseline {name!r}; one of {sorted(make)}")
    return make[name]()


def load_finalized(ckpt: str):
    """The ARC module of a finalized.ckpt with its quantizers frozen, as Finalize left it."""
    from tca_lightning.arc import ARC

    module = ARC.load_from_checkpoint(ckpt, map_location="cpu")
    if not module.finalized:
        raise SystemExit(f"{ckpt} is not a finalized checkpoint (Finalize writes checkpoints/finalized.ckpt)")
    for q in module.qlinears.values():
        q.freeze()
    return module


def baseline_student(module, name: str):
    """A copy of ``module``'s FP teacher quantized with baseline ``name`` on the module's recipe and calibration
    budget (the trajectories are cached, so they are the ones the module calibrated on)."""
    import copy

    from tca_lightning.models.adapters import get_adapter
    from tca_lightning.ptq import quantize_model

    student = get_adapter(copy.deepcopy(module.teacher.transformer), module.caption_encoder)
    quantize_model(student, baseline_method(name, module.recipe), module.sampler, module.calibration,
                   module.hparams.model)
    return student


def machine(threads: int | None = None, accelerator: str | None = None) -> str:
    """CPU model (and GPU, when the runs use one), threads per run, library versions."""
    import torch

    threads = threads or torch.get_num_threads()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
           if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "")
    return f"{gpu}{cpu}, {threads} threads per run, torch {torch.__version__}, Python {platform.python_version()}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cli_args(model: str, overrides: list[str], subcommand: str = "test") -> tuple[list[str], str]:
    """(arguments for ``python -m tca_lightning``, the command as a user would type it)."""
    args = [subcommand, "--config", CONFIGS[model], "--trainer.enable_progress_bar", "false", *overrides]
    return args, "python -m tca_lightning " + " ".join(args)


def run_cli(model: str, overrides: list[str], save_dir: Path, env: dict | None = None,
            subcommand: str = "test") -> tuple[dict, str]:
    """``python -m tca_lightning test`` (or ``fit``) on a model's config plus overrides; returns
    (metrics.json, command)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{model}-", dir=save_dir.mkdir(parents=True, exist_ok=True) or save_dir))
    args, command = cli_args(model, overrides, subcommand)
    subprocess.run([sys.executable, "-m", "tca_lightning", *args, "--trainer.logger.init_args.save_dir", str(run_dir)],
                   cwd=ROOT, check=True, env=env)
    (metrics,) = run_dir.glob("*/version_*/metrics.json")  # a private folder per run: parallel runs cannot mix
    return json.loads(metrics.read_text()), command


def weights_fingerprint(model: str) -> str:
    """Hash of an embedded model's shipped files, so finished runs are redone when the weights change."""
    folder = ROOT / "tca_lightning" / "weights" / model
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def accelerator_of(row: dict) -> str:
    """Where a table row ran: the ``--trainer.accelerator`` of its command (the configs say cpu)."""
    args = row.get("command", "").split()
    return args[args.index("--trainer.accelerator") + 1] if "--trainer.accelerator" in args else "cpu"


def row_identity(row: dict) -> tuple:
    return row.get("model"), row.get("method"), row.get("variant"), row.get("wbits"), row.get("abits"), row.get("seed")


def earlier_rows(save_dir: Path, current: list[dict], keep: Callable[[dict], bool], defaults: str = "",
                 identity: Callable[[dict], tuple] = row_identity) -> list[dict]:
    """Finished rows in ``save_dir/done`` and the committed table from earlier invocations (e.g. on another machine) that ``keep``
    accepts, made under the same ``defaults`` (see run_many), and that the current rows do not replace
    (``identity``: by default the same model, method, variant, bits, seed), so a table can be filled
    piecewise; ``accelerator_of`` says where each ran."""
    have = {identity(r) for r in current}
    found = {}
    for row in [*(json.loads(p.read_text()) for p in sorted((save_dir / "done").glob("*.json"))),
                *committed_rows(save_dir.name)]:
        if row.get("defaults", "") == defaults_tag(defaults) and identity(row) not in have and keep(row):
            found.setdefault(identity(row), row)
    return list(found.values())


def committed_rows(name: str) -> list[dict]:
    """The rows of benchmarks/results/<name>.json: a fresh checkout has no runs/ folder, and a table that
    forgot them would be rewritten with only the rows this checkout ran."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()).get("rows", []) if path.is_file() else []


def at_budget(row: dict, samples: int, steps: int, calib_conditions: int, calib_steps: int) -> bool:
    """Whether a finished row sampled ``samples`` x ``steps`` and calibrated on the given budget (its command
    says), so tables merge only rows measured like their own."""
    command = row.get("command", "") + " "
    return (row.get("num_samples") == samples and row.get("steps") == steps
            and f"calibration.num_conditions {calib_conditions} " in command
            and f"calibration.num_steps {calib_steps} " in command)


def defaults_tag(defaults: str) -> str:
    return hashlib.sha256(defaults.encode()).hexdigest()[:12] if defaults else ""


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def run_many(runs: list[tuple], save_dir: Path, jobs: int = 1,
             on_done: Callable[[list[dict]], None] | None = None, fresh: bool = False,
             defaults: str = "", provenance: dict | None = None) -> list[dict]:
    """Runs (model, overrides, extra row fields[, subcommand]) ``jobs`` at a time, each on
    cpu_count/jobs threads (subcommand: ``test`` unless given, e.g. ``fit`` for TCA-DiT).

    A finished run's row is kept in ``save_dir/done/<key>.json`` (key: model weights, overrides) and
    not run again, so a multi-hour table resumes after an interruption (``fresh`` ignores them; so
    should anyone who changed a method's code). ``defaults`` (e.g. a config's text and a method's default
    settings) joins the key, so changing what the overrides leave implicit reruns the rows.
    ``provenance`` (invocation, machine, date) is stored in each new row, so a table that merges rows
    of several invocations (``earlier_rows``) can say where each came from. ``on_done`` gets the rows
    finished so far (in ``runs`` order) after each run, to write partial tables. A run that fails
    is reported on stderr and left out of the rows (the others go on); rerunning retries it.
    """
    done_dir = save_dir / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_job(jobs))}
    rows: dict[int, dict] = {}
    fingerprints = {model: weights_fingerprint(model) for model in {run[0] for run in runs} if model in CONFIGS}

    def key(model: str, overrides: list[str], subcommand: str) -> str:
        blob = json.dumps([model, fingerprints.get(model, ""), overrides]
                          + ([subcommand] if subcommand != "test" else []) + ([defaults] if defaults else []))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def one(model: str, overrides: list[str], extra: dict, subcommand: str = "test") -> dict:
        path = done_dir / f"{key(model, overrides, subcommand)}.json"
        if path.is_file() and not fresh:
            return json.loads(path.read_text())
        try:
            metrics, command = run_cli(model, overrides, save_dir, env, subcommand)
        except (subprocess.CalledProcessError, ValueError) as err:  # ValueError: no single metrics.json
            print(f"FAILED {model} {' '.join(overrides)} ({subcommand}): {err}", file=sys.stderr, flush=True)
            return None
        row = {**metrics, **extra, "command": command, **({"defaults": defaults_tag(defaults)} if defaults else {}),
               **(provenance or {})}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(row, indent=2))
        os.replace(tmp, path)
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(one, *run): i for i, run in enumerate(runs)}
        for future in as_completed(futures):
            row = future.result()
            if row is None:
                continue
            rows[futures[future]] = row
            if on_done is not None:
                on_done([rows[i] for i in sorted(rows)])
    return [rows[i] for i in sorted(rows)]


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
    sources = Counter((r["invocation"], r.get("machine", "?"), r.get("date", "?")) for r in rows if "invocation" in r)
    if sources:  # rows several invocations (machines) finished
        lines += ["", "Rows by invocation:", ""] + [f"- {n} rows: `{inv}` on {machine}, {date}"
                                                   for (inv, machine, date), n in sources.items()]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows if "command" in r]
    markdown = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(markdown)
    return markdown
