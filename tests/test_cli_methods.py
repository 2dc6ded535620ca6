"""Every method runs from the CLI with configs/smoke.yaml (in-process: same parser, no interpreter start-up)."""

from __future__ import annotations

import json

import pytest

from tca_lightning.cli import main

METHODS = ["RTN", "SmoothQuant", "QuaRot", "GPTQ", "QDiT", "PTQ4DiT", "ViDiTQ", "SVDQuant"]


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_from_the_cli(method, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    model = "random:tiny-pixart" if method in ("QDiT", "SVDQuant") else "random:tiny-dit"
    config = "configs/tiny_pixart.yaml" if "pixart" in model else "configs/tiny_dit.yaml"
    main(["test", "--config", config, "--config", "configs/smoke.yaml", "--model.init_args.model", model,
          "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--model.init_args.reference_cache", str(tmp_path / "ref"),
          "--model.init_args.quantization", f"tca_lightning.methods.{method}",
          "--model.init_args.quantization.recipe.wbits=4", "--model.init_args.quantization.recipe.abits=4",
          "--model.init_args.quantization.recipe.weight_granularity=group",
          "--model.init_args.quantization.recipe.act_granularity=group",
          "--model.init_args.quantization.recipe.group_size=32"])
    (metrics_file,) = tmp_path.glob("*/version_*/metrics.json")
    record = json.loads(metrics_file.read_text())
    assert record["method"] == method.lower() and (record["wbits"], record["abits"]) == (4, 4)
    assert record["reference"] == "fp" and 5 < record["psnr_vs_fp"] < 60
    assert record["calib_seconds"] > 0 and record["num_quantized_linears"] > 0
    assert (metrics_file.parent / "anomaly_heatmaps_fp.png").is_file() == (method not in ("RTN", "QuaRot"))  # stats-free


def test_unknown_method_is_a_clear_cli_error(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit):
        main(["test", "--config", "configs/tiny_dit.yaml", "--config", "configs/smoke.yaml",
              "--model.init_args.quantization", "tca_lightning.methods.NoSuchMethod"])
    assert "NoSuchMethod" in capsys.readouterr().err


def test_fp_run_fills_the_reference_cache_that_ptq_runs_reuse(tmp_path, repo_root, monkeypatch):
    """The FP row of a table samples the FP images once; every quantized row compares against those."""
    monkeypatch.chdir(repo_root)
    common = ["test", "--config", "configs/tiny_dit.yaml", "--config", "configs/smoke.yaml",
              "--model.init_args.model", "random:tiny-dit", "--model.init_args.reference_cache", str(tmp_path / "ref")]
    main(common + ["--trainer.logger.init_args.save_dir", str(tmp_path / "fp")])
    cached = sorted((tmp_path / "ref").glob("*.pt"))
    assert len(cached) == 2  # smoke: 20 samples in batches of 10
    stamps = [p.stat().st_mtime_ns for p in cached]
    main(common + ["--trainer.logger.init_args.save_dir", str(tmp_path / "q"),
                   "--model.init_args.quantization", "tca_lightning.methods.RTN",
                   "--model.init_args.quantization.recipe.wbits=8", "--model.init_args.quantization.recipe.abits=8"])
    assert sorted((tmp_path / "ref").glob("*.pt")) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not re-sampled
    (metrics_file,) = (tmp_path / "q").glob("*/version_*/metrics.json")
    assert json.loads(metrics_file.read_text())["psnr_vs_fp"] > 20  # W8A8 RTN stays close to the cached FP images


def test_a_bad_calibration_device_is_a_clear_error(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ValueError, match="calibration.device 'gpu0' is not a torch device"):
        main(["test", "--config", "configs/tiny_dit.yaml", "--config", "configs/smoke.yaml",
              "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--model.init_args.quantization", "tca_lightning.methods.RTN",
              "--model.init_args.calibration.device", "gpu0"])
