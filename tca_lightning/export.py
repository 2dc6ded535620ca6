"""Packed quantized checkpoints: ``save_quantized`` writes one, ``load_quantized`` runs it on integer kernels.

A checkpoint is a directory of two files, written together and atomically (a temp directory in the
same parent, renamed into place: a reader never sees half of one, a failed export leaves nothing):

- ``model.safetensors``: every packed tensor of every quantized linear (``<layer>.qweight``: INT4
  codes packed two per byte in the split-half layout, or int8; ``<layer>.weight_scale``: FP16 per
  group; ``<layer>.bias``; ``<layer>.smooth/rotation/perm``: the fixed input transform, the rotation either
  dense or as its Kronecker factors ``rotation_left/rotation_right`` (format 2; TCA-DiT's, in FP16: ARC.bake
  rounds them to FP16 values), and every other
  parameter and buffer of the transformer in its own dtype (norms, embeddings, the conv patch embed,
  linears the recipe leaves in FP);
- ``quantized.json``: ``format_version`` (:data:`FORMAT_VERSION`), the model it came from, the method
  and its recipe, the diffusers class and config (so the architecture is rebuilt without the
  original weights), every packed layer's bits, group sizes and layout, the caption encoder reference
  (PixArt-style models), ``aliases`` (format 3: a tensor identical to an earlier one, e.g. the transform
  q, k and v share, is stored once and named here), ``debiased_gelu`` (format 4: the GELU modules whose
  ``<module>.noise_var`` debiases them, quant/debias.py), and the SHA-256 of the safetensors file (so
  corruption is caught on load, not as garbage images).

``load_quantized`` rebuilds the diffusers transformer from its class and config, replaces the packed
linears by :class:`~tca_lightning.kernels.packed_linear.PackedLinear`, loads the rest, and returns it:
its forward is the diffusers model's, so ``get_adapter`` and the samplers take it unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tca_lightning.kernels.packed_linear import PackedLinear
from tca_lightning.quant.debias import DebiasedGELU, install_debiased_gelu
from tca_lightning.quant.linear import QuantLinear

FORMAT_VERSION = 4  # 4: debiased GELUs ("debiased_gelu"); 3: identical tensors stored once ("aliases");
# 2: Kronecker-factored rotations; 1: dense
READABLE_VERSIONS = (1, 2, 3, 4)
FORMAT_NAME = "tca_lightning.packed"
CONFIG_FILE = "quantized.json"
TENSORS_FILE = "model.safetensors"
REEXPORT = ("re-export it with tca_lightning.export.save_quantized (the Finalize callback writes "
            "<run_dir>/quantized after `fit`)")


# --- saving ----------------------------------------------------------------------------------------

def pack_quantized_linears(transformer: nn.Module) -> dict[str, PackedLinear]:
    """A PackedLinear for every QuantLinear of ``transformer``, by qualified name (the model is not changed)."""
    return {name: PackedLinear.from_quant_linear(m) for name, m in transformer.named_modules()
            if isinstance(m, QuantLinear)}


def caption_encoder_reference(caption_encoder: nn.Module | None, model_name: str | None, kind: str) -> dict | None:
    """How to get the caption encoder back: the model it came with (embedded tiny models reload it by
    name), its class and config; PixArt without one needs the original pipeline's text encoder (T5)."""
    if caption_encoder is None:
        if kind != "PixArtTransformer2DModel":
            return None
        return {"source": model_name, "class": None,
                "note": "encode captions with the original pipeline's text encoder (T5)"}
    config = {k: getattr(caption_encoder, k) for k in ("embed_dim", "max_length", "seed")
              if hasattr(caption_encoder, k)}
    return {"source": model_name, "class": type(caption_encoder).__name__, "config": config}


