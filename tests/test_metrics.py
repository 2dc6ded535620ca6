"""Evaluation helpers and ImageMetrics against hand-computed values, with a stub classifier we control."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tca_lightning.evaluate import ImageMetrics, image_grid, real_digits, save_png_atomic, write_json_atomic
from tca_lightning.models.loading import load_classifier


class StubClassifier(nn.Module):
    """Reads its input directly: features = the first ``num_features`` pixels (model range [-1, 1]);
    logits = 10 x the next ``num_classes`` pixels, so the brightest of those pixels is the prediction."""

    def __init__(self, num_features: int = 2, num_classes: int = 10):
        super().__init__()
        self.num_features, self.num_classes = num_features, num_classes
        self.seen = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, : self.num_features].float()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        return 10.0 * images.flatten(1)[:, self.num_features: self.num_features + self.num_classes].float()


PIXELS = 16  # images (N, 1, 4, 4): enough pixels for 2 features + 10 class slots


def make_images(features: torch.Tensor, classes: list[int] | None = None, num_features: int = 2) -> torch.Tensor:
    """[0, 1] images whose model-range features are ``features`` and whose stub prediction is ``classes``."""
    n = len(features)
    x = -torch.ones(n, PIXELS)
    x[:, :num_features] = features
    if classes is not None:
        x[torch.arange(n), num_features + torch.tensor(classes)] = 1.0
    return ((x + 1) / 2).view(n, 1, 4, 4)


# --- files -------------------------------------------------------------------------------------

def test_write_json_atomic(tmp_path):
    path = tmp_path / "new" / "dir" / "metrics.json"
    write_json_atomic(path, {"b": 1, "a": [1.5, "x"], "nested": {"k": None}})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5, "x"], "nested": {"k": None}}
    write_json_atomic(path, {"b": 2})  # overwrites
    assert json.loads(path.read_text()) == {"b": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"], "no temp file left behind"


def test_write_json_atomic_output_is_strict_json(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"psnr_vs_fp": float("inf"), "mse_vs_fp": 0.0})

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    json.loads(path.read_text(), parse_constant=reject)


def test_image_grid_shape_and_placement():
    images = torch.stack([torch.full((1, 4, 3), i / 10) for i in range(5)])
    grid = image_grid(images, ncols=3, pad=2)
    assert grid.shape == (1, 2 * (4 + 2) + 2, 3 * (3 + 2) + 2)
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 2 + r * 6, 2 + c * 5
        assert torch.equal(grid[:, top: top + 4, left: left + 3], images[i]), i
    mask = torch.ones_like(grid, dtype=torch.bool)
    for i in range(5):
        r, c = divmod(i, 3)
        mask[:, 2 + r * 6: 6 + r * 6, 2 + c * 5: 5 + c * 5] = False
    assert (grid[mask] == 1.0).all(), "padding and the empty cell are white"


def test_image_grid_rgb_and_single_row():
    images = torch.rand(4, 3, 5, 5)
    grid = image_grid(images, ncols=10, pad=0)
    assert grid.shape == (3, 5, 50)
    assert torch.equal(grid[:, :, 15:20], images[3])


def test_save_png_atomic(tmp_path):
    import matplotlib.pyplot as plt

    grid = image_grid(torch.rand(3, 1, 8, 8), ncols=2)
    path = tmp_path / "samples.png"
    save_png_atomic(grid, path)
    png = plt.imread(path)
    assert png.shape[:2] == tuple(grid.shape[1:])
    assert abs(float(png[..., 0].mean()) - float(grid.mean())) < 0.01
    assert [p.name for p in tmp_path.iterdir()] == ["samples.png"]


def test_real_digits():
    images = real_digits("mnist-heldout")
    assert images.shape == (500, 1, 32, 32) and images.min() == 0.0 and images.max() == 1.0
    with pytest.raises(ValueError, match="mnist-heldout"):
        real_digits("cifar10")


# --- ImageMetrics ----------------------------------------------------------------------------------

def test_cond_acc_and_model_range():
    stub = StubClassifier()
    metrics = ImageMetrics(stub, kid_subset_size=4)
    real = make_images(torch.randn(6, 2) * 0.1, [0] * 6)
    metrics.update_real(real)
    metrics.update(make_images(torch.zeros(4, 2), [3, 1, 4, 1]), torch.tensor([3, 1, 4, 2]))
    metrics.update(make_images(torch.zeros(4, 2), [5, 9, 2, 6]), torch.tensor([5, 0, 0, 0]))
    out = metrics.compute()
    assert out["cond_acc"] == pytest.approx(4 / 8)
    assert metrics.num_real == 6 and metrics.num_fake == 8
    assert stub.seen[0].min() == -1.0 and stub.seen[0].max() == 1.0, "the classifier reads [-1, 1]"
    assert "psnr_vs_fp" not in out and "mse_vs_fp" not in out  # no reference given


def test_psnr_and_mse_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    metrics = ImageMetrics(StubClassifier(), kid_subset_size=4)
    metrics.update_real(make_images(torch.randn(6, 2, generator=g) * 0.1))
    fakes, refs = [], []
    for noise in (0.05, 0.2):  # two batches with different errors: the result is over the whole set
        ref = torch.rand(5, 1, 4, 4, generator=g)
        fake = (ref + noise * torch.randn(5, 1, 4, 4, generator=g)).clamp(0, 1)
        metrics.update(fake, torch.zeros(5, dtype=torch.long), ref)
        fakes.append(fake), refs.append(ref)
    mse = ((torch.cat(fakes).double() - torch.cat(refs).double()) ** 2).mean().item()
    out = metrics.compute()
    assert out["mse_vs_fp"] == pytest.approx(mse, rel=1e-5)
    assert out["psnr_vs_fp"] == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-5)


def test_identical_reference_gives_zero_mse():
    metrics = ImageMetrics(StubClassifier(), kid_subset_size=4)
    images = torch.rand(6, 1, 4, 4)
    metrics.update_real(images)
    metrics.update(images, torch.zeros(6, dtype=torch.long), images.clone())
    out = metrics.compute()
    assert out["mse_vs_fp"] == 0.0
    assert out["psnr_vs_fp"] == float("inf") or out["psnr_vs_fp"] > 60


def diagonal_set(center, spread) -> torch.Tensor:
    """4 points (c +- a e1, c +- b e2): mean c, sample covariance exactly diag(2a^2/3, 2b^2/3)."""
    (cx, cy), (a, b) = center, spread
    return torch.tensor([[cx + a, cy], [cx - a, cy], [cx, cy + b], [cx, cy - b]])


def test_fid_of_diagonal_gaussians_by_hand():
    real = diagonal_set((0.0, 0.0), (0.5, 0.25))
    fake = diagonal_set((0.25, -0.125), (0.125, 0.75))
    var = lambda s: 2 * s ** 2 / 3  # noqa: E731  (unbiased, n - 1 = 3)
    # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), S diagonal: sum over axes of (sqrt(v1) - sqrt(v2))^2
    expected = 0.25 ** 2 + 0.125 ** 2 + sum((math.sqrt(var(a)) - math.sqrt(var(b))) ** 2
                                            for a, b in ((0.5, 0.125), (0.25, 0.75)))
    metrics = ImageMetrics(StubClassifier(num_features=2), kid_subset_size=4)
    metrics.update_real(make_images(real))
    metrics.update(make_images(fake, [0, 0, 0, 0]), torch.zeros(4, dtype=torch.long))
    out = metrics.compute()
    assert out["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_fid_and_kid_of_a_set_against_itself():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(40, 4, generator=g) * 2 - 1
    metrics = ImageMetrics(StubClassifier(num_features=4), kid_subset_size=20)
    images = make_images(feats, [0] * 40, num_features=4)
    metrics.update_real(images)
    metrics.update(images, torch.zeros(40, dtype=torch.long))
    out = metrics.compute()
    assert abs(out["fid"]) < 1e-4
    shifted = ImageMetrics(StubClassifier(num_features=4), kid_subset_size=20)
    shifted.update_real(images)
    shifted.update(make_images((feats * 0.5 + 0.4).clamp(-1, 1), [0] * 40, num_features=4),
                   torch.zeros(40, dtype=torch.long))
    far = shifted.compute()
    assert far["fid"] > 0.1 and far["kid"] > abs(out["kid"])


def test_kid_subset_size_is_capped_by_the_sample_count():
    metrics = ImageMetrics(StubClassifier(num_features=2), kid_subset_size=100)
    metrics.update_real(make_images(torch.rand(7, 2)))
    metrics.update(make_images(torch.rand(5, 2), [0] * 5), torch.zeros(5, dtype=torch.long))
    out = metrics.compute()  # 100 > 5 samples: must not raise
    assert math.isfinite(out["kid"]) and metrics.kid.subset_size == 5


def test_inception_score_bounds():
    n = 1000
    same = ImageMetrics(StubClassifier(), kid_subset_size=10)
    same.update_real(make_images(torch.rand(n, 2)))
    same.update(make_images(torch.rand(n, 2), [7] * n), torch.full((n,), 7))
    out = same.compute()
    assert out["is"] == pytest.approx(1.0, abs=1e-4) and out["cond_acc"] == 1.0
    uniform = ImageMetrics(StubClassifier(), kid_subset_size=10)
    uniform.update_real(make_images(torch.rand(n, 2)))
    classes = [i % 10 for i in range(n)]
    uniform.update(make_images(torch.rand(n, 2), classes), torch.tensor(classes))
    out = uniform.compute(seed=0)
    # confident, class-balanced predictions: IS close to the number of classes (10 random splits of 100)
    assert 9.0 < out["is"] <= 10.0 + 1e-4


def test_compute_is_reproducible_per_seed():
    def run(seed):
        metrics = ImageMetrics(StubClassifier(), kid_subset_size=5)
        g = torch.Generator().manual_seed(1)
        metrics.update_real(make_images(torch.rand(30, 2, generator=g)))
        classes = torch.randint(0, 10, (30,), generator=g).tolist()
        metrics.update(make_images(torch.rand(30, 2, generator=g), classes), torch.zeros(30, dtype=torch.long))
        return metrics.compute(seed=seed)

    state = torch.random.get_rng_state()
    assert run(0) == run(0)
    assert torch.equal(torch.random.get_rng_state(), state), "compute forks the global RNG"
    assert run(0)["kid"] != run(1)["kid"]


def test_shipped_classifier_fid_of_held_out_digits_against_themselves():
    images = real_digits("mnist-heldout")[:200]
    labels = load_digits_labels()[:200]
    metrics = ImageMetrics(load_classifier(), kid_subset_size=50)
    metrics.update_real(images)
    metrics.update(images, labels)
    out = metrics.compute()
    assert abs(out["fid"]) < 1e-2
    assert abs(out["kid"]) < 0.05
    assert out["cond_acc"] > 0.97
    noisy = ImageMetrics(load_classifier(), kid_subset_size=50)
    noisy.update_real(images)
    noisy.update((images + 0.5 * torch.rand_like(images)).clamp(0, 1), labels)
    assert noisy.compute()["fid"] > 1.0


def load_digits_labels() -> torch.Tensor:
    from tca_lightning.data.digits import load_digits

    return load_digits("heldout")[1]


# --- the LightningModule, in-process --------------------------------------------------------------

def test_evaluator_can_be_tested_twice(tmp_path):
    """E.g. evaluate FP, quantize the transformer in place, evaluate again: each run must stand alone."""
    import lightning as L

    from tca_lightning.data import SamplingDataModule
    from tca_lightning.evaluate import DiffusionEvaluator
    from tca_lightning.models.samplers import SamplerConfig

    module = DiffusionEvaluator(model="random:tiny-dit", sampler=SamplerConfig(num_steps=2), kid_subset_size=4,
                                grid_samples=4)
    data = SamplingDataModule(num_samples=6, batch_size=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, data, verbose=False)
    first = dict(module.results)
    assert first["num_samples"] == 6 and module.metrics.num_real == 500
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 6
    trainer.test(module, data, verbose=False)
    second = module.results
    assert second["num_samples"] == 6
    assert module.metrics.num_real == 500
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-4)  # same model, same noise: same scores


def test_without_a_classifier_only_paired_metrics():
    """No real set (a random model in CI): PSNR/MSE against the reference, no FID/KID/IS/accuracy."""
    metrics = ImageMetrics(None)
    a = torch.rand(4, 3, 8, 8)
    b = (a + 0.1).clamp(0, 1)
    metrics.reset()
    metrics.update(a, torch.zeros(4, dtype=torch.long), b)
    out = metrics.compute()
    assert set(out) == {"psnr_vs_fp", "mse_vs_fp"} and metrics.num_fake == 4
    assert abs(out["mse_vs_fp"] - float(((a - b) ** 2).mean())) < 1e-7
    metrics.reset()
    metrics.update(a, torch.zeros(4, dtype=torch.long))
    assert metrics.compute() == {}


def test_sample_shard_round_trip_and_mismatch(tmp_path):
    from tca_lightning.evaluate import load_sample_shard, save_sample_shard

    images = torch.rand(3, 3, 5, 5)
    batch = {"index": torch.tensor([6, 7, 8]), "label": torch.tensor([6, 7, 8])}
    path = tmp_path / "key" / "batch-000002.npz"
    stored = save_sample_shard(path, images, batch)
    assert (stored - images).abs().max() <= 0.5 / 255 + 1e-6 and stored.is_contiguous()
    assert torch.equal(load_sample_shard(path, batch), stored) and not list(path.parent.glob(".*tmp*"))
    with pytest.raises(ValueError, match=r"holds samples \[6, 7, 8\], not this batch's \[0, 1, 2\]: delete it"):
        load_sample_shard(path, {"index": torch.tensor([0, 1, 2])})


class RecordingClip:
    """Stands in for torchmetrics' CLIPScore: records what it is given."""

    def __init__(self):
        self.calls = []

    def update(self, images, captions):
        self.calls.append((images, captions))

    def compute(self):
        return torch.tensor(31.5)

    def reset(self):
        self.calls = []


