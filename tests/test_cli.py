"""End to end through ``python -m tca_lightning test`` (LightningCLI) with the smoke budget.

Each subprocess costs 10-20 s on the shared CPUs, so there are few of them: one DiT run with a
reference model (covers metrics.json, samples.png and the paired metrics), one PixArt run, and
an unknown model name (the process must exit non-zero). Config parsing and argument errors are
checked in-process: jsonargparse exits with SystemExit before anything is built.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tca_lightning.cli import main

REQUIRED_KEYS = {"model", "method", "wbits", "abits", "num_samples", "steps", "fid", "kid", "is", "cond_acc"}


def base_configs(repo_root):
    return sorted(p for p in (repo_root / "configs").glob("*.yaml") if "class_path" in str(yaml.safe_load(p.read_text()).get("model", {})))


def overlay_configs(repo_root):
    return sorted(set((repo_root / "configs").glob("*.yaml")) - set(base_configs(repo_root)))


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def smoke_run(run_cli, repo_root, out_dir, config: str, *extra: str) -> tuple[dict, object]:
    result = run_cli("test", "--config", f"configs/{config}", "--config", "configs/smoke.yaml",
                     "--trainer.logger.init_args.save_dir", str(out_dir), *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    found = sorted(out_dir.glob("*/version_*/metrics.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text()), found[0].parent


def check_record(record: dict, model: str):
    assert REQUIRED_KEYS <= set(record), REQUIRED_KEYS - set(record)
    assert record["model"] == model and record["method"] == "fp"
    assert record["wbits"] == 32 and record["abits"] == 32
    assert record["num_samples"] == 20 and record["steps"] == 4
    for key in ("fid", "kid", "is", "cond_acc"):
        assert isinstance(record[key], float) and math.isfinite(record[key]), key
    assert 0.0 <= record["cond_acc"] <= 1.0
    assert record["is"] >= 1.0 - 1e-4


def check_png(version_dir, num_samples: int = 20):
    import matplotlib.pyplot as plt

    png = plt.imread(version_dir / "samples.png")
    rows = -(-num_samples // 10)
    assert png.shape[:2] == (rows * 34 + 2, 10 * 34 + 2)  # 32-px digits, 2-px padding, 10 per row


def test_tiny_dit_smoke_with_reference(run_cli, repo_root, cli_dir):
    """The model scored against itself on identical noise: paired fidelity must be perfect."""
    out = cli_dir / "dit"
    record, version_dir = smoke_run(run_cli, repo_root, out, "tiny_dit.yaml",
                                    "--model.init_args.model", "random:tiny-dit",
                                    "--model.init_args.reference", "random:tiny-dit")
    check_record(record, "random:tiny-dit")
    assert record["scheduler"] == "ddim" and record["reference"] == "random:tiny-dit"
    assert record["psnr_vs_fp"] == "inf" or record["psnr_vs_fp"] > 60  # strict JSON writes inf as "inf"
    assert record["mse_vs_fp"] < 1e-10
    check_png(version_dir)
    assert (version_dir / "config.yaml").is_file()


def test_tiny_pixart_smoke(run_cli, repo_root, cli_dir):
    out = cli_dir / "pixart"
    record, version_dir = smoke_run(run_cli, repo_root, out, "tiny_pixart.yaml",
                                    "--model.init_args.model", "random:tiny-pixart")
    check_record(record, "random:tiny-pixart")
    assert record["scheduler"] == "dpm-solver" and record["reference"] is None
    assert "psnr_vs_fp" not in record and "mse_vs_fp" not in record
    check_png(version_dir)


def test_unknown_model_name_fails(run_cli, cli_dir):
    result = run_cli("test", "--config", "configs/tiny_dit.yaml", "--config", "configs/smoke.yaml",
                     "--trainer.logger.init_args.save_dir", str(cli_dir / "bad_model"),
                     "--model.init_args.model", "tiny-ditt", timeout=120)
    assert result.returncode != 0
    assert "'tiny-ditt'" in result.stderr and "ModelNotFoundError" in result.stderr


@pytest.mark.slow
def test_shipped_tiny_dit_smoke(run_cli, repo_root, cli_dir, shipped):
    shipped("tiny-dit")  # skips while the weights are being trained
    record, version_dir = smoke_run(run_cli, repo_root, cli_dir / "shipped_dit", "tiny_dit.yaml")
    check_record(record, "tiny-dit")
    assert isinstance(record["cond_acc"], float) and 0.0 <= record["cond_acc"] <= 1.0


@pytest.mark.slow
def test_shipped_tiny_pixart_smoke(run_cli, repo_root, cli_dir, shipped):
    shipped("tiny-pixart")
    record, _ = smoke_run(run_cli, repo_root, cli_dir / "shipped_pixart", "tiny_pixart.yaml")
    check_record(record, "tiny-pixart")


# --- in-process: config parsing only ----------------------------------------------------------------

def print_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["test", *args, "--print_config"])
    assert info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_configs_folder_has_the_expected_files(repo_root):
    names = {p.name for p in (repo_root / "configs").glob("*.yaml")}
    assert {"tiny_dit.yaml", "tiny_pixart.yaml", "smoke.yaml"} <= names
    assert {p.name for p in base_configs(repo_root)} >= {"tiny_dit.yaml", "tiny_pixart.yaml"}
    assert "smoke.yaml" in {p.name for p in overlay_configs(repo_root)}


def test_every_config_parses(repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    for base in base_configs(repo_root):
        config = print_config(capsys, "--config", str(base))
        assert config["model"]["class_path"] == "tca_lightning.arc.ARC"  # fit: TCA-DiT; test: FP or a baseline
        assert config["data"]["class_path"] == "tca_lightning.data.ATGDataModule"
        assert config["model"]["init_args"]["recipe"]["wbits"] == 4 and config["data"]["init_args"]["k"] >= 1
        written = yaml.safe_load(base.read_text())
        assert config["model"]["init_args"]["model"] == written["model"]["init_args"]["model"]
        assert config["model"]["init_args"]["sampler"]["num_steps"] == written["model"]["init_args"]["sampler"]["num_steps"]
        for overlay in overlay_configs(repo_root):
            layered = print_config(capsys, "--config", str(base), "--config", str(overlay))
            if overlay.name == "smoke.yaml":
                assert layered["model"]["init_args"]["sampler"]["num_steps"] == 4
                assert layered["model"]["init_args"]["sampler"]["scheduler"] == written["model"]["init_args"]["sampler"]["scheduler"]
                assert layered["data"]["init_args"]["num_samples"] == 20
                assert layered["model"]["init_args"]["kid_subset_size"] == 10


def test_bad_config_key_fails(repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", "configs/tiny_dit.yaml", "--config", "configs/smoke.yaml",
              "--model.init_args.no_such_key", "1", "--print_config"])
    assert info.value.code not in (0, None)
    assert "no_such_key" in capsys.readouterr().err


def test_yaml_with_unknown_key_fails(repo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    sampler:\n      num_stepz: 3\n")
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", "configs/tiny_dit.yaml", "--config", str(bad), "--print_config"])
    assert info.value.code not in (0, None)
    assert "num_stepz" in capsys.readouterr().err


def test_invalid_sampler_value_fails(repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", "configs/tiny_dit.yaml", "--model.init_args.sampler.num_steps", "many",
              "--print_config"])
    assert info.value.code not in (0, None)
    assert "num_steps" in capsys.readouterr().err


def test_every_method_config_parses_on_both_models(repo_root, monkeypatch, capsys):
    """configs/methods/*.yaml layered on each model config validate (--print_config, nothing runs)."""
    from tca_lightning.cli import main

    monkeypatch.chdir(repo_root)
    methods = sorted((repo_root / "configs" / "methods").glob("*.yaml"))
    assert len(methods) == 8
    for model in ("configs/tiny_dit.yaml", "configs/tiny_pixart.yaml"):
        for method in methods:
            with pytest.raises(SystemExit) as exit_info:
                main(["test", "--config", model, "--config", str(method.relative_to(repo_root)), "--print_config"])
            assert exit_info.value.code in (0, None)
            printed = capsys.readouterr().out
            assert "class_path: tca_lightning.methods." in printed and "wbits: 4" in printed
