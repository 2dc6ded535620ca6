"""Real reference images and ADM-style metrics for evaluating real models (DiT-XL/2, PixArt-alpha).

The tiny models score against held-out digits (``evaluate.real_digits``); real models score
against ImageNet the way ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis") and DiT (Peebles & Xie 2023) report: FID, sFID, Inception Score, precision and
recall on Inception-v3 features, against ADM's reference batches.

- ``load_reference_images`` streams real images, in chunks, as (n, 3, H, W) float32 in [0, 1],
  from an ADM reference batch ``.npz`` (key ``arr_0``: uint8 (N, H, W, 3)) or a folder of images.
  A 50k x 256 x 256 x 3 batch is ~9.8 GB, so it is never read whole: ``np.load(mmap_mode=...)``
  is ignored for ``.npz`` members, hence the member is read sequentially through ``zipfile``
  (as ADM's own evaluator does), which works for both ``np.savez`` and ``np.savez_compressed``.
  The batches' precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` are not used: they come from
  ADM's TensorFlow graph, and scores are only comparable when both sides use one extractor.
- ``precision_recall``: improved precision and recall (Kynkäänniemi et al. 2019), ADM's k=3.
- ``inception_feature_extractor``: torchmetrics' ``NoTrainInceptionV3`` (needs torch-fidelity
  and its weights file), for FID/KID/IS through torchmetrics and for the features above.
- ``spatial_features`` / ``feature_statistics`` / ``frechet_distance``: sFID (Nash et al. 2021,
  "Generating Images with Sparse Representations"), which torchmetrics lacks: the Fréchet
  distance of the first 7 channels of Inception's ``mixed_6/conv`` (torch-fidelity's
  ``Mixed_6d.branch1x1``, 17x17) flattened to 2023 features in ADM's NHWC order.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ADM_EVALUATIONS_URL = "https://github.com/openai/guided-diffusion/tree/main/evaluations"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download name
SFID_CHANNELS = 7  # ADM's evaluator keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 features


# ---------------------------------------------------------------------------------------------
# Reference images
# ---------------------------------------------------------------------------------------------


def center_crop_resize(image, size: int) -> np.ndarray:
    """PIL image -> uint8 (size, size, 3): ADM's ``center_crop_arr``, the ImageNet preprocessing
    DiT trains on, so real and generated images are framed alike.

    Halve with BOX filtering while the short side is >= 2x the target (cheap, alias-free), resize
    the short side to ``size`` with BICUBIC, then crop the centre."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top: top + size, left: left + size]


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"reference images not found: {path}. Give either an ADM reference batch .npz (e.g. "
        f"VIRTUAL_imagenet256_labeled.npz for ImageNet 256x256, linked from {ADM_EVALUATIONS_URL}) "
        f"or a folder of {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images (e.g. the ImageNet "
        "train or val set)."
    )


def _check_array_header(path: Path, shape: tuple, dtype: np.dtype, fortran: bool) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ValueError(
            f"{path}: arr_0 must be a C-ordered uint8 array (N, H, W, 3) like ADM's reference batches, "
            f"got dtype {dtype}, shape {tuple(shape)}{', Fortran order' if fortran else ''}. Convert "
            "images with np.uint8 in NHWC (channels last), or give a folder of images instead."
        )
    if shape[0] == 0:
        raise ValueError(f"{path}: arr_0 holds no images (shape {tuple(shape)})")


@contextlib.contextmanager
def _open_npz_member(path: Path, name: str = "arr_0"):
    """Yield (file object positioned at the array data, shape, dtype) of ``name`` in an .npz."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not an .npz (zip) file: {error}") from error
    with archive:
        if f"{name}.npy" not in archive.namelist():
            keys = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
            raise ValueError(
                f"{path} has no {name!r} array (it holds {keys}). ADM reference batches keep the images "
                f"in 'arr_0' (np.savez(path, images) writes that key); see {ADM_EVALUATIONS_URL}."
            )
        with archive.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"{path}: {name}.npy has .npy format version {version}; save it with np.savez")
            _check_array_header(path, shape, dtype, fortran)
            yield member, tuple(shape), dtype


def _read_exact(stream, size: int, path: Path) -> bytes:
    """Read ``size`` bytes: zip streams may return fewer per call."""
    chunks, remaining = [], size
    while remaining:
        data = stream.read(remaining)
        if not data:
            raise ValueError(f"{path}: arr_0 is truncated (file ended {remaining} bytes early)")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (a copy: the source may be read-only or memory-mapped)."""
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float().div_(255)


