"""``python -m tca_lightning fit`` end to end with the smoke budget: TCA-DiT calibration, evaluation,
checkpoint evaluation, and 2-process DDP on the CPU (gloo)."""

from __future__ import annotations

import json

import pytest

SMOKE_DIT = ("--config", "configs/tiny_dit.yaml", "--config", "configs/smoke.yaml",
             "--model.init_args.model", "random:tiny-dit")


def _metrics(out_dir):
    found = sorted(out_dir.glob("*/version_*/metrics.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text()), found[0].parent


@pytest.fixture(scope="module")
def fitted(run_cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    result = run_cli("fit", *SMOKE_DIT, "--trainer.logger.init_args.save_dir", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return _metrics(out)


def test_fit_calibrates_then_evaluates_against_fp(fitted):
    record, version_dir = fitted
    assert record["method"] == "tca-dit" and (record["wbits"], record["abits"]) == (4, 4)
    assert record["reference"] == "fp" and 5 < record["psnr_vs_fp"] < 80
    assert record["timestep_selection"] == "atg" and 1 <= record["calib_groups"] <= 2
    assert abs(sum(record["calib_weights"]) - 1) < 1e-3 and record["calib_items"] == 4 * record["calib_groups"]
    assert record["calib_seconds"] > 0 and record["max_orthogonality_error"] <= 1e-5
    assert record["rgq"] is True and record["gptq"] is True
    for png in ("samples.png", "anomaly_heatmaps_fp.png", "anomaly_heatmaps_arc.png", "atg_clusters.png"):
        assert (version_dir / png).is_file(), png
    assert list(version_dir.glob("events.out.tfevents.*"))  # TensorBoard loss curves and figures


def test_test_from_the_fit_checkpoint_reproduces_the_evaluation(fitted, run_cli, tmp_path):
    record, version_dir = fitted
    ckpt = version_dir / "checkpoints" / "finalized.ckpt"  # after RGQ and GPTQ: what fit evaluated
    result = run_cli("test", *SMOKE_DIT, "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(tmp_path),
                     timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    again, _ = _metrics(tmp_path)
    assert again["method"] == "tca-dit"
    assert again["psnr_vs_fp"] == pytest.approx(record["psnr_vs_fp"], abs=1e-4)  # same weights, same noise


def test_test_from_a_checkpoint_keeps_the_command_lines_sampler_and_names_replaced_settings(fitted, run_cli,
                                                                                            tmp_path):
    """Lightning's CLI restores a checkpoint's model hyperparameters over the command line's; evaluation-only ones
    (sampler, references) must stay the user's, and any other replaced setting is named, not dropped silently."""
    _, version_dir = fitted
    result = run_cli("test", *SMOKE_DIT, "--ckpt_path", str(version_dir / "checkpoints" / "finalized.ckpt"),
                     "--model.init_args.sampler.num_steps", "2", "--model.init_args.recipe.group_size", "16",
                     "--trainer.logger.init_args.save_dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    again, _ = _metrics(tmp_path)
    assert again["steps"] == 2  # the command line's sampler, not the checkpoint's 4 steps
    assert "replace the config's model settings recipe.group_size (16 -> 32)" in result.stderr


def test_the_packed_checkpoint_fit_wrote_evaluates_with_integer_kernels_like_the_fake_quant(fitted, run_cli, tmp_path):
    record, version_dir = fitted
    packed = version_dir / "quantized"
    assert (packed / "quantized.json").is_file() and (packed / "model.safetensors").is_file()
    result = run_cli("test", *SMOKE_DIT, "--quantized", str(packed),  # the top-level shorthand
                     "--trainer.logger.init_args.save_dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    again, _ = _metrics(tmp_path)
    assert again["kernels"] == "integer" and (again["wbits"], again["abits"]) == (4, 4)
    # FP16 scales are the only difference from the fake quant (tests/test_packed_checkpoint.py): within noise
    assert again["psnr_vs_fp"] == pytest.approx(record["psnr_vs_fp"], abs=0.5)


def test_the_packed_checkpoint_keeps_arc_rotations_factored_and_is_smaller_than_fp16(fitted):
    """ARC's rotations are Kronecker pairs; stored dense they made the packed tiny model larger than FP32."""
    from safetensors.torch import load_file

    from tca_lightning.models.loading import load_model

    _, version_dir = fitted
    tensors = load_file(str(version_dir / "quantized" / "model.safetensors"))
    assert any(k.endswith(".rotation_left") for k in tensors)
    assert not any(k.endswith(".rotation") for k in tensors)
    packed_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    fp16_bytes = 2 * sum(p.numel() for p in load_model("tiny-dit").transformer.parameters())
    assert packed_bytes < 0.6 * fp16_bytes, (packed_bytes, fp16_bytes)


def test_quantized_with_fit_is_a_clear_error(run_cli, tmp_path):
    result = run_cli("fit", *SMOKE_DIT, "--quantized", str(tmp_path), "--trainer.logger.init_args.save_dir",
                     str(tmp_path), timeout=120)
    assert result.returncode != 0 and "use it with `test`" in result.stderr


def test_ddp_on_two_cpu_processes(run_cli, tmp_path):
    result = run_cli("fit", *SMOKE_DIT, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--trainer.logger.init_args.save_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    record, _ = _metrics(tmp_path)
    assert record["method"] == "tca-dit" and record["num_samples"] == 20  # both ranks' samples, reduced
    assert 5 < record["psnr_vs_fp"] < 80
