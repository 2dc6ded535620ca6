"""Reference-image streaming, precision/recall, Fréchet distance and the Inception wrapper, on tiny data."""

from __future__ import annotations

import importlib.util
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tca_lightning.reference_sets import (
    center_crop_resize,
    feature_statistics,
    frechet_distance,
    inception_feature_extractor,
    inception_features,
    load_reference_images,
    precision_recall,
    spatial_features,
    to_uint8,
)


def adm_batch(path, n=11, h=6, w=5, compressed=False, seed=0):
    """An ADM-style reference batch: uint8 NHWC images in arr_0, plus unused FID statistics."""
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    save = np.savez_compressed if compressed else np.savez
    save(path, images, mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(4), sigma_s=np.eye(4))
    return images


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip_in_chunks(tmp_path, compressed):
    path = tmp_path / "ref.npz"
    images = adm_batch(path, compressed=compressed)
    ref = load_reference_images(path, chunk_size=4)
    chunks = list(ref)
    assert len(ref) == 11 and [len(c) for c in chunks] == [4, 4, 3]
    assert all(c.dtype == torch.float32 and c.shape[1:] == (3, 6, 5) for c in chunks)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(torch.cat(chunks), expected, rtol=0, atol=0)
    assert torch.equal(to_uint8(torch.cat(chunks)), torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.testing.assert_close(torch.cat(list(ref)), expected, rtol=0, atol=0)  # re-iterable

    first = load_reference_images(str(path), max_images=5, chunk_size=2)
    assert len(first) == 5 and [len(c) for c in first] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(list(first)), expected[:5], rtol=0, atol=0)
    assert len(load_reference_images(path, max_images=100)) == 11


def test_npz_resized_to_image_size(tmp_path):
    path = tmp_path / "ref.npz"
    images = adm_batch(path, n=3, h=8, w=12)
    (out,) = list(load_reference_images(path, image_size=4))
    assert out.shape == (3, 3, 4, 4)
    expected = center_crop_resize(Image.fromarray(images[1]), 4)
    assert torch.equal(to_uint8(out[1]), torch.tensor(expected).permute(2, 0, 1))


def test_npy_is_memory_mapped_too(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "ref.npy", images)
    out = torch.cat(list(load_reference_images(tmp_path / "ref.npy", chunk_size=2)))
    assert torch.equal(to_uint8(out), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_folder_round_trip_converts_modes(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(gray, mode="L").save(tmp_path / "sub" / "c.PNG")
    (tmp_path / "notes.txt").write_text("not an image")

    ref = load_reference_images(tmp_path, chunk_size=2)
    chunks = list(ref)
    assert len(ref) == 3 and [len(c) for c in chunks] == [2, 1]
    out = to_uint8(torch.cat(chunks)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out[0], rgb)
    np.testing.assert_array_equal(out[1], rgba[..., :3])  # alpha dropped
    np.testing.assert_array_equal(out[2], np.repeat(gray[..., None], 3, axis=-1))
    assert len(load_reference_images(tmp_path, max_images=2)) == 2


def test_folder_sizes_must_match_unless_resized(tmp_path):
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((9, 12, 3), 200, np.uint8)).save(tmp_path / "b.jpg")
    with pytest.raises(ValueError, match=r"b\.jpg is 12x9 .* image_size="):
        list(load_reference_images(tmp_path))
    (out,) = list(load_reference_images(tmp_path, image_size=4))
    assert out.shape == (2, 3, 4, 4)
    assert out[0].max() == 0 and abs(out[1].mean().item() - 200 / 255) < 0.02


def test_center_crop_resize_keeps_the_centre():
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, 20:60] = 255  # a white central square, black left/right margins
    out = center_crop_resize(Image.fromarray(array), 10)
    assert out.shape == (10, 10, 3) and out.min() >= 250


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="guided-diffusion.*evaluations"):
        load_reference_images(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"no 'arr_0' array \(it holds \['mu', 'sigma'\]\)"):
        load_reference_images(tmp_path / "stats.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_reference_images(tmp_path / "empty")
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 array \\(N, H, W, 3\\).*float32"):
        load_reference_images(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="shape \\(2, 3, 4, 4\\)"):
        load_reference_images(tmp_path / "nchw.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an .npz"):
        load_reference_images(tmp_path / "bad.npz")
    adm_batch(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="chunk_size"):
        load_reference_images(tmp_path / "ok.npz", chunk_size=0)


def test_truncated_npz_is_reported(tmp_path):
    path = tmp_path / "ref.npz"
    images = adm_batch(path, n=4)
    header = {"descr": "|u1", "fortran_order": False, "shape": images.shape}  # says 4 images, data holds 2
    with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(images[:2].tobytes())
    with pytest.raises(ValueError, match="truncated"):
        list(load_reference_images(path))


def two_clusters(n, seed, centres=((0.0, 0.0), (100.0, 0.0))):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, 2, generator=g) + torch.tensor(c) for c in centres])