def test_clip_score_gets_uint8_rgb_images_with_their_captions():
    metrics = ImageMetrics(None)
    metrics.clip = RecordingClip()
    gray = torch.rand(2, 1, 8, 8)
    metrics.update(gray, torch.zeros(2, dtype=torch.long), captions=["a cat", "a dog"])
    (images, captions), = metrics.clip.calls
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8) and captions == ["a cat", "a dog"]
    assert torch.equal(images[:, 0], images[:, 2]) and torch.equal(images[:, 0], (gray[:, 0] * 255).round().to(torch.uint8))
    assert metrics.compute()["clip_score"] == 31.5
    with pytest.raises(ValueError, match="needs the captions"):
        metrics.update(gray, torch.zeros(2, dtype=torch.long))


def test_clip_score_without_transformers_says_what_to_install():
    pytest.importorskip("torchmetrics")
    try:
        import transformers  # noqa: F401
        pytest.skip("transformers is installed")
    except ImportError:
        pass
    from tca_lightning.evaluate import clip_score_metric

    with pytest.raises(ModuleNotFoundError, match="needs transformers"):
        clip_score_metric("openai/clip-vit-large-patch14")


def test_checkpoints_leave_the_metric_networks_out():
    """A checkpoint holds the model, not the evaluation's networks (InceptionV3, CLIP): it loads under any
    real_images / clip_model setting."""
    from tca_lightning.evaluate import DiffusionEvaluator

    scored = DiffusionEvaluator(model="random:tiny-dit", reference_cache=None)  # digits: the classifier in metrics
    checkpoint = {"state_dict": scored.state_dict()}
    assert any(k.startswith("metrics.") for k in checkpoint["state_dict"])
    scored.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("metrics.") for k in checkpoint["state_dict"])
    paired_only = DiffusionEvaluator(model="random:tiny-dit", reference_cache=None, real_images=None)
    paired_only.on_load_checkpoint(checkpoint)
    paired_only.load_state_dict(checkpoint["state_dict"])  # strict: the current metrics' entries were filled in
    old = {"state_dict": scored.state_dict()}  # a checkpoint written before: with the classifier's weights
    paired_only.on_load_checkpoint(old)
    paired_only.load_state_dict(old["state_dict"])
