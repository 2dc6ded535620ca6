"""Resolve a model name, local path or hub id to a diffusers transformer (and its helpers).

Accepted ``model`` strings:
- ``tiny-dit`` / ``tiny-pixart``: the embedded models shipped in ``tca_lightning/weights``;
- a local folder: a transformer folder (``config.json`` + weights) or a pipeline folder
  (with ``transformer/``, and optionally ``vae/`` and ``scheduler/``);
- a hub id (``facebook/DiT-XL-2-256``, ``PixArt-alpha/PixArt-XL-2-512x512``): loaded through
  diffusers from the local Hugging Face cache or the hub;
- ``random:<arch>`` with ``<arch>`` in :data:`ARCHITECTURES`: the real architecture from its
  config with random weights, for speed and memory benchmarks that do not depend on values;
  ``model_config`` replaces entries of that config (configs/shrink/*.yaml: the same classes at tiny
  widths, so every real config runs end to end in CI without weights).

VAEs resolve the same way: a folder or hub id of an ``AutoencoderKL``, or ``random:<arch>`` with
``<arch>`` in :data:`VAE_ARCHITECTURES` (and ``vae_config`` overrides).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from tca_lightning.models.captions import TinyCaptionEncoder
from tca_lightning.models.tiny import TINY_DIT_CONFIG, TINY_PIXART_CONFIG

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
EMBEDDED = ("tiny-dit", "tiny-pixart")
CLASSIFIER = "mnist-features"

# Transformer configs of the published checkpoints (their config.json), for random-weight instantiation.
_DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                 patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate")
ARCHITECTURES: dict[str, tuple[type, dict]] = {
    "dit-xl-2-256": (DiTTransformer2DModel, {**_DIT_XL_2, "sample_size": 32}),
    "dit-xl-2-512": (DiTTransformer2DModel, {**_DIT_XL_2, "sample_size": 64}),
    "pixart-alpha-512": (PixArtTransformer2DModel, dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=64, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False, activation_fn="gelu-approximate")),
    "tiny-dit": (DiTTransformer2DModel, TINY_DIT_CONFIG),
    "tiny-pixart": (PixArtTransformer2DModel, TINY_PIXART_CONFIG),
}
# AutoencoderKL configs: DiT-XL/2 and PixArt-alpha both decode with Stable Diffusion's VAE (sd-vae-ft-ema).
VAE_ARCHITECTURES: dict[str, dict] = {
    "sd-vae-ft-ema": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
                          block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215),
}
_CLASSES = {"DiTTransformer2DModel": DiTTransformer2DModel, "PixArtTransformer2DModel": PixArtTransformer2DModel}


class ModelNotFoundError(FileNotFoundError):
    """A model name, path or hub id that cannot be resolved to weights; the message says what to do."""


@dataclass
class LoadedModel:
    """A transformer plus what sampling it needs: caption encoder (tiny-pixart), VAE (latent models)."""

    name: str
    transformer: torch.nn.Module
    caption_encoder: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    scheduler_config: dict = field(default_factory=dict)


def load_model(model: str, *, vae: str | None = None, torch_dtype: torch.dtype | None = None,
               seed: int = 0, model_config: dict | None = None, vae_config: dict | None = None) -> LoadedModel:
    """Load ``model`` (see module docstring) in eval mode; ``vae`` is a folder/hub id (or random:<arch>)
    for latent models; ``model_config`` / ``vae_config`` override a random architecture's config."""
    if not isinstance(model, str) or not model:
        raise ModelNotFoundError(f"model must be a non-empty string (a name, path or hub id), got {model!r}")
    if model_config and not model.startswith("random:"):
        raise ValueError(f"model_config overrides a random:<arch> model's architecture; {model!r} is loaded with "
                         "its own config.json: drop model_config or use random:<arch>")
    if vae_config and not (vae or "").startswith("random:"):
        raise ValueError(f"vae_config overrides a random:<arch> VAE's architecture; vae is {vae!r}: drop "
                         "vae_config or use vae: random:<arch>")
    if model.startswith("random:"):
        loaded = _random_model(model, seed, model_config or {})
    elif model in EMBEDDED:
        loaded = _load_folder(WEIGHTS / model, model)
    elif Path(model).expanduser().exists():
        loaded = _load_folder(Path(model).expanduser(), model)
    elif "/" not in model:
        raise ModelNotFoundError(f"unknown model name {model!r}: not an embedded model {EMBEDDED}, not an existing "
                                 f"path, not a hub id (owner/name), not random:<arch> with <arch> in {sorted(ARCHITECTURES)}")
    elif _looks_like_path(model):
        raise ModelNotFoundError(f"model path {model!r} does not exist. Give an existing folder holding config.json "
                                 f"(a transformer) or transformer/ (a pipeline), or one of the names {EMBEDDED}.")
    else:
        loaded = _load_hub(model)
    if vae is not None:
        loaded.vae = _random_vae(vae, seed, vae_config or {}) if vae.startswith("random:") else _load_vae(vae)
    if torch_dtype is not None:
        loaded.transformer.to(torch_dtype)
    loaded.transformer.eval()  # a DiT left in train mode drops 10% of labels at random
    return loaded


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") != 1 or model.endswith("/")


def _random_model(model: str, seed: int, overrides: dict) -> LoadedModel:
    arch = model.split(":", 1)[1]
    if arch not in ARCHITECTURES:
        raise ModelNotFoundError(f"unknown architecture {arch!r} in {model!r}; choose one of {sorted(ARCHITECTURES)}")
    cls, config = ARCHITECTURES[arch]
    config = {**config, **_checked_overrides(overrides, config, model)}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = cls(**config)
    encoder = TinyCaptionEncoder(embed_dim=config["caption_channels"]) if arch == "tiny-pixart" else None
    return LoadedModel(model, transformer, caption_encoder=encoder)


