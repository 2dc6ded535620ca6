"""benchmarks/common.run_many: the multi-hour tables resume instead of starting over."""

from __future__ import annotations

import importlib.util
import json
import threading

import pytest


def load_benchmark(repo_root, monkeypatch, name: str):
    """A fresh copy of benchmarks/<name>.py (its own imports resolved from benchmarks/)."""
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", repo_root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def common(repo_root, monkeypatch):
    module = load_benchmark(repo_root, monkeypatch, "common")
    calls, lock = [], threading.Lock()

    def fake_run_cli(model, overrides, save_dir, env=None, subcommand="test"):
        with lock:
            calls.append((model, tuple(overrides), env["OMP_NUM_THREADS"], subcommand))
        return {"model": model, "value": len(overrides)}, f"python -m tca_lightning {subcommand} " + " ".join(overrides)

    monkeypatch.setattr(module, "run_cli", fake_run_cli)
    module.calls = calls
    return module


RUNS = [("tiny-dit", ["--a", "1"], {"method": "fp"}), ("tiny-dit", ["--a", "2"], {}), ("tiny-pixart", ["--b"], {})]


def test_rows_come_back_in_run_order_with_their_extra_fields(common, tmp_path):
    seen = []
    rows = common.run_many(RUNS, tmp_path, jobs=2, on_done=lambda partial: seen.append(len(partial)))
    assert [r["value"] for r in rows] == [2, 2, 1] and rows[0]["method"] == "fp" and "method" not in rows[1]
    assert seen == [1, 2, 3]
    assert len(common.calls) == 3 and {c[2] for c in common.calls} == {str(common.threads_per_job(2))}


def test_finished_runs_are_not_run_again_unless_fresh(common, tmp_path):
    common.run_many(RUNS, tmp_path)
    assert len(common.calls) == 3
    rows = common.run_many(RUNS, tmp_path)
    assert len(common.calls) == 3 and [r["value"] for r in rows] == [2, 2, 1]
    common.run_many(RUNS[:1], tmp_path, fresh=True)
    assert len(common.calls) == 4
    assert all(json.loads(p.read_text())["command"].startswith("python -m") for p in (tmp_path / "done").glob("*.json"))


def test_changed_weights_invalidate_finished_runs(common, tmp_path, monkeypatch):
    common.run_many(RUNS[:1], tmp_path)
    monkeypatch.setattr(common, "weights_fingerprint", lambda model: "retrained")
    common.run_many(RUNS[:1], tmp_path)
    assert len(common.calls) == 2


def test_fit_runs_are_their_own_rows(common, tmp_path):
    common.run_many([RUNS[0], (*RUNS[0], "fit")], tmp_path)
    assert sorted(c[3] for c in common.calls) == ["fit", "test"]
    assert len(list((tmp_path / "done").glob("*.json"))) == 2


def test_a_failing_run_is_reported_and_skipped_then_retried(common, tmp_path, monkeypatch, capsys):
    import subprocess

    working = common.run_cli

    def flaky(model, overrides, *args, **kwargs):
        if model == "tiny-pixart":
            raise subprocess.CalledProcessError(1, ["python", "-m", "tca_lightning"])
        return working(model, overrides, *args, **kwargs)

    monkeypatch.setattr(common, "run_cli", flaky)
    rows = common.run_many(RUNS, tmp_path, jobs=2)
    assert [r["value"] for r in rows] == [2, 2]  # the two others still ran and were kept
    assert "FAILED tiny-pixart --b" in capsys.readouterr().err
    monkeypatch.setattr(common, "run_cli", working)
    rows = common.run_many(RUNS, tmp_path)
    assert [r["value"] for r in rows] == [2, 2, 1] and common.calls[-1][0] == "tiny-pixart"  # only it reran
    assert len(common.calls) == 3