def save_quantized(module_or_adapter, path: str | os.PathLike, recipe=None, model_name: str | None = None, *,
                   method: str = "unknown", caption_encoder: nn.Module | None = None, overwrite: bool = True) -> Path:
    """Write the packed checkpoint of a quantized (finalized/frozen) transformer to the directory ``path``.

    Args:
        module_or_adapter: the transformer, or anything holding it as ``.transformer`` (an adapter, the
            ARC/evaluator LightningModule); its QuantLinears are packed, the rest is kept as is.
        recipe: the QuantRecipe (or a dict) recorded in the JSON.
        model_name: the model it came from (``tiny-dit``, a hub id, a path, ``random:<arch>``).
        method: the quantization method's name (``tca-dit``, ``gptq``, ...).
        caption_encoder: the caption encoder to reference (default: ``module_or_adapter.caption_encoder``).
        overwrite: replace an existing checkpoint at ``path`` (else a FileExistsError).
    """
    from tca_lightning.models.loading import _CLASSES  # models/ is where diffusers' classes are known

    transformer = getattr(module_or_adapter, "transformer", module_or_adapter)
    if caption_encoder is None:
        caption_encoder = getattr(module_or_adapter, "caption_encoder", None)
    class_name = type(transformer).__name__
    if class_name not in _CLASSES:
        raise ValueError(f"save_quantized rebuilds transformers of the classes {sorted(_CLASSES)}, got {class_name}")
    packed = pack_quantized_linears(transformer)
    if not packed:
        raise ValueError(f"{class_name} has no QuantLinear to pack: quantize it first (a method's quantize(), or fit)")
    tensors = {f"{name}.{key}": t for name, layer in packed.items() for key, t in layer.tensors().items()}
    prefixes = tuple(f"{name}." for name in packed)
    tensors.update({k: v for k, v in transformer.state_dict().items() if not k.startswith(prefixes)})
    tensors, aliases = store_once(_separate_storage(tensors))
    if dataclasses.is_dataclass(recipe):
        recipe = dataclasses.asdict(recipe)
    config = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": model_name, "method": method,
        "recipe": recipe,
        "transformer": {"class_name": class_name,
                        "config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}},
        "caption_encoder": caption_encoder_reference(caption_encoder, model_name, class_name),
        "layers": {name: layer.config() for name, layer in packed.items()},
        "aliases": aliases,
        "debiased_gelu": sorted(n for n, m in transformer.named_modules() if isinstance(m, DebiasedGELU)),
        "memory": memory_summary(packed.values()),
    }
    return _write_atomic(Path(path), tensors, config, overwrite)


def memory_summary(layers) -> dict:
    """Per weight bit width: layer count, stored weight bytes (codes + scales) and FP16 bytes of the same
    weights. 4-bit with FP16 scales per group of G costs 4 + 16/G bits a weight (G = 32: 3.56x under FP16)."""
    out: dict[str, dict] = {}
    for p in layers:
        if p.weight_format == "float":
            continue
        row = out.setdefault(f"w{p.weight_bits}", {"layers": 0, "weight_bytes": 0, "fp16_bytes": 0})
        row["layers"] += 1
        row["weight_bytes"] += p.weight_nbytes()
        row["fp16_bytes"] += 2 * p.in_features * p.out_features
    for row in out.values():
        row["ratio_vs_fp16"] = round(row["fp16_bytes"] / max(row["weight_bytes"], 1), 3)
    return out