class ReferenceImages:
    """Real reference images, re-iterable in chunks of (n, 3, H, W) float32 in [0, 1].

    ``len()`` is the number of images a pass yields. Paths and file headers are checked here, so a
    wrong ``source`` fails at once rather than after an hour of sampling; a folder's image sizes
    are checked while reading (opening 50k files up front costs minutes)."""

    def __init__(self, source: str | Path, max_images: int | None = None, chunk_size: int = 250,
                 image_size: int | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 (or None for all), got {max_images}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 (or None to keep the stored size), got {image_size}")
        self.path = Path(source).expanduser()
        self.chunk_size, self.image_size = chunk_size, image_size
        if not self.path.exists():
            raise _missing(self.path)
        if self.path.is_dir():
            self.kind = "folder"
            self.files = sorted(
                (p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                key=lambda p: p.relative_to(self.path).as_posix(),
            )
            if not self.files:
                raise ValueError(
                    f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.path}; point at a folder of "
                    f"images or an ADM reference batch .npz ({ADM_EVALUATIONS_URL})"
                )
            total = len(self.files)
        elif self.path.suffix.lower() == ".npz":
            self.kind = "npz"
            with _open_npz_member(self.path) as (_, shape, _dtype):
                total = shape[0]
        elif self.path.suffix.lower() == ".npy":
            self.kind = "npy"
            array = np.load(self.path, mmap_mode="r")
            _check_array_header(self.path, array.shape, array.dtype, not array.flags.c_contiguous)
            total = array.shape[0]
        else:
            raise ValueError(f"{self.path}: expected an .npz/.npy reference batch or a folder of images")
        self.num_images = total if max_images is None else min(total, max_images)

    def __len__(self) -> int:
        return self.num_images

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.kind == "folder":
            yield from self._iter_folder()
        else:
            for batch in self._iter_npz() if self.kind == "npz" else self._iter_npy():
                yield _to_tensor(self._resize_array(batch))

    def _iter_npz(self) -> Iterator[np.ndarray]:
        with _open_npz_member(self.path) as (member, shape, dtype):
            image_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, self.num_images, self.chunk_size):
                n = min(self.chunk_size, self.num_images - start)
                yield np.frombuffer(_read_exact(member, n * image_bytes, self.path), dtype=dtype).reshape(n, *shape[1:])

    def _iter_npy(self) -> Iterator[np.ndarray]:
        array = np.load(self.path, mmap_mode="r")
        for start in range(0, self.num_images, self.chunk_size):
            yield array[start: min(start + self.chunk_size, self.num_images)]

    def _resize_array(self, batch: np.ndarray) -> np.ndarray:
        size = self.image_size
        if size is None or batch.shape[1:3] == (size, size):
            return batch
        from PIL import Image

        return np.stack([center_crop_resize(Image.fromarray(np.asarray(image)), size) for image in batch])

    def _iter_folder(self) -> Iterator[torch.Tensor]:
        from PIL import Image

        expected = None
        for start in range(0, self.num_images, self.chunk_size):
            arrays = []
            for path in self.files[start: min(start + self.chunk_size, self.num_images)]:
                try:
                    with Image.open(path) as image:
                        image = image.convert("RGB")  # drops alpha, expands grayscale/palette, as ADM does
                        size = self.image_size
                        array = np.asarray(image) if size is None else center_crop_resize(image, size)
                except OSError as error:
                    raise ValueError(f"cannot read image {path}: {error}") from error
                expected = expected or array.shape
                if array.shape != expected:
                    raise ValueError(
                        f"{path} is {array.shape[1]}x{array.shape[0]} but earlier images are "
                        f"{expected[1]}x{expected[0]}; pass image_size=N to center-crop and resize all "
                        "images to NxN (ADM's center_crop_arr)"
                    )
                arrays.append(array)
            yield _to_tensor(np.stack(arrays))