def test_rows_another_invocation_finished_fill_a_table_without_replacing_the_current_ones(common, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    gpu = {"model": "tiny-dit", "method": "gptq", "wbits": 4, "abits": 4, "psnr_vs_fp": 20.0,
           "command": "python -m tca_lightning test --trainer.accelerator gpu --x"}
    (done / "a.json").write_text(json.dumps(gpu))
    (done / "b.json").write_text(json.dumps({**gpu, "method": "rtn", "psnr_vs_fp": 19.0}))
    (done / "c.json").write_text(json.dumps({**gpu, "method": "svdquant", "wbits": 8}))
    current = [{**gpu, "psnr_vs_fp": 21.0, "command": "python -m tca_lightning test --x"}]
    rows = common.earlier_rows(tmp_path, current, keep=lambda r: r["wbits"] == 4)
    assert [(r["method"], r["psnr_vs_fp"]) for r in rows] == [("rtn", 19.0)]  # gptq is current; W8 not kept
    assert common.accelerator_of(rows[0]) == "gpu" and common.accelerator_of(current[0]) == "cpu"


def test_changed_defaults_rerun_rows_and_hide_the_old_ones(common, tmp_path):
    common.run_many(RUNS[:1], tmp_path, defaults="lambda 0.1")
    common.run_many(RUNS[:1], tmp_path, defaults="lambda 0.1")
    assert len(common.calls) == 1
    rows = common.run_many(RUNS[:1], tmp_path, defaults="lambda 0.01")
    assert len(common.calls) == 2  # what the overrides leave implicit changed: the row is redone
    assert common.earlier_rows(tmp_path, [], keep=lambda r: True, defaults="lambda 0.01") == rows
    assert common.earlier_rows(tmp_path, rows, keep=lambda r: True, defaults="lambda 0.01") == []


def test_a_fresh_checkout_keeps_the_committed_rows(common, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    committed = {"model": "tiny-dit", "method": "gptq", "wbits": 4, "abits": 4, "seed": 0, "psnr_vs_fp": 20.0}
    (tmp_path / "results" / "table.json").write_text(json.dumps({"rows": [committed, {**committed, "wbits": 8}]}))
    save_dir = tmp_path / "table"  # no runs/table/done: nothing ran in this checkout
    assert common.earlier_rows(save_dir, [], keep=lambda r: r["wbits"] == 4) == [committed]
    (save_dir / "done").mkdir(parents=True)
    (save_dir / "done" / "a.json").write_text(json.dumps({**committed, "psnr_vs_fp": 21.0}))
    rows = common.earlier_rows(save_dir, [], keep=lambda r: True)
    assert [r["psnr_vs_fp"] for r in rows] == [21.0, 20.0]  # a row finished here replaces its committed twin
    assert common.earlier_rows(save_dir, [committed], keep=lambda r: True, defaults="other") == []


def test_rows_remember_the_invocation_that_made_them(common, tmp_path, monkeypatch):
    made_by = {"invocation": "python benchmarks/ptq_table.py --accelerator gpu", "machine": "H100", "date": "today"}
    common.run_many(RUNS[:1], tmp_path, provenance=made_by)
    rows = common.run_many(RUNS[:1], tmp_path, provenance={"invocation": "later", "machine": "CPU", "date": "later"})
    assert {k: rows[0][k] for k in made_by} == made_by  # a resumed row keeps where it was made
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    markdown = common.write_tables("t", "T", {"invocation": "x", "date": "d", "machine": "m"}, rows, ("model",))
    assert "1 rows: `python benchmarks/ptq_table.py --accelerator gpu` on H100, today" in markdown


@pytest.fixture
def tca_table(repo_root, monkeypatch):
    return load_benchmark(repo_root, monkeypatch, "tca_table")


def test_other_sampling_seeds_resample_the_seed_0_calibration_instead_of_refitting(tca_table, tmp_path, capsys):
    fit = {"model": "tiny-dit", "variant": "tca-dit", "abits": 4, "seed": 0, "fid": 2.5, "psnr_vs_fp": 24.0,
           "num_samples": 1000, "command": "python -m tca_lightning fit --config configs/tiny_dit.yaml"}
    run = tmp_path / "tiny-dit-abc" / "tiny_dit" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({**fit, "fid": 9.9}))  # another run's metrics: not this row's
    assert tca_table.finalized_checkpoint(fit, tmp_path) is None
    (run / "metrics.json").write_text(json.dumps(fit))
    assert tca_table.finalized_checkpoint(fit, tmp_path) is None  # the run left no finalized.ckpt
    (run / "checkpoints" / "finalized.ckpt").write_bytes(b"x")
    assert tca_table.finalized_checkpoint(fit, tmp_path) == run / "checkpoints" / "finalized.ckpt"

    common = ["--data.init_args.num_samples", "1000"]
    runs = tca_table.seed_runs(["tiny-dit", "tiny-pixart"], [1, 2], [fit, {**fit, "abits": 8}], common, tmp_path)
    assert [r[0] for r in runs] == ["tiny-dit", "tiny-dit"] and {r[3] for r in runs} == {"test"}
    assert runs[1][1] == common + ["--ckpt_path", str(run / "checkpoints" / "finalized.ckpt"),
                                   "--model.init_args.sampler.seed", "2"]
    assert runs[0][2] == {"variant": "tca-dit", "calibrated_by": fit["command"]}
    assert "seeds [1, 2] of tiny-pixart" in capsys.readouterr().err  # no seed-0 row: said, not guessed
    assert tca_table.seed_runs(["tiny-dit"], [], [fit], common, tmp_path) == []


def test_result_neutral_arc_settings_stay_out_of_the_rows_key(repo_root, monkeypatch):
    """Adding an ARC option whose default changes nothing must not orphan every finished table row."""
    import dataclasses

    from tca_lightning.arc import ARCConfig

    tca = load_benchmark(repo_root, monkeypatch, "tca_table")
    tag = tca.arc_defaults()
    assert tag.startswith("ARCConfig(lr=0.005, lambda_align=0.01") and tag.endswith(")")
    for name in tca.RESULT_NEUTRAL:
        assert f"{name}=" not in tag
    others = [f.name for f in dataclasses.fields(ARCConfig) if f.name not in tca.RESULT_NEUTRAL]
    assert all(f"{name}=" in tag for name in others)


def test_baselines_are_named_as_in_the_ptq_table(common):
    from tca_lightning.methods import GPTQ, QuaRot, QuantRecipe, SVDQuant

    recipe = QuantRecipe(wbits=4, abits=4)
    assert isinstance(common.baseline_method("svdquant", recipe), SVDQuant)
    quarot_gptq = common.baseline_method("quarot+gptq", recipe)
    assert isinstance(quarot_gptq, GPTQ) and isinstance(quarot_gptq.base, QuaRot)
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        common.baseline_method("svd", recipe)