def test_precision_recall_identical_and_disjoint():
    real = two_clusters(30, seed=0)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    far = real + 1000.0
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_half_coverage():
    real = two_clusters(40, seed=1)  # clusters at x=0 and x=100
    fake = two_clusters(40, seed=2, centres=((0.0, 0.0),))  # only the first cluster
    result = precision_recall(real, fake)
    assert result["precision"] >= 0.95
    assert 0.4 <= result["recall"] <= 0.5  # the second cluster (half the real set) is missed


def test_precision_recall_chunking_is_exact():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(53, 8, generator=g), torch.randn(41, 8, generator=g) * 0.8 + 0.8
    for k in (1, 3, 5):
        whole = precision_recall(real, fake, k=k, chunk=10_000)
        assert precision_recall(real, fake, k=k, chunk=7) == whole
        assert 0.0 < whole["precision"] < 1.0 and 0.0 < whole["recall"] < 1.0


def test_precision_recall_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    real, fake, k = torch.randn(30, 5, generator=g), torch.randn(25, 5, generator=g) + 0.5, 3
    dr, df, drf = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(real, fake)
    rr = dr.sort(1).values[:, k]  # column 0 is the point itself
    rf = df.sort(1).values[:, k]
    precision = (drf <= rr[:, None]).any(0).double().mean().item()
    recall = (drf <= rf[None, :]).any(1).double().mean().item()
    result = precision_recall(real, fake, k=k, chunk=4)
    assert result == pytest.approx({"precision": precision, "recall": recall}, abs=1e-12)


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="feature dims differ"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(torch.full((10, 2), float("nan")), torch.zeros(10, 2))


def test_feature_statistics_match_numpy():
    x = torch.randn(37, 6, generator=torch.Generator().manual_seed(5)) * 3 + 10
    mu, sigma = feature_statistics(x, chunk=8)
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10)


def test_frechet_distance_closed_form_and_scipy():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum()  # diagonal covariances
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected.item(), abs=1e-9)
    assert frechet_distance(mu1.numpy(), np.diag(s1.numpy()), mu1, torch.diag(s1)) == pytest.approx(0.0, abs=1e-9)

    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(6)
    a, b = g.normal(size=(40, 8)), g.normal(size=(40, 8)) @ g.normal(size=(8, 8))
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0) + 0.3, np.cov(b, rowvar=False)
    reference = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(scipy_linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(m2, c2, m1, c1) == pytest.approx(reference, rel=1e-8)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(m1, c1, m2[:4], c2)


class StandInInception(nn.Module):
    """Just the layer sFID reads: Mixed_6d.branch1x1 emits a known (N, 192, 17, 17) map."""

    def __init__(self):
        super().__init__()
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Identity()
        self.seen_dtype = None

    def forward(self, x):
        self.seen_dtype = x.dtype
        n = len(x)
        spatial = self.Mixed_6d.branch1x1(torch.arange(n * 192 * 17 * 17, dtype=torch.float32).reshape(n, 192, 17, 17))
        return spatial.mean((2, 3))


def test_spatial_features_follow_adm_layout():
    net = StandInInception()
    images = torch.rand(2, 3, 8, 8)
    pooled, spatial = inception_features(net, images)
    assert net.seen_dtype == torch.uint8 and pooled.shape == (2, 192)
    assert spatial.shape == (2, 7 * 17 * 17)
    full = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).reshape(2, 192, 17, 17)
    expected = full[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # NHWC, like ADM's TF graph
    assert torch.equal(spatial, expected)
    assert torch.equal(spatial_features(net, images), expected)
    assert not net.Mixed_6d.branch1x1._forward_hooks  # hook removed
    with pytest.raises(ValueError, match="Mixed_6d.branch1x1"):
        spatial_features(nn.Identity(), images)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_extractor_explains_what_to_install():
    match = r"pip install torch-fidelity.*weights-inception-2015-12-05-6726825d\.pth"
    with pytest.raises(ModuleNotFoundError, match=match):
        inception_feature_extractor()