def _random_vae(vae: str, seed: int, overrides: dict):
    from diffusers import AutoencoderKL

    arch = vae.split(":", 1)[1]
    if arch not in VAE_ARCHITECTURES:
        raise ModelNotFoundError(f"unknown VAE architecture {arch!r} in {vae!r}; choose one of {sorted(VAE_ARCHITECTURES)}")
    config = {**VAE_ARCHITECTURES[arch], **_checked_overrides(overrides, VAE_ARCHITECTURES[arch], vae)}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(**config).eval()


def _checked_overrides(overrides: dict, config: dict, name: str) -> dict:
    """Overrides of known keys only: a typo must not silently build the full-size model."""
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for {name!r}; known: {sorted(config)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def _transformer_class(folder: Path) -> type:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: expected a diffusers transformer folder "
                                 "(save_pretrained output) or a pipeline folder with transformer/")
    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in _CLASSES:
        raise ModelNotFoundError(f"{config_file} describes a {name!r}; supported transformers are {sorted(_CLASSES)}")
    return _CLASSES[name]


def _load_folder(folder: Path, name: str) -> LoadedModel:
    if folder.exists() and not folder.is_dir():
        raise ModelNotFoundError(f"model path {folder} is a file; give the folder that holds config.json "
                                 "(a transformer) or transformer/ (a pipeline)")
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} is missing; reinstall tca_lightning or retrain it with "
                                 f"`python -m tca_lightning.train_tiny {name}`")
    root, transformer_dir = folder, folder
    if (folder / "transformer").is_dir():
        transformer_dir = folder / "transformer"
    transformer = _transformer_class(transformer_dir).from_pretrained(transformer_dir, low_cpu_mem_usage=False)
    encoder = None
    if (root / "caption_encoder").is_dir():
        encoder = TinyCaptionEncoder.from_pretrained(root / "caption_encoder")
    vae = _load_vae(str(root / "vae")) if (root / "vae").is_dir() else None
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    return LoadedModel(name, transformer, caption_encoder=encoder, vae=vae, scheduler_config=scheduler_config)


def _load_hub(model: str) -> LoadedModel:
    """A hub id through diffusers: a pipeline repo (transformer/ subfolder) or a bare transformer repo."""
    from huggingface_hub import hf_hub_download

    try:
        local = _hub_cached_or_reachable(model)
        try:
            subfolder = "transformer"
            config_file = hf_hub_download(model, "config.json", subfolder=subfolder, local_files_only=local)
        except Exception as err:
            if "EntryNotFound" not in type(err).__name__:
                raise
            subfolder, config_file = None, hf_hub_download(model, "config.json", local_files_only=local)
        cls = _transformer_class(Path(config_file).parent)
        transformer = cls.from_pretrained(model, subfolder=subfolder, local_files_only=local, low_cpu_mem_usage=False)
    except ModelNotFoundError:
        raise
    except Exception as err:  # offline, unknown repo, gated repo: one clear message
        raise ModelNotFoundError(
            f"could not load {model!r} from the Hugging Face hub or its local cache ({type(err).__name__}: {err}). "
            f"On a machine with internet run `huggingface-cli download {model}` and either copy the cache "
            f"(HF_HOME) here or pass the downloaded folder as the model path; the embedded models are {EMBEDDED}."
        ) from None
    vae = None
    try:
        hf_hub_download(model, "config.json", subfolder="vae", local_files_only=local)
        has_vae = True
    except Exception:
        has_vae = False  # a bare transformer repo, or a cache without vae/: pass vae= explicitly then
    if has_vae:
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", local_files_only=local).eval()
        except Exception as err:
            raise ModelNotFoundError(f"{model!r} has a vae/ that could not be loaded ({type(err).__name__}: {err})") from None
    scheduler_config = {}
    try:
        scheduler_file = hf_hub_download(model, "scheduler_config.json", subfolder="scheduler", local_files_only=local)
        scheduler_config = json.loads(Path(scheduler_file).read_text())
    except Exception:
        pass  # a bare transformer repo has no scheduler: the training schedule defaults apply
    return LoadedModel(model, transformer, vae=vae, scheduler_config=scheduler_config)


def _hub_cached_or_reachable(model: str) -> bool:
    """True when ``model`` is in the local cache (load offline); raises at once when it is not and the hub
    is unreachable, instead of after a minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(model, f), str) for f in ("transformer/config.json", "config.json"))
    if cached:
        return True
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set and the model is not in the local cache")
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        raise ConnectionError(f"{host} is unreachable ({err}) and the model is not in the local cache") from None
    return False


def _load_vae(vae: str):
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    try:
        return AutoencoderKL.from_pretrained(path if path.exists() else vae).eval()
    except Exception as err:
        raise ModelNotFoundError(f"could not load the VAE {vae!r} ({type(err).__name__}: {err}); give a local "
                                 "AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema downloaded beforehand") from None


def load_classifier(path: str | None = None):
    """The shipped mnist-features classifier (or one saved at ``path``)."""
    from tca_lightning.models.classifier import MnistFeatures

    folder = Path(path) if path else WEIGHTS / CLASSIFIER
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"classifier folder {folder} is missing; retrain it with "
                                 "`python -m tca_lightning.train_tiny mnist-features`")
    return MnistFeatures.from_pretrained(folder)
