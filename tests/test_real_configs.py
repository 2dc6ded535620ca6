"""The real-model configs (DiT-XL/2 256/512, PixArt-alpha 512): they validate, and run end to end on
randomly initialized models of the same classes shrunk by configs/shrink/*.yaml, on 1 and 2 CPU
processes, with samples identical across device counts; absent weights or captions fail with a message
that says what to get and where to point."""

from __future__ import annotations

import json

import numpy as np
import pytest

SHRINK = {"dit_xl_256": "dit", "dit_xl_512": "dit", "pixart": "pixart"}
HUB_IDS = {"dit_xl_256": "facebook/DiT-XL-2-256", "dit_xl_512": "facebook/DiT-XL-2-512",
           "pixart": "PixArt-alpha/PixArt-XL-2-512x512"}
RANDOM = {"dit_xl_256": "random:dit-xl-2-256", "dit_xl_512": "random:dit-xl-2-512", "pixart": "random:pixart-alpha-512"}


def shrunk(config: str, out, *extra: str) -> tuple[str, ...]:
    return ("--config", f"configs/{config}.yaml", "--config", f"configs/shrink/{SHRINK[config]}.yaml",
            "--model.init_args.model", RANDOM[config], "--trainer.logger.init_args.save_dir", str(out), *extra)


def only_metrics(out) -> tuple[dict, object]:
    found = sorted(out.glob("*/version_*/metrics.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text()), found[0].parent


def shards(sample_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found = sorted(sample_dir.glob("*/batch-*.npz"))
    assert len({p.parent for p in found}) == 1, "one evaluated model, one shard folder"
    out = {}
    for path in found:
        with np.load(path) as shard:
            out[path.name] = (shard["arr_0"].copy(), shard["indices"].copy())
    return out


@pytest.mark.parametrize("config", sorted(SHRINK))
def test_real_config_validates(run_cli, config):
    result = run_cli("fit", "--config", f"configs/{config}.yaml", "--print_config", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model: {HUB_IDS[config]}" in result.stdout and "group_size: 128" in result.stdout
    if config.startswith("dit"):
        assert "num_classes: 1000" in result.stdout and "scheduler: ddpm" in result.stdout
    else:
        assert "scheduler: dpm-solver" in result.stdout and "guidance_scale: 4.5" in result.stdout
        assert "text_encoder: t5:PixArt-alpha/PixArt-XL-2-512x512" in result.stdout


@pytest.mark.parametrize("config", ["dit_xl_256", "pixart"])
def test_shrunk_fit_end_to_end(run_cli, tmp_path, config):
    """The whole job (trajectories -> ATG -> ARC -> finalize -> pack -> evaluation) on the real classes."""
    samples = tmp_path / "samples"
    result = run_cli("fit", *shrunk(config, tmp_path, "--data.init_args.num_samples", "6",
                                    "--model.init_args.sample_dir", str(samples)), timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    record, version_dir = only_metrics(tmp_path)
    assert record["model"] == RANDOM[config] and (record["wbits"], record["abits"]) == (4, 4)
    assert record["num_samples"] == 6 and record["method"] == "tca-dit"
    assert 5 < record["psnr_vs_fp"] < 90 and "fid" not in record  # no real set: paired metrics only
    assert (version_dir / "quantized").is_dir() and (version_dir / "samples.png").is_file()
    got = shards(samples)
    assert list(got) == ["batch-000000.npz", "batch-000001.npz"]  # 6 samples in batches of 4
    images, indices = got["batch-000001.npz"]
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3) and indices.tolist() == [4, 5]


@pytest.mark.parametrize("config", ["dit_xl_256", "pixart"])
def test_samples_identical_on_one_and_two_processes(run_cli, tmp_path, config):
    """Per-sample noise and fixed batches dealt to ranks: 2 processes write the very shards 1 process does,
    count each sample once (7 samples: batches of 2, rank 0 takes 0 and 2, rank 1 takes 1 and 3), and a
    rerun resumes from the shards without sampling."""
    runs = {}
    for devices in ("1", "2"):
        out = tmp_path / f"devices{devices}"
        args = shrunk(config, out, "--data.init_args.num_samples", "7", "--data.init_args.batch_size", "2",
                      "--model.init_args.sample_dir", str(out / "samples"), "--trainer.devices", devices,
                      *(("--trainer.strategy", "ddp") if devices == "2" else ()))
        result = run_cli("test", *args, timeout=300)
        assert result.returncode == 0, result.stderr[-5000:]
        record, _ = only_metrics(out)
        assert record["num_samples"] == 7 and "psnr_vs_fp" not in record  # the FP model: no reference
        runs[devices] = shards(out / "samples")
    assert list(runs["1"]) == [f"batch-00000{b}.npz" for b in range(4)]
    assert runs["1"].keys() == runs["2"].keys()
    for name, (images, indices) in runs["1"].items():
        assert np.array_equal(indices, runs["2"][name][1]) and np.array_equal(images, runs["2"][name][0]), name
    resumed = run_cli("test", *shrunk(config, tmp_path / "resumed", "--data.init_args.num_samples", "7",
                                      "--data.init_args.batch_size", "2", "--model.init_args.sample_dir",
                                      str(tmp_path / "devices2" / "samples")), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    record, _ = only_metrics(tmp_path / "resumed")
    assert record["sampling_seconds"] == 0.0 and record["num_samples"] == 7


@pytest.mark.parametrize("config", ["dit_xl_512", "pixart"])
def test_shrunk_fit_on_two_processes(run_cli, tmp_path, config):
    result = run_cli("fit", *shrunk(config, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp"),
                     timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    record, _ = only_metrics(tmp_path)
    assert record["model"] == RANDOM[config] and record["num_samples"] == 8  # both ranks' samples
    assert 5 < record["psnr_vs_fp"] < 90 and record["max_orthogonality_error"] <= 1e-5


def test_absent_weights_offline_say_what_to_download(run_cli, tmp_path):
    result = run_cli("fit", "--config", "configs/dit_xl_256.yaml", "--trainer.accelerator", "cpu",
                     "--trainer.logger.init_args.save_dir", str(tmp_path), timeout=120,
                     extra_env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode != 0
    assert "facebook/DiT-XL-2-256" in result.stderr and "huggingface-cli download" in result.stderr
    assert not list(tmp_path.glob("dit_xl_256/version_*/metrics.json"))


@pytest.mark.parametrize("overlay, subcommand, message", [
    ("model:\n  init_args:\n    calibration:\n      captions: null\n", "fit", "calibration.captions is missing"),
    ("data:\n  init_args:\n    captions: null\n", "test", "data.init_args.captions is missing"),
])
def test_pixart_without_captions_says_which(run_cli, tmp_path, overlay, subcommand, message):
    (tmp_path / "no_captions.yaml").write_text(overlay)
    result = run_cli(subcommand, *shrunk("pixart", tmp_path, "--config", str(tmp_path / "no_captions.yaml")), timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