def _separate_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses shared tensors: tied
    modules, or one smoothing vector set on q, k and v)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def store_once(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors with each distinct one kept once, {dropped key: the key holding the same tensor}).

    q, k and v read one input, so TCA-DiT gives them one transform (and RGQ one permutation): three
    identical copies per block otherwise (0.9 MB of DiT-XL/2's 4.4 MB of transforms). Equal means same
    dtype, shape and bytes, so loading an alias gives back exactly the tensor that was saved.
    """
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)

    kept, aliases, by_content = {}, {}, {}
    for key, t in tensors.items():
        digest = (t.dtype, tuple(t.shape), hashlib.sha256(raw(t).numpy().tobytes()).hexdigest())
        first = by_content.setdefault(digest, key)
        if first != key and torch.equal(raw(t), raw(kept[first])):
            aliases[key] = first
        else:
            kept[key] = t
    return kept, aliases


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, tensors: dict, config: dict, overwrite: bool) -> Path:
    """Both files into a temp directory next to ``path``, then one rename; on failure nothing is left."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True or choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_FILE))
        config["safetensors"] = {"file": TENSORS_FILE, "sha256": _sha256(tmp / TENSORS_FILE),
                                 "num_tensors": len(tensors)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for f in (TENSORS_FILE, CONFIG_FILE):
            with open(tmp / f, "rb") as handle:
                os.fsync(handle.fileno())
        if path.exists():  # a directory cannot be replaced in one rename: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# --- loading ---------------------------------------------------------------------------------------

def _fail(file: Path, problem: str, fix: str = REEXPORT) -> ValueError:
    return ValueError(f"{file}: {problem}; {fix}")


def read_quantized_config(path: str | os.PathLike) -> dict:
    """The validated JSON of a packed checkpoint directory (files present, known format version)."""
    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{folder}: no packed checkpoint directory there; give the directory save_quantized "
                         f"wrote (e.g. runs/<name>/version_N/quantized)")
    for name in (CONFIG_FILE, TENSORS_FILE):
        if not (folder / name).is_file():
            raise _fail(folder / name, "is missing (an incomplete or foreign checkpoint directory)")
    file = folder / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(file, f"is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise _fail(file, f"is not a {FORMAT_NAME} config (its 'format' is "
                          f"{config.get('format') if isinstance(config, dict) else None!r})")
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise _fail(file, f"has format_version {version!r}, this tca_lightning reads format_version "
                          f"{' or '.join(map(str, READABLE_VERSIONS))}",
                    "re-export it with this version's save_quantized, or load it with the tca_lightning that wrote it")
    for key in ("transformer", "layers", "safetensors"):
        if not isinstance(config.get(key), dict):
            raise _fail(file, f"has no {key!r} section")
    return config


def _load_tensors(folder: Path, config: dict, device) -> dict[str, torch.Tensor]:
    file = folder / TENSORS_FILE
    expected = config["safetensors"].get("sha256")
    if expected is not None and _sha256(file) != expected:
        raise _fail(file, "does not match the SHA-256 recorded in quantized.json (truncated or corrupted "
                          "after it was written)")
    try:
        return load_file(str(file), device=str(device))
    except Exception as err:  # safetensors' own error: a truncated or garbled header
        raise _fail(file, f"is truncated or corrupt ({type(err).__name__}: {err})") from None


def _build_transformer(config: dict, file: Path) -> nn.Module:
    from tca_lightning.models.loading import _CLASSES

    spec = config["transformer"]
    cls = _CLASSES.get(spec.get("class_name"))
    if cls is None:
        raise _fail(file, f"names the transformer class {spec.get('class_name')!r}; supported: {sorted(_CLASSES)}")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG untouched
        try:
            return cls.from_config(spec.get("config", {})).eval()
        except Exception as err:
            raise _fail(file, f"has a {cls.__name__} config that diffusers cannot build "
                              f"({type(err).__name__}: {err})") from None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The diffusers transformer of a packed checkpoint, its quantized linears running integer kernels.

    Every inconsistency (a missing file, a truncated or corrupt safetensors, an unknown
    ``format_version``, tensors that do not match the JSON or the architecture) is a ValueError naming
    the file, what is wrong, and how to fix it.
    """
    config = read_quantized_config(path)
    folder = Path(path).expanduser()
    folder = folder.parent if folder.is_file() else folder
    json_file, tensors_file = folder / CONFIG_FILE, folder / TENSORS_FILE
    tensors = _load_tensors(folder, config, "cpu")
    aliases = config.get("aliases", {})
    if not isinstance(aliases, dict):
        raise _fail(json_file, f"has an 'aliases' section that is not a mapping ({type(aliases).__name__})")
    for key, source in aliases.items():
        if source not in tensors:
            raise _fail(json_file, f"says {key!r} is stored as {source!r}, which {TENSORS_FILE} does not hold")
        tensors[key] = tensors[source]
    transformer = _build_transformer(config, json_file)
    modules = dict(transformer.named_modules())
    for name, cfg in config["layers"].items():
        target = modules.get(name)
        if not isinstance(target, nn.Linear):
            raise _fail(json_file, f"lists layer {name!r}, which is not a linear of the rebuilt "
                                   f"{type(transformer).__name__}")
        if (target.in_features, target.out_features) != (cfg.get("in_features"), cfg.get("out_features")):
            raise _fail(json_file, f"layer {name} is {cfg.get('in_features')}->{cfg.get('out_features')}, the "
                                   f"architecture's is {target.in_features}->{target.out_features}")
        own = {k[len(name) + 1:]: tensors.pop(k) for k in [k for k in tensors if k.startswith(name + ".")]}
        try:
            layer = PackedLinear.from_config(cfg, own)
        except (ValueError, KeyError, TypeError) as err:
            raise _fail(tensors_file, f"does not match quantized.json for layer {name} ({err})") from None
        _set_submodule(transformer, name, layer)
    debiased = config.get("debiased_gelu", [])
    if not isinstance(debiased, list) or not all(isinstance(n, str) for n in debiased):
        raise _fail(json_file, "has a 'debiased_gelu' section that is not a list of module names")
    try:
        install_debiased_gelu(transformer, {n: tensors[f"{n}.noise_var"] for n in debiased})
    except (KeyError, AttributeError, ValueError) as err:
        raise _fail(tensors_file, f"does not hold the debiased GELUs quantized.json lists ({err})") from None
    prefixes = tuple(f"{name}." for name in config["layers"])
    expected = {k: v for k, v in transformer.state_dict().items() if not k.startswith(prefixes)}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        found = (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong))
        problems = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}" for label, items in found if items]
        raise _fail(tensors_file, f"does not match the {type(transformer).__name__} described in quantized.json: "
                                  + "; ".join(problems))
    transformer.load_state_dict(tensors, strict=False)
    return transformer.to(device).eval().requires_grad_(False)