def load_reference_images(source: str | Path, max_images: int | None = None, chunk_size: int = 250,
                          image_size: int | None = None) -> ReferenceImages:
    """Stream real images from an ADM reference batch (.npz/.npy) or an image folder (recursive,
    sorted by relative path), ``chunk_size`` at a time, as (n, 3, H, W) float32 in [0, 1].

    ``max_images`` takes the first N (ADM batches are already shuffled); ``image_size`` center-crops
    and resizes to a square (ADM's ``center_crop_arr``), needed when a folder mixes sizes."""
    return ReferenceImages(source, max_images=max_images, chunk_size=chunk_size, image_size=image_size)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 in [0, 255], rounded, the input InceptionV3 expects.

    Pass uint8 when handing ``inception_feature_extractor()`` to torchmetrics as ``feature=``:
    torchmetrics then skips its own float conversion (``normalize`` only applies to its built-in net)."""
    if images.dtype == torch.uint8:
        return images
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (|a|² - 2 a·b + |b|², clamped at 0), as ADM computes them."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min_(0)


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour, itself excluded.

    Like ADM (and Kynkäänniemi et al.'s code), take the (k+1)-th smallest distance of the full row,
    which includes the point itself at 0: an exact duplicate therefore counts as a neighbour.
    Columns are visited in chunks, keeping a running k+1 smallest, so memory is chunk² not N²."""
    radii = []
    for i in range(0, len(features), chunk):
        rows, best = features[i: i + chunk], None
        for j in range(0, len(features), chunk):
            d = _squared_distances(rows, features[j: j + chunk])
            d = d if best is None else torch.cat([best, d], dim=1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3,
                     chunk: int = 1024) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
    Metric for Assessing Generative Models"), computed as ADM's evaluator does (k = 3).

    Each sample gets a ball reaching its k-th nearest neighbour within its own set. Precision is
    the share of fake samples inside some real ball (fidelity), recall the share of real samples
    inside some fake ball (diversity): quantization that keeps image quality but collapses modes
    shows up as lost recall, which FID mixes with everything else. Distances are computed in
    ``chunk`` x ``chunk`` blocks (torch, on the features' device, at least float32; ADM uses
    float16), so 50k x 50k never becomes one matrix. Returns {"precision": float, "recall": float}.
    """
    for name, x in (("real_features", real_features), ("fake_features", fake_features)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (num_samples, feature_dim), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if len(x) <= k:
            raise ValueError(f"{name} has {len(x)} samples; k={k} nearest neighbours need at least {k + 1}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or Inf; check the feature extractor's input range")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"feature dims differ: real {real_features.shape[1]} vs fake {fake_features.shape[1]}; "
                         "extract both sets with the same network and layer")
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    dtype = torch.promote_types(real_features.dtype, torch.float32)
    real = real_features.to(dtype)
    fake = fake_features.to(device=real.device, dtype=dtype)

    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    real_covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_covered = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    for i in range(0, len(real), chunk):
        for j in range(0, len(fake), chunk):
            d = _squared_distances(real[i: i + chunk], fake[j: j + chunk])
            fake_covered[j: j + chunk] |= (d <= real_radii[i: i + chunk, None]).any(dim=0)
            real_covered[i: i + chunk] |= (d <= fake_radii[None, j: j + chunk]).any(dim=1)
    return {"precision": fake_covered.double().mean().item(), "recall": real_covered.double().mean().item()}


# ---------------------------------------------------------------------------------------------
# Fréchet distance (for sFID; torchmetrics computes FID itself)
# ---------------------------------------------------------------------------------------------


def feature_statistics(features: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) in float64 of (N, D) features, like ``np.cov(rowvar=False)`` (ddof=1).

    Two passes over row chunks (mean, then centred products): no N x D float64 copy, and no
    cancellation from the one-pass sum-of-squares form."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(features.shape)}")
    mu = sum(features[i: i + chunk].double().sum(0) for i in range(0, len(features), chunk)) / len(features)
    sigma = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=features.device)
    for i in range(0, len(features), chunk):
        centred = features[i: i + chunk].double() - mu
        sigma += centred.T @ centred
    return mu, sigma / (len(features) - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), float64:
    |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½).

    tr((s1 s2)^½) is taken as the sum of sqrt-eigenvalues of s1^½ s2 s1^½ (symmetric PSD, same
    spectrum as s1 s2), so ``eigh`` applies: no complex parts or singular-product retries, unlike
    ``scipy.linalg.sqrtm``. Accepts torch tensors or numpy arrays."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(x, dtype=torch.float64).cpu() for x in (mu1, sigma1, mu2, sigma2))
    if mu1.dim() != 1 or mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1),) * 2:
        raise ValueError(f"shapes must be mu (D,) and sigma (D, D) on both sides, got mu {tuple(mu1.shape)}, "
                         f"{tuple(mu2.shape)} and sigma {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    middle = root1 @ ((sigma2 + sigma2.T) / 2) @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


# ---------------------------------------------------------------------------------------------
# InceptionV3 features
# ---------------------------------------------------------------------------------------------


def inception_feature_extractor(feature: int = 2048, antialias: bool = False,
                                weights_path: str | Path | None = None) -> torch.nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` (the TF FID Inception ported by torch-fidelity), eval mode.

    Input: uint8 (N, 3, H, W), resized to 299 inside (use ``to_uint8`` on [0, 1] images); output
    (N, feature). ``antialias=False`` keeps torch-fidelity's TF1-style bilinear resize, the closest
    to ADM's graph (torchmetrics' own FID defaults to True): keep one setting across a comparison.
    Hand it to torchmetrics as ``FrechetInceptionDistance(feature=extractor)``."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    where = (f"on an offline machine, download {INCEPTION_WEIGHTS_FILE} (torch-fidelity's release assets, "
             f"https://github.com/toshas/torch-fidelity/releases) elsewhere and put it at {cache} "
             "(TORCH_HOME/hub/checkpoints), or pass weights_path=")
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "the InceptionV3 feature extractor needs torch-fidelity: pip install torch-fidelity "
            f"(or this package's `inception` extra: pip install -e '.[inception]'); {where}"
        )
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(f"InceptionV3 weights not found at {weights_path}; {where}")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(feature)],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path), antialias=antialias,
        )
    except (OSError, RuntimeError) as error:  # URLError is an OSError: no network to fetch the weights
        raise RuntimeError(f"could not load the InceptionV3 weights ({error}); {where}") from error


@torch.no_grad()
def inception_features(extractor: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Inception pass -> (pooled features as the extractor returns them, sFID spatial features).

    The spatial features are ADM's: ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1``,
    the ReLU output, (N, 192, 17, 17)), first 7 channels, flattened channels-last (N, 2023) in the
    order of ADM's NHWC TensorFlow graph. ``images``: uint8, or floats in [0, 1]."""
    block = getattr(getattr(extractor, "Mixed_6d", None), "branch1x1", None)
    if block is None:
        raise ValueError(
            f"{type(extractor).__name__} has no Mixed_6d.branch1x1 layer: sFID's spatial features come from "
            "torch-fidelity's InceptionV3; build it with inception_feature_extractor()"
        )
    captured = []
    handle = block.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        pooled = extractor(to_uint8(images))
    finally:
        handle.remove()
    spatial = captured[-1][:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(len(images), -1)
    return pooled, spatial.float()


def spatial_features(extractor: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """sFID features (N, 2023) of ``images`` (see ``inception_features``)."""
    return inception_features(extractor, images)[1]
