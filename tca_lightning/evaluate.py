"""Image-quality evaluation of a (quantized) diffusion transformer: FID, KID, IS, accuracy, fidelity.

Metrics come from torchmetrics with a pluggable feature extractor: the shipped
``mnist-features`` classifier for the tiny models (FID/KID on its 128-d penultimate features,
IS on its class probabilities, scored against the 500 held-out real digits), torchmetrics'
InceptionV3 for real models. Conditional accuracy is the share of samples the classifier
assigns to the requested class. Paired fidelity (PSNR/MSE in [0, 1] pixel space over the
whole set) compares against a reference model's images on identical noise: the least noisy
way to rank quantization methods.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric, MeanSquaredError
from torchmetrics.image import PeakSignalNoiseRatio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from tca_lightning.data.calibration import uses_digit_captions, weights_digest
from tca_lightning.data.conditions import batch_condition
from tca_lightning.methods.base import QuantMethod, QuantRecipe
from tca_lightning.models.adapters import DiffusionAdapter, get_adapter
from tca_lightning.models.classifier import ClassifierLogits
from tca_lightning.models.loading import load_classifier, load_model
from tca_lightning.models.samplers import SamplerConfig, decode, sample
from tca_lightning.ptq import CalibrationConfig, quantize_model

REAL_SETS = ("mnist-heldout", "mnist-train")


class PackedCheckpoint(QuantMethod):
    """What ``quantized=PATH`` evaluates: a packed checkpoint's method and recipe, nothing to calibrate.

    Held as the evaluator's ``quantization`` so every subclass (ARC) that asks "is a quantized model
    evaluated?" through ``self.quantization`` sees one, and compares it with the FP reference."""

    def __init__(self, path: str, config: dict):
        recipe = config.get("recipe")
        super().__init__(QuantRecipe(**recipe) if isinstance(recipe, dict) else QuantRecipe())
        self.name, self.path, self.config = config.get("method") or "packed", str(path), config


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON through a temp file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite(value):
    """Strict JSON has no Infinity/NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def image_grid(images: torch.Tensor, ncols: int = 10, pad: int = 2) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') grid image, row-major, white padding."""
    n, c, h, w = images.shape
    nrows = -(-n // ncols)
    grid = torch.ones(c, nrows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png_atomic(grid: torch.Tensor, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    array = grid.permute(1, 2, 0).cpu().numpy()
    plt.imsave(tmp, array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", vmin=0.0, vmax=1.0)
    os.replace(tmp, path)


def real_digits(split: str) -> torch.Tensor:
    from tca_lightning.data.digits import load_digits

    if split not in REAL_SETS:
        raise ValueError(f"real_images must be one of {REAL_SETS} for the tiny models, got {split!r}")
    images, _ = load_digits("heldout" if split == "mnist-heldout" else "train")
    return (images + 1) / 2


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def clip_score_metric(model: str):
    """torchmetrics' CLIPScore for ``model`` (a hub id or local folder), or a clear error saying what is missing."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        return CLIPScore(model_name_or_path=model)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"clip_model={model!r}: the CLIP score needs transformers (pip install transformers, "
                                  f"or this package's `t5` extra) ({err})") from None
    except (OSError, ValueError) as err:
        raise OSError(f"could not load the CLIP model {model!r} ({type(err).__name__}: {err}); on a machine with "
                      f"internet run `huggingface-cli download {model}` and copy the cache here, or pass its folder") from None


def save_sample_shard(path: Path, images01: torch.Tensor, batch: dict) -> torch.Tensor:
    """Write a batch's images as uint8 NHWC (ADM's sample format) with their indices; returns the images as
    stored (uint8 back to [0, 1]), so a fresh run and a resumed one score the very same pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    from tca_lightning.reference_sets import to_uint8

    pixels = to_uint8(images01).permute(0, 2, 3, 1).cpu().numpy()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, arr_0=pixels, indices=np.asarray([int(i) for i in batch["index"]]),
             labels=np.asarray([int(v) for v in batch["label"]]))
    os.replace(tmp, path)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float() / 255


def load_sample_shard(path: Path, batch: dict) -> torch.Tensor:
    with np.load(path) as shard:
        if [int(i) for i in shard["indices"]] != [int(i) for i in batch["index"]]:
            raise ValueError(f"sample shard {path} holds samples {shard['indices'].tolist()}, not this batch's "
                             f"{[int(i) for i in batch['index']]}: delete it (or the folder) and rerun")
        pixels = torch.from_numpy(shard["arr_0"])
    return pixels.permute(0, 3, 1, 2).contiguous().float() / 255


class ImageMetrics(torch.nn.Module):
    """FID, KID, IS, conditional accuracy and paired PSNR/MSE, accumulated over batches (DDP-synced).

    Without a classifier (``None``: no real set to score against, e.g. a random model in CI) only the
    paired PSNR/MSE against the reference are computed. ``inception`` (real models: ADM's FID, sFID, IS,
    precision and recall on Inception-v3 features, tca_lightning.adm_metrics) scores RGB images instead
    of the digit classifier."""

    def __init__(self, classifier: torch.nn.Module | None, kid_subset_size: int = 100, inception=None, clip=None):
        super().__init__()
        self.clip = clip  # CLIPScore (torchmetrics) of images vs their captions, for caption models
        if classifier is not None and inception is not None:
            raise ValueError("score with the digit classifier or with Inception, not both")
        self.inception = inception
        self.classifier = classifier.eval().requires_grad_(False) if classifier is not None else None
        self.fid = self.kid = self.inception_score = self.cond_acc = None
        if classifier is not None:
            self.fid = FrechetInceptionDistance(feature=classifier, reset_real_features=False)
            self.kid = KernelInceptionDistance(feature=classifier, reset_real_features=False, subset_size=kid_subset_size)
            self.inception_score = InceptionScore(feature=ClassifierLogits(classifier), splits=10)
            self.cond_acc = MeanMetric()
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.mse = MeanSquaredError()
        self.kid_subset_size = kid_subset_size
        self.num_real = 0
        self.num_fake = 0

    @property
    def scores_distribution(self) -> bool:
        return self.classifier is not None

    def reset(self) -> None:
        """Forget everything, real features included (they survive FID/KID's own reset)."""
        for metric in (self.fid, self.kid, self.inception_score, self.cond_acc, self.psnr, self.mse, self.inception,
                       self.clip):
            if metric is not None:
                metric.reset()
        for metric in (self.fid, self.kid) if self.scores_distribution else ():
            for name, default in metric._defaults.items():
                if name.startswith("real"):
                    setattr(metric, name, default.clone() if isinstance(default, torch.Tensor) else [])
        if self.kid is not None:
            self.kid.subset_size = self.kid_subset_size
        self.num_real = 0
        self.num_fake = 0

    def _to_model_range(self, images01: torch.Tensor) -> torch.Tensor:
        return images01 * 2 - 1  # the classifier reads [-1, 1]

    def update_real(self, images01: torch.Tensor) -> None:
        if self.inception is not None:
            self.inception.update(images01, real=True)
            self.num_real += len(images01)
            return
        x = self._to_model_range(images01)
        self.fid.update(x, real=True)
        self.kid.update(x, real=True)
        self.num_real += len(x)

    def update(self, images01: torch.Tensor, labels: torch.Tensor, reference01: torch.Tensor | None = None,
               captions: list[str] | None = None) -> None:
        if self.clip is not None:
            if captions is None:
                raise ValueError("CLIP score needs the captions of the images")
            from tca_lightning.reference_sets import to_uint8

            rgb = images01.expand(-1, 3, -1, -1) if images01.shape[1] == 1 else images01
            self.clip.update(to_uint8(rgb), list(captions))
        if self.inception is not None:
            self.inception.update(images01, real=False)
        if self.scores_distribution:
            x = self._to_model_range(images01)
            self.fid.update(x, real=False)
            self.kid.update(x, real=False)
            self.inception_score.update(x)
            with torch.no_grad():
                pred = self.classifier.logits(x).argmax(1)
            self.cond_acc.update((pred == labels.to(pred.device)).float())
        if reference01 is not None:
            self.psnr.update(images01, reference01)
            self.mse.update(images01, reference01)
        self.num_fake += len(images01)

    def compute(self, seed: int = 0) -> dict:
        out = self.inception.compute() if self.inception is not None else {}
        if self.clip is not None:
            out["clip_score"] = float(self.clip.compute())
        if self.scores_distribution:
            out.update(self._distribution_scores(seed))
        if self.psnr.update_count > 0:
            out["psnr_vs_fp"] = float(self.psnr.compute())
            out["mse_vs_fp"] = float(self.mse.compute())
        return out

    def _distribution_scores(self, seed: int) -> dict:
        n_real = int(sum(len(f) for f in self.kid.real_features))
        n_fake = int(sum(len(f) for f in self.kid.fake_features))
        self.kid.subset_size = max(2, min(self.kid_subset_size, n_real, n_fake))
        with torch.random.fork_rng():  # KID subsets and IS splits draw from the global RNG
            torch.manual_seed(seed)
            kid_mean, kid_std = self.kid.compute()
            is_mean, is_std = self.inception_score.compute()
        return {
            "fid": float(self.fid.compute()),
            "kid": float(kid_mean), "kid_std": float(kid_std),
            "is": float(is_mean), "is_std": float(is_std),
            "cond_acc": float(self.cond_acc.compute()),
        }


class DiffusionEvaluator(L.LightningModule):
    """Samples a model on the data module's conditions and scores it (``test``)."""

    def __init__(
        self,
        model: str = "tiny-dit",
        sampler: SamplerConfig = SamplerConfig(),
        reference: str | None = None,
        method: str = "fp",
        wbits: int = 32,
        abits: int = 32,
        classifier: str | None = None,
        real_images: str | None = "mnist-heldout",
        kid_subset_size: int = 100,
        real_image_size: int | None = None,
        grid_samples: int = 100,
        vae: str | None = None,
        reference_cache: str | None = "cache/reference",
        quantization: QuantMethod | None = None,
        calibration: CalibrationConfig = CalibrationConfig(),
        quantized: str | None = None,
        model_config: dict | None = None,
        vae_config: dict | None = None,
        sample_dir: str | None = None,
        clip_model: str | None = None,
        text_encoder: str | None = None,
        text_encoder_cache: str | None = "cache/captions",
    ):
        """
        Args:
            model: embedded name (tiny-dit, tiny-pixart), local folder, hub id, or random:<arch>.
            sampler: scheduler, steps, guidance scale and noise seed.
            reference: a model whose images on identical noise are the PSNR/MSE reference (e.g. the FP model).
            method: name recorded in metrics.json (the quantization method; "fp" for none).
            wbits: weight bits recorded in metrics.json (32 for FP32).
            abits: activation bits recorded in metrics.json.
            classifier: folder of the feature classifier (default: the shipped mnist-features).
            real_images: real set: mnist-heldout (500 images) or mnist-train (4,500) for the tiny models (FID/KID/IS
                on the digit classifier); an ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz) or a folder
                of images for real models (FID, sFID, IS, precision/recall on Inception-v3: needs torch-fidelity
                and its weights); None scores only the paired PSNR/MSE against the reference.
            real_image_size: center-crop and resize a folder's real images to this size (ADM's preprocessing).
            kid_subset_size: KID subset size (capped by the number of samples).
            grid_samples: how many samples go into the PNG grid.
            vae: AutoencoderKL folder/hub id for latent models.
            reference_cache: folder where the reference model's images are kept, keyed by its weights,
                the sampler and the sample indices, so comparing many methods samples the FP model once.
            quantization: a method (tca_lightning.methods.*) to calibrate and apply before sampling;
                the FP model then becomes the PSNR/MSE reference unless ``reference`` is given.
            calibration: the calibration budget shared by all methods.
            quantized: a packed checkpoint from Finalize/save_quantized (e.g. runs/tiny_dit/version_0/quantized):
                evaluate it with the integer kernels (tca_lightning.load_quantized) instead of ``model``, which
                stays the FP reference for PSNR/MSE (use the model the checkpoint was made from).
            model_config: config entries replacing a ``random:<arch>`` model's (configs/shrink/*.yaml).
            vae_config: config entries replacing a ``random:<arch>`` VAE's.
            sample_dir: keep every batch's images as a uint8 shard ``<sample_dir>/<key>/batch-<b>.npz`` (key: the
                evaluated weights, sampler, VAE and batching); a rerun loads finished shards instead of sampling,
                so an interrupted evaluation resumes, on any device count (the shards do not depend on it).
                Metrics then score the uint8 images, as ADM's evaluator does.
            clip_model: caption models: also score the CLIP score of each image against its caption (torchmetrics
                CLIPScore; needs transformers and the weights, e.g. openai/clip-vit-large-patch14 or its local folder).
            text_encoder: caption encoder of a PixArt model (tca_lightning.models.text_encoders.caption_encoder):
                ``t5:<hub id or folder>`` (PixArt-alpha's T5-XXL; needs transformers), ``precomputed:<file>``
                (embeddings computed elsewhere; no T5 needed) or ``hashed[:<dim>]`` (a deterministic stand-in for
                random shrunk models). None: the model's own (tiny-pixart ships one).
            text_encoder_cache: folder where T5 embeddings are kept per caption, so T5 runs once per caption.
        """
        super().__init__()
        self.save_hyperparameters()
        self.sampler = sampler if isinstance(sampler, SamplerConfig) else SamplerConfig(**sampler)
        loaded = load_model(model, vae=vae, seed=self.sampler.seed, model_config=model_config, vae_config=vae_config)
        self.transformer = loaded.transformer.requires_grad_(False)
        self.caption_encoder = loaded.caption_encoder
        if text_encoder is not None:
            self.caption_encoder = self.text_encoder_for(loaded.transformer, text_encoder, text_encoder_cache)
        self.vae = loaded.vae
        self.scheduler_config = loaded.scheduler_config
        self.reference_model = None
        if reference is not None:
            ref = load_model(reference, seed=self.sampler.seed)
            self.reference_model = ref.transformer.requires_grad_(False)
            self.reference_captions = ref.caption_encoder
        self.quantization = quantization
        if quantized is not None:
            self.quantization = self.packed_checkpoint(quantized, model, quantization)
        self.calibration = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig(**calibration)
        self._quant_record: dict = {}
        if quantization is not None and reference is None:
            self.reference_model = copy.deepcopy(self.transformer)
            self.reference_captions = self.caption_encoder
        elif quantized is not None and reference is None:
            # the FP model stays the reference: setup() rebinds self.transformer to the packed one, not this
            self.reference_model, self.reference_captions = self.transformer, self.caption_encoder
        self.metrics = self.image_metrics(real_images, classifier, kid_subset_size)
        self.metrics.clip = clip_score_metric(clip_model) if clip_model is not None else None
        self._grid: list[torch.Tensor] = []
        self._sampling_seconds = 0.0

    @staticmethod
    def image_metrics(real_images: str | None, classifier: str | None, kid_subset_size: int) -> ImageMetrics:
        """Digit classifier for the tiny models' real sets, Inception for a real image source, else paired only."""
        if real_images is None:
            return ImageMetrics(None)
        if real_images in REAL_SETS:
            return ImageMetrics(load_classifier(classifier), kid_subset_size)
        from tca_lightning.adm_metrics import InceptionMetrics
        from tca_lightning.reference_sets import load_reference_images

        load_reference_images(real_images, max_images=1)  # a wrong path fails now, not after the sampling
        return ImageMetrics(None, inception=InceptionMetrics())

    @staticmethod
    def text_encoder_for(transformer: torch.nn.Module, spec: str, cache_dir: str | None) -> torch.nn.Module:
        from tca_lightning.models.text_encoders import caption_encoder

        if get_adapter(transformer).kind != "pixart":
            raise ValueError(f"text_encoder ({spec!r}) conditions caption models (PixArt); this model is a "
                             f"{type(transformer).__name__}: drop text_encoder")
        channels = transformer.config.caption_channels
        if spec.split(":", 1)[0] == "hashed" and ":" not in spec:
            spec = f"hashed:{channels}"  # the stand-in takes the transformer's width
        encoder = caption_encoder(spec, cache_dir=cache_dir)
        width = getattr(encoder, "embed_dim", None)
        if width is not None and width != channels:
            raise ValueError(f"text_encoder {spec!r} gives {width}-wide embeddings; the transformer's caption_channels "
                             f"is {channels}")
        return encoder

    @staticmethod
    def packed_checkpoint(path: str, model: str, quantization) -> PackedCheckpoint:
        """Validate a ``quantized`` checkpoint up front (a wrong path fails before any sampling)."""
        from tca_lightning.export import read_quantized_config

        if quantization is not None:
            raise ValueError("model.init_args.quantization (calibrate a method now) and model.init_args.quantized "
                             "(evaluate a packed checkpoint) exclude each other: give one of them")
        config = read_quantized_config(path)
        if config.get("model") not in (None, model):
            warnings.warn(f"the packed checkpoint {path} was made from {config.get('model')!r}, but model is "
                          f"{model!r}: PSNR/MSE compare against {model!r} (pass the model it came from)", stacklevel=2)
        return PackedCheckpoint(path, config)

    # The metrics' networks (digit classifier, InceptionV3, CLIP) belong to the evaluation, not the model: a
    # checkpoint leaves them out (CLIP alone is 1.7 GB), and loading one fills in the current metrics', so a
    # checkpoint evaluates under any real_images / clip_model setting.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("metrics.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.setdefault("state_dict", {})
        for key in [k for k in state if k.startswith("metrics.")]:
            del state[key]  # an older checkpoint's metric networks: the current ones stand
        state.update({f"metrics.{k}": v for k, v in self.metrics.state_dict().items()})

    @property
    def adapter(self) -> DiffusionAdapter:
        return get_adapter(self.transformer, self.caption_encoder)

    @property
    def is_quantized(self) -> bool:
        """Whether ``test`` evaluates a quantized model (then compared with the FP reference)."""
        return self.quantization is not None

    @property
    def compares_to_reference(self) -> bool:
        return self.reference_model is not None

    def generate(self, adapter: DiffusionAdapter, batch: dict) -> torch.Tensor:
        x0 = sample(adapter, batch_condition(adapter, batch, self.device), batch["index"], self.sampler,
                    self.scheduler_config, progress=False)
        return decode(x0, self.vae)

    def setup(self, stage: str) -> None:
        if isinstance(self.quantization, PackedCheckpoint):
            self.load_packed()
            return
        if self.quantization is None or self._quant_record:
            return
        self.move_to_calibration_device()
        record = quantize_model(self.adapter, self.quantization, self.sampler, self.calibration, self.hparams.model)
        stats = record.pop("stats")
        self._quant_record = record
        out_dir = self.run_dir() if self._trainer is not None else None
        if stats is not None and out_dir is not None and self.trainer.is_global_zero:
            from tca_lightning.callbacks.anomaly import pick_layers, write_anomaly_heatmaps

            names = pick_layers([(n, self.quantization_roles.get(n, "")) for n in stats.absmax])
            write_anomaly_heatmaps(stats.absmax, stats.timesteps, names, out_dir / "anomaly_heatmaps_fp.png",
                                   title=f"{self.hparams.model}: FP input absmax per timestep", logger=self.logger)

    def load_packed(self) -> None:
        """Swap the evaluated transformer for the packed checkpoint's (integer kernels); the FP one stays
        the reference. Done in setup, after subclasses' __init__ copied the FP model (ARC's teacher)."""
        if self._quant_record:
            return
        from tca_lightning.export import load_quantized

        self.transformer = load_quantized(self.quantization.path, device=self.device)
        self._quant_record = {"quantized": self.quantization.path}

    def move_to_calibration_device(self, adapter: DiffusionAdapter | None = None) -> None:
        """Lightning moves the module to its device only after setup(), where calibration runs: move the
        model there first (or to ``calibration.device``) so trajectories and statistics use the GPU."""
        adapter = adapter or self.adapter
        device = self.calibration.device or (self.trainer.strategy.root_device if self._trainer is not None else None)
        if device is not None:
            for module in (adapter.transformer, adapter.caption_encoder):
                if module is not None:
                    module.to(device)

    def run_dir(self) -> Path:
        """The run's folder (runs/<name>/version_N). Call it on every rank: under DDP, Trainer.log_dir
        broadcasts rank 0's value, so calling it on rank 0 alone deadlocks."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def record_overrides(self) -> dict:
        """What metrics.json says about the quantization (method name and bits)."""
        if self.quantization is None:
            return {}
        record = {"method": self.quantization.name, "wbits": self.quantization.recipe.wbits,
                  "abits": self.quantization.recipe.abits}
        if isinstance(self.quantization, PackedCheckpoint):
            record["kernels"] = "integer"
        return record

    @property
    def feature_extractor_name(self) -> str | None:
        if self.metrics.inception is not None:
            return "inception-v3 (torch-fidelity)"
        return (self.hparams.classifier or "mnist-features") if self.hparams.real_images else None

    @property
    def quantization_roles(self) -> dict[str, str]:
        return {r.name: r.role for r in self.adapter.linears()}

    def on_test_start(self) -> None:
        self._shard_key = None  # the evaluated weights may have changed since the last test (fit -> test)
        dataset = getattr(getattr(self.trainer, "datamodule", None), "dataset", None)
        if (self.adapter.kind != "dit" and getattr(dataset, "captions", "") is None
                and not uses_digit_captions(self.adapter)):
            raise ValueError("data.init_args.captions is missing: a caption model other than tiny-pixart is evaluated "
                             "on captions from a file (COCO captions JSON, MJHQ-30K meta_data.json or txt)")
        self.metrics.reset()
        self._grid, self._sampling_seconds = [], 0.0
        if self.metrics.inception is not None:
            from tca_lightning.reference_sets import load_reference_images

            chunks = load_reference_images(self.hparams.real_images, image_size=self.hparams.real_image_size)
            for i, chunk in enumerate(chunks):
                if i % self.trainer.world_size == self.global_rank:  # each rank a share; the metric gathers them
                    self.metrics.update_real(chunk.to(self.device))
            return
        if not self.metrics.scores_distribution:
            return
        real = real_digits(self.hparams.real_images)
        shard = real[self.global_rank::self.trainer.world_size].to(self.device)
        for chunk in shard.split(250):
            self.metrics.update_real(chunk)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        shard = self.sample_shard(batch)
        if shard is not None and shard.is_file():
            images = load_sample_shard(shard, batch).to(self.device)
        else:
            start = time.perf_counter()
            images = self.generate(self.adapter, batch)
            self._sampling_seconds += time.perf_counter() - start
            if shard is not None:
                images = save_sample_shard(shard, images, batch).to(self.device)
        reference = self.reference_images(batch) if self.compares_to_reference else None
        if not self.is_quantized and self.hparams.reference is None:
            self.store_reference(self.transformer, self.caption_encoder, batch, images)  # later PTQ runs reuse them
        self.metrics.update(images, batch["label"], reference, batch["caption"] if self.metrics.clip is not None else None)
        kept = sum(len(g) for g in self._grid)
        if kept < self.hparams.grid_samples:
            self._grid.append(images[: self.hparams.grid_samples - kept].cpu())

    def sample_shard(self, batch: dict) -> Path | None:
        """Where this batch's images are kept (``sample_dir``), or None."""
        if self.hparams.sample_dir is None:
            return None
        if "batch" not in batch or "batch_size" not in batch:
            raise ValueError("sample_dir needs batches numbered by SamplingDataModule ('batch' and 'batch_size')")
        if getattr(self, "_shard_key", None) is None:
            self._shard_key = hashlib.sha256(json.dumps({
                "weights": weights_digest(self.transformer, self.caption_encoder), "vae": self.hparams.vae,
                "vae_config": self.hparams.vae_config, "sampler": dataclasses.asdict(self.sampler),
                "batch_size": int(batch["batch_size"]),
            }, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(self.hparams.sample_dir) / self._shard_key / f"batch-{int(batch['batch']):06d}.npz"

    def reference_path(self, model: torch.nn.Module, captions, batch: dict) -> Path | None:
        """Where a model's images for this batch live in ``reference_cache``, keyed by weights, sampler and noise."""
        if self.hparams.reference_cache is None:
            return None
        digests = self.__dict__.setdefault("_digests", {})
        if id(model) not in digests:
            digests[id(model)] = weights_digest(model, captions)
        key = hashlib.sha256(json.dumps({
            "weights": digests[id(model)], "sampler": dataclasses.asdict(self.sampler),
            "indices": [int(i) for i in batch["index"]], "captions": list(batch["caption"]),
            "labels": [int(v) for v in batch["label"]], "vae": self.hparams.vae,
        }, sort_keys=True).encode()).hexdigest()[:24]
        return Path(self.hparams.reference_cache) / f"{key}.pt"

    def store_reference(self, model: torch.nn.Module, captions, batch: dict, images: torch.Tensor) -> None:
        path = self.reference_path(model, captions, batch)
        if path is None or path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(images.cpu(), tmp)
        os.replace(tmp, path)

    def reference_images(self, batch: dict) -> torch.Tensor:
        path = self.reference_path(self.reference_model, self.reference_captions, batch)
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True).to(self.device)
        images = self.generate(get_adapter(self.reference_model, self.reference_captions), batch)
        self.store_reference(self.reference_model, self.reference_captions, batch, images)
        return images

    def on_test_epoch_end(self) -> None:
        results = self.metrics.compute(seed=self.sampler.seed)
        num_samples = int(self.trainer.strategy.reduce(torch.tensor(float(self.metrics.num_fake)), reduce_op="sum"))
        hp, sp = self.hparams, self.sampler
        record = {
            "model": hp.model, "method": hp.method, "wbits": hp.wbits, "abits": hp.abits, **self.record_overrides(),
            **self._quant_record,
            "num_samples": num_samples, "steps": sp.num_steps, "scheduler": sp.scheduler,
            "guidance_scale": sp.guidance_scale, "seed": sp.seed,
            "reference": hp.reference or ("fp" if self.compares_to_reference else None),
            "real_images": hp.real_images, "feature_extractor": self.feature_extractor_name,
            "sampling_seconds": round(self._sampling_seconds, 2), "peak_rss_mb": peak_rss_mb(), **results,
        }
        self.log_dict({f"test/{k}": v for k, v in results.items()}, sync_dist=False, rank_zero_only=True)
        out_dir = self.run_dir()
        if self.trainer.is_global_zero:
            write_json_atomic(out_dir / "metrics.json", record)
            if self._grid:
                grid = image_grid(torch.cat(self._grid))
                save_png_atomic(grid, out_dir / "samples.png")
                experiment = getattr(self.logger, "experiment", None)
                if hasattr(experiment, "add_image"):
                    experiment.add_image("samples", grid, global_step=self.global_step)
            print(json.dumps(record, indent=2))
        self.results = record
