"""Caption encoders for real and shrunk PixArt models, and the caption files that feed them.

PixArt-alpha (Chen et al. 2023, arXiv:2310.00426, Sec. 3.1) is conditioned on T5-XXL encoder
states (Raffel et al. 2020; the v1.1 checkpoint), 120 tokens padded with an attention mask; the
empty caption "" is the unconditional (classifier-free guidance) condition. Every encoder here
is a callable ``captions -> (tokens (B, L, C) float, mask (B, L) long)``, the interface
:class:`~tca_lightning.models.adapters.PixArtAdapter` calls, padded to a fixed ``L = max_length``.

- :class:`T5CaptionEncoder`: the real T5, loaded lazily through the optional ``transformers``.
- :class:`CachedCaptionEncoder`: embeddings on disk, so T5 runs once per caption across runs
  and ranks; or a precomputed file (:func:`save_precomputed`), so no T5 is needed at all.
- :class:`HashedWordEncoder`: a frozen deterministic stand-in for CI's random shrunk PixArt.
- :func:`caption_encoder`: one string spec for all of them; :func:`read_captions`: COCO /
  MJHQ-30K / txt / jsonl caption files.

Precompute on a machine with T5 (the file then replaces T5 everywhere)::

    python -m tca_lightning.models.text_encoders --captions captions_val2014.json --limit 5000 \\
        --encoder t5:PixArt-alpha/PixArt-XL-2-512x512 --out coco5k_t5.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]

PIXART_T5 = "PixArt-alpha/PixArt-XL-2-512x512"
PIXART_MAX_LENGTH = 120  # PixArt-alpha, Sec. 3.1; diffusers' encode_prompt max_sequence_length
PRECOMPUTED_FORMAT = "tca_lightning.caption_embeddings/v1"
_CAPTION_FILE_HELP = ("give a COCO captions file (annotations/captions_val2014.json), an MJHQ-30K meta_data.json, "
                      "a .txt with one caption per line, a .json list of strings, or a .jsonl with a "
                      "\"caption\" or \"prompt\" field")


# --- caption files -----------------------------------------------------------------------------------------------

def read_captions(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Captions of a user-given file in file order, whitespace-stripped, blanks skipped, the first ``limit``.

    Formats: ``.txt`` (one per line); ``.json``: COCO captions (``{"annotations": [{"caption": ...}]}``),
    MJHQ-30K ``meta_data.json`` (``{"<id>": {"prompt": ..., "category": ...}}``), a list of strings or of
    objects with "caption"/"prompt"; ``.jsonl``: one object with "caption"/"prompt" (or a string) per line.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of captions or None (all), got {limit}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"caption file {str(path)!r} does not exist: {_CAPTION_FILE_HELP}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        captions = path.read_text(encoding="utf-8").splitlines()
    elif suffix == ".jsonl":
        captions = [_caption_of(json.loads(line), path, f"line {i + 1}")
                    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]
    elif suffix == ".json":
        captions = _json_captions(json.loads(path.read_text(encoding="utf-8")), path)
    else:
        raise ValueError(f"unknown caption file format {suffix or '(no suffix)'!r} of {str(path)!r}: "
                         f"{_CAPTION_FILE_HELP}")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise ValueError(f"no captions found in {str(path)!r}: {_CAPTION_FILE_HELP}")
    return captions[:limit]


def _json_captions(data, path: Path) -> list[str]:
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions_*.json
        return [_caption_of(a, path, f"annotation {i}") for i, a in enumerate(data["annotations"])]
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "prompt" in v for v in data.values()):
        return [v["prompt"] for v in data.values()]  # MJHQ-30K meta_data.json
    if isinstance(data, list):
        return [_caption_of(item, path, f"item {i}") for i, item in enumerate(data)]
    raise ValueError(f"unknown caption JSON layout in {str(path)!r} (a {type(data).__name__} with keys "
                     f"{list(data)[:5] if isinstance(data, dict) else '-'}): {_CAPTION_FILE_HELP}")


def _caption_of(item, path: Path, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("caption", "prompt"):
            if isinstance(item.get(key), str):
                return item[key]
    raise ValueError(f"{where} of {str(path)!r} has no \"caption\" or \"prompt\" string: {str(item)[:120]}")


# --- file helpers --------------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp name unique to this process, then os.replace: readers never see a partial
    file, and two DDP ranks writing the same entry both succeed (the last replace wins, same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_name(key: str) -> str:
    """A folder name for a cache key: readable, plus a hash so that sanitizing cannot merge two keys."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


# --- precomputed embeddings ----------------------------------------------------------------------------------------

def save_precomputed(path: str | os.PathLike, captions: Sequence[str], tokens: torch.Tensor, mask: torch.Tensor,
                     encoder: str | None = None) -> Path:
    """Save caption embeddings computed anywhere (e.g. diffusers' ``PixArtAlphaPipeline.encode_prompt``) so
    that :meth:`CachedCaptionEncoder.from_precomputed` serves them without T5.

    The format (``PRECOMPUTED_FORMAT``), row ``i`` belonging to ``captions[i]``:

    - ``tokens``: float tensor (N, L, C), every caption padded to the same L (PixArt: 120 x 4096);
    - ``mask``: integer tensor (N, L), 1 on real tokens, 0 on padding;
    - ``captions``: the N caption strings, exactly as they will be asked for (include "" for the null condition);
    - ``encoder`` (optional): what produced them, e.g. ``"t5:PixArt-alpha/PixArt-XL-2-512x512"``.

    ``.safetensors`` stores the tensors and puts ``captions`` (a JSON list), ``encoder`` and ``format`` in the
    header metadata; ``.pt`` is ``torch.save`` of a dict with those keys.
    """
    path = Path(path).expanduser()
    captions = list(captions)
    if not all(isinstance(c, str) for c in captions):
        raise TypeError(f"{path}: captions must be strings")
    if not (isinstance(tokens, torch.Tensor) and tokens.is_floating_point() and isinstance(mask, torch.Tensor)):
        raise TypeError(f"{path}: tokens must be a float tensor and mask a tensor, got {type(tokens)} and {type(mask)}")
    _check_shapes(len(captions), tuple(tokens.shape), tuple(mask.shape), str(path))
    tokens, mask = tokens.detach().cpu().contiguous(), mask.detach().cpu().to(torch.long).contiguous()
    meta = {"format": PRECOMPUTED_FORMAT, "encoder": encoder or ""}
    if path.suffix == ".safetensors":
        meta["captions"] = json.dumps(captions)
        _atomic_write(path, lambda tmp: save_file({"tokens": tokens, "mask": mask}, str(tmp), metadata=meta))
    elif path.suffix == ".pt":
        _atomic_write(path, lambda tmp: torch.save({**meta, "captions": captions, "tokens": tokens, "mask": mask}, tmp))
    else:
        raise ValueError(f"precomputed embeddings go to a .safetensors or .pt file, got {str(path)!r}")
    return path


def _check_shapes(n_captions: int, tokens: tuple, mask: tuple, where: str) -> None:
    if len(tokens) != 3:
        raise ValueError(f"{where}: tokens must be (N captions, L tokens, C channels), got shape {list(tokens)}")
    if tuple(mask) != tuple(tokens[:2]):
        raise ValueError(f"{where}: mask must be (N, L) = {list(tokens[:2])} like tokens, got shape {list(mask)}")
    if n_captions != tokens[0]:
        raise ValueError(f"{where}: {n_captions} captions but {tokens[0]} rows of tokens; give one row per caption")


def _load_precomputed(path: Path) -> tuple[list[str], Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]], str]:
    """(captions, a reader of rows, encoder) without reading every row into memory (5k T5 captions are ~5 GB)."""
    if not path.is_file():
        raise FileNotFoundError(f"precomputed caption embeddings {str(path)!r} do not exist: make them with "
                                "save_precomputed(...) or `python -m tca_lightning.models.text_encoders --out ...`")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys}
        if "captions" not in meta or not {"tokens", "mask"} <= keys:
            raise ValueError(f"{str(path)!r} is not a precomputed caption file: it needs tensors 'tokens' and 'mask' "
                             f"and a 'captions' JSON list in its metadata (has tensors {sorted(keys)}, metadata "
                             f"{sorted(meta)}); write it with save_precomputed")
        captions = json.loads(meta["captions"])

        def rows(index: list[int]):
            with safe_open(str(path), framework="pt") as f:
                return tuple(torch.cat([f.get_slice(k)[i:i + 1] for i in index]) for k in ("tokens", "mask"))
        _check_shapes(len(captions), tuple(shapes["tokens"]), tuple(shapes["mask"]), str(path))
        return captions, rows, meta.get("encoder", "")
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        aliases = {"tokens": ("tokens", "prompt_embeds", "embeddings"),  # diffusers' encode_prompt names too
                   "mask": ("mask", "prompt_attention_mask", "masks")}
        found = {k: next((data[a] for a in names if isinstance(data, dict) and a in data), None)
                 for k, names in aliases.items()}
        if not isinstance(data, dict) or "captions" not in data or None in found.values():
            raise ValueError(f"{str(path)!r} is not a precomputed caption file: it needs a dict with 'captions', "
                             f"'tokens' and 'mask' (has {sorted(data) if isinstance(data, dict) else type(data)}); "
                             "write it with save_precomputed")
        captions, tokens, mask = list(data["captions"]), found["tokens"], found["mask"]
        _check_shapes(len(captions), tuple(tokens.shape), tuple(mask.shape), str(path))
        return captions, lambda index: (tokens[index], mask[index].to(torch.long)), data.get("encoder", "") or ""
    raise ValueError(f"precomputed caption embeddings must be a .safetensors or .pt file, got {str(path)!r}")


class MissingCaptionError(LookupError):
    """A caption that neither precomputed embeddings nor an encoder can provide; the message says how to fix it."""


# --- the cache -----------------------------------------------------------------------------------------------------

class CachedCaptionEncoder(torch.nn.Module):
    """Caption embeddings read from disk before asking the wrapped encoder, so T5 runs once per caption.

    Entries live at ``cache_dir/<encoder key>/<hash[:2]>/<sha256(caption)>.safetensors`` (tensors ``tokens``
    (L, C) and ``mask`` (L,) at the encoder's full padded length, the caption text in the metadata), keyed by
    the encoder's ``cache_key`` (its identity, dtype and max_length). Each entry is written atomically, so
    ranks and concurrent runs can share one cache. A small in-memory LRU keeps the hot ones (the null caption
    "" is asked for on every guided step). Outputs match the wrapped encoder's shapes and dtypes.
    """

    def __init__(self, encoder: Encoder | None = None, cache_dir: str | os.PathLike | None = None,
                 key: str | None = None, memory_items: int = 64, batch_size: int = 32):
        super().__init__()
        key = key or getattr(encoder, "cache_key", None)
        if encoder is not None and cache_dir is not None and not key:
            raise ValueError(f"caching {type(encoder).__name__} needs a key naming what it computes (its weights, "
                             "dtype and max_length): pass key=..., or give the encoder a cache_key attribute")
        self.encoder = encoder  # an nn.Module is registered, so .to(device) moves it too
        self.key = key
        use_disk = cache_dir is not None and encoder is not None
        self.folder = Path(cache_dir).expanduser() / _safe_name(key) if use_disk else None
        self.memory_items, self.batch_size = memory_items, batch_size
        self._memory: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._precomputed: dict[str, int] = {}
        self._read_rows = None
        self.source: str | None = None
        self.register_buffer("_device", torch.empty(0), persistent=False)  # follows .to(); not in state_dict
        self.calls = 0  # captions the wrapped encoder computed (tests, logs)

    @classmethod
    def from_precomputed(cls, path: str | os.PathLike, encoder: Encoder | None = None,
                         cache_dir: str | os.PathLike | None = None, **kwargs) -> "CachedCaptionEncoder":
        """Serve the captions of a :func:`save_precomputed` file; others go to ``encoder`` (an error without one)."""
        path = Path(path).expanduser()
        captions, rows, producer = _load_precomputed(path)
        cached = cls(encoder, cache_dir, **kwargs)
        cached._precomputed = {}
        for i, caption in enumerate(captions):
            cached._precomputed.setdefault(caption, i)
        cached._read_rows, cached.source = rows, f"{path} ({producer or 'unknown encoder'})"
        return cached

    @property
    def precomputed_captions(self) -> list[str]:
        """The captions a precomputed file holds (served without any encoder)."""
        return list(self._precomputed)

    @property
    def max_length(self) -> int | None:
        return getattr(self.encoder, "max_length", None) or self._shape(1)

    @property
    def embed_dim(self) -> int | None:
        return getattr(self.encoder, "embed_dim", None) or self._shape(2)

    def _shape(self, dim: int) -> int | None:
        if self._read_rows is None or not self._precomputed:
            return None
        return self._read_rows([0])[0].shape[dim]

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L, C), mask (B, L)) on this module's device; repeated captions are looked up once."""
        captions = list(captions)
        found = {c: self._memory_get(c) for c in dict.fromkeys(captions)}
        missing = [c for c, entry in found.items() if entry is None]
        found.update(self._from_precomputed([c for c in missing if c in self._precomputed]))
        missing = [c for c in missing if found[c] is None]
        found.update({c: e for c in missing if (e := self._from_disk(c)) is not None})
        missing = [c for c in missing if found[c] is None]
        if missing:
            found.update(self._compute(missing))
        for caption, entry in found.items():
            self._memory_put(caption, entry)
        shapes = {tuple(found[c][0].shape) for c in found}
        if len(shapes) > 1:
            raise ValueError(f"cached caption embeddings have different shapes {sorted(shapes)}: the encoder must pad "
                             "every caption to max_length, and one cache folder must hold one encoder; clear "
                             f"{self.folder or self.source} if the encoder changed")
        device = self._device.device
        return (torch.stack([found[c][0] for c in captions]).to(device),
                torch.stack([found[c][1] for c in captions]).to(device))

    def _memory_get(self, caption: str):
        if caption in self._memory:
            self._memory.move_to_end(caption)
            return self._memory[caption]
        return None

    def _memory_put(self, caption: str, entry) -> None:
        if self.memory_items > 0:
            self._memory[caption] = entry
            self._memory.move_to_end(caption)
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)

    def _from_precomputed(self, captions: list[str]) -> dict:
        if not captions:
            return {}
        tokens, mask = self._read_rows([self._precomputed[c] for c in captions])
        return {c: (tokens[i].clone(), mask[i].clone()) for i, c in enumerate(captions)}

    def _entry_path(self, caption: str) -> Path:
        digest = _caption_hash(caption)
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def _from_disk(self, caption: str):
        if self.folder is None or not (path := self._entry_path(caption)).is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("caption") != caption:  # a sha256 collision, or a foreign file
                    return None
                return f.get_tensor("tokens"), f.get_tensor("mask")
        except Exception as error:  # a damaged entry (disk full, foreign writer): recompute and replace it
            warnings.warn(f"ignoring unreadable caption cache entry {path}: {error}")
            return None

    def _compute(self, captions: list[str]) -> dict:
        if self.encoder is None:
            more = f" and {len(captions) - 3} more" if len(captions) > 3 else ""
            shown = ", ".join(repr(c) for c in captions[:3]) + more
            shown = f"caption {shown} is" if len(captions) == 1 else f"captions {shown} are"
            null = ' ("" is the null caption of classifier-free guidance: include it)' if "" in captions else ""
            raise MissingCaptionError(
                f"{shown} not in the precomputed embeddings {self.source or '(none loaded)'}{null}, and no encoder "
                "was given to compute missing captions. Fix: put them in the file (precompute(encoder, captions, "
                "path) or save_precomputed(path, captions, tokens, mask)), give an encoder for the rest "
                "(CachedCaptionEncoder.from_precomputed(path, encoder=T5CaptionEncoder())), or ask only for "
                "captions the file holds.")
        out = {}
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start:start + self.batch_size]
            tokens, mask = self.encoder(chunk)
            self.calls += len(chunk)
            for i, caption in enumerate(chunk):
                entry = (tokens[i].detach().cpu().contiguous(), mask[i].detach().cpu().contiguous())
                out[caption] = entry
                if self.folder is not None:
                    self._write(caption, entry)
        return out

    def _write(self, caption: str, entry) -> None:
        tensors = {"tokens": entry[0], "mask": entry[1]}
        if not (self.folder / "key.json").is_file():
            _atomic_write(self.folder / "key.json", lambda tmp: tmp.write_text(json.dumps({"key": self.key})))
        _atomic_write(self._entry_path(caption),
                      lambda tmp: save_file(tensors, str(tmp), metadata={"caption": caption, "key": self.key}))


# --- T5 ------------------------------------------------------------------------------------------------------------

def _require(module: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{purpose} needs `{module}`, which is not installed: pip install transformers sentencepiece "
                          "(the `t5` extra: pip install 'tca_lightning[t5]'), or give precomputed embeddings instead: "
                          "caption_encoder('precomputed:<file>') with a file from save_precomputed(...) or "
                          "`python -m tca_lightning.models.text_encoders --out ...` run where T5 is available")


def _t5_subfolders(source: str) -> tuple[str, str]:
    """(text encoder, tokenizer) subfolders: a diffusers pipeline (PixArt) keeps them in text_encoder/ and
    tokenizer/; a bare T5 checkpoint (DeepFloyd/t5-v1_1-xxl, a local T5 folder) at its root."""
    local = Path(source).expanduser()
    if local.is_dir():
        return ("text_encoder", "tokenizer") if (local / "text_encoder").is_dir() else ("", "")
    name = source.rsplit("/", 1)[-1].lower()
    return ("", "") if "t5" in name and "pixart" not in name else ("text_encoder", "tokenizer")


class T5CaptionEncoder(torch.nn.Module):
    """PixArt-alpha's text encoder: T5-XXL v1.1, 120 tokens padded to max_length, with the attention mask.

    Mirrors diffusers' ``PixArtAlphaPipeline.encode_prompt`` with ``clean_caption=False``: captions are
    lower-cased and stripped, tokenized with ``padding="max_length", truncation=True``, and encoded with the
    mask; the output is ``(last_hidden_state, attention_mask)``. The pipeline's optional caption cleaning
    (``clean_caption=True``, needing bs4 and ftfy) is not done: use precomputed embeddings if you need it.

    The ~4.7B-parameter model loads on the first call (or :meth:`load`) and is held outside the module's
    parameters, so checkpoints of a module holding this encoder stay small; it follows ``.to(device)``.
    """

    embed_dim = 4096

    def __init__(self, source: str = PIXART_T5, max_length: int = PIXART_MAX_LENGTH,
                 dtype: torch.dtype | str | None = None, subfolders: tuple[str, str] | None = None,
                 local_files_only: bool | None = None):
        super().__init__()
        _require("transformers", "T5CaptionEncoder")
        _require("sentencepiece", "T5CaptionEncoder's tokenizer")
        self.source, self.max_length = source, max_length
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        # bf16 on GPU (T5 overflows in fp16), fp32 on CPU where bf16 matmuls are slow
        self.dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        self.subfolders = subfolders or _t5_subfolders(source)
        self.local_files_only = local_files_only
        self.register_buffer("_device", torch.empty(0), persistent=False)
        self.__dict__["_model"] = self.__dict__["_tokenizer"] = None  # not submodules: no 19 GB in state_dict

    @property
    def cache_key(self) -> str:
        return f"t5:{self.source}:{self.subfolders[0]}:{str(self.dtype).removeprefix('torch.')}:L{self.max_length}"

    def load(self) -> "T5CaptionEncoder":
        if self._model is None:
            from transformers import T5EncoderModel, T5Tokenizer

            kwargs = {} if self.local_files_only is None else {"local_files_only": self.local_files_only}
            encoder_sub, tokenizer_sub = self.subfolders
            try:
                tokenizer = T5Tokenizer.from_pretrained(self.source, subfolder=tokenizer_sub, **kwargs)
                model = T5EncoderModel.from_pretrained(self.source, subfolder=encoder_sub, torch_dtype=self.dtype,
                                                       **kwargs)
            except (OSError, ValueError) as error:
                include = f" --include '{encoder_sub}/*' '{tokenizer_sub}/*'" if encoder_sub else ""
                raise OSError(
                    f"cannot load T5 from {self.source!r} (subfolders {self.subfolders}): {error}\n"
                    f"Download it where the hub is reachable: huggingface-cli download {self.source}{include} "
                    "(then copy the HF cache, or pass the local folder), log in (huggingface-cli login) if the "
                    "hub refuses access, or give precomputed embeddings: caption_encoder('precomputed:<file>')"
                ) from error
            self.__dict__["_model"] = model.eval().requires_grad_(False)
            self.__dict__["_tokenizer"] = tokenizer
        if self._model.device != self._device.device:
            self._model.to(self._device.device)
        return self

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last_hidden_state (B, max_length, 4096), attention_mask (B, max_length)); "" is the null caption."""
        self.load()
        captions = [c.lower().strip() for c in captions]
        inputs = self._tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt")
        longest = self._tokenizer(captions, padding="longest", return_tensors="pt").input_ids.shape[-1]
        if longest > self.max_length:
            warnings.warn(f"some captions are longer than T5's {self.max_length} tokens and were truncated, as "
                          "PixArt-alpha's pipeline does")
        device = self._device.device
        mask = inputs.attention_mask.to(device)
        tokens = self._model(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
        return tokens, mask


# --- the CI stand-in -----------------------------------------------------------------------------------------------

class HashedWordEncoder(torch.nn.Module):
    """A frozen, deterministic T5 stand-in for randomly initialized shrunk PixArt models in CI.

    Each lower-cased word (and punctuation mark) maps to a random normal vector seeded by a sha256 of
    (seed, word), then an end token, as T5 ends with </s>; padded with zeros to ``max_length``, mask 1 on
    real tokens; "" gives the end token alone. The vectors carry no meaning beyond determinism: the same
    word gives the same vector on every machine and run, with no weights to ship (saved as config only).
    """

    def __init__(self, embed_dim: int = 4096, max_length: int = PIXART_MAX_LENGTH, seed: int = 0):
        super().__init__()
        if embed_dim < 1 or max_length < 1:
            raise ValueError(f"embed_dim and max_length must be positive, got {embed_dim} and {max_length}")
        self.embed_dim, self.max_length, self.seed = embed_dim, max_length, seed
        self.register_buffer("_device", torch.empty(0), persistent=False)
        self._vectors: dict[str, torch.Tensor] = {}

    @property
    def cache_key(self) -> str:
        return f"hashed:d{self.embed_dim}:L{self.max_length}:s{self.seed}"

    @staticmethod
    def words(caption: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", caption.lower())

    def vector(self, token: str | None) -> torch.Tensor:
        """The vector of a word, or of the end token for ``token=None`` (a key no word can produce)."""
        key = "\x00eos" if token is None else f"\x00word\x00{token}"
        if key not in self._vectors:
            digest = hashlib.sha256(f"{self.seed}{key}".encode("utf-8")).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
            self._vectors[key] = torch.randn(self.embed_dim, generator=gen)
        return self._vectors[key]

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, max_length, embed_dim) float32, mask (B, max_length) long); long captions are truncated
        to max_length - 1 words plus the end token, as T5's tokenizer truncates."""
        tokens = torch.zeros(len(captions), self.max_length, self.embed_dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for i, caption in enumerate(captions):
            rows = [self.vector(w) for w in self.words(caption)[: self.max_length - 1]] + [self.vector(None)]
            tokens[i, : len(rows)] = torch.stack(rows)
            mask[i, : len(rows)] = 1
        device = self._device.device
        return tokens.to(device), mask.to(device)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        config = {"class": type(self).__name__, "embed_dim": self.embed_dim, "max_length": self.max_length,
                  "seed": self.seed}
        _atomic_write(Path(path) / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "HashedWordEncoder":
        config = json.loads((Path(path) / "config.json").read_text())
        if config.pop("class", cls.__name__) != cls.__name__:
            raise ValueError(f"{path} holds another caption encoder than {cls.__name__}: load it with its own class")
        return cls(**config)


# --- one spec for all ----------------------------------------------------------------------------------------------

_SPEC_HELP = ("'t5' or 't5:<hub id or local folder>' (e.g. t5:PixArt-alpha/PixArt-XL-2-512x512, "
              "t5:DeepFloyd/t5-v1_1-xxl), "
              "'precomputed:<file.safetensors|.pt>' (from save_precomputed), 'hashed' or 'hashed:<embed_dim>' "
              "(the deterministic CI stand-in)")


def caption_encoder(spec: str, cache_dir: str | os.PathLike | None = None, **kwargs) -> torch.nn.Module:
    """The caption encoder a spec names; with ``cache_dir``, T5 and hashed encoders are wrapped in the disk cache.

    kwargs go to the encoder (``max_length``, ``dtype``, ``seed``...); for precomputed, to ``from_precomputed``.
    """
    kind, _, arg = (spec or "").partition(":")
    if kind == "precomputed":
        if not arg:
            raise ValueError(f"caption encoder spec {spec!r} names no file: use {_SPEC_HELP}")
        return CachedCaptionEncoder.from_precomputed(arg, cache_dir=cache_dir, **kwargs)
    if kind == "t5":
        encoder = T5CaptionEncoder(arg or PIXART_T5, **kwargs)
    elif kind == "hashed":
        if arg and not arg.isdigit():
            raise ValueError(f"caption encoder spec {spec!r}: the embed_dim after 'hashed:' must be an integer")
        if arg and "embed_dim" in kwargs:
            raise ValueError(f"caption encoder spec {spec!r} and embed_dim={kwargs['embed_dim']} both set embed_dim: "
                             "give one")
        encoder = HashedWordEncoder(**({"embed_dim": int(arg)} if arg else {}), **kwargs)
    else:
        raise ValueError(f"unknown caption encoder spec {spec!r}: use {_SPEC_HELP}")
    return CachedCaptionEncoder(encoder, cache_dir) if cache_dir is not None else encoder


def precompute(encoder: Encoder, captions: Sequence[str], path: str | os.PathLike, batch_size: int = 32,
               name: str | None = None) -> Path:
    """Encode ``captions`` plus the null caption "" in batches and :func:`save_precomputed` them."""
    captions = list(dict.fromkeys([*captions, ""]))
    parts = [encoder(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
    tokens = torch.cat([p[0].cpu() for p in parts])
    mask = torch.cat([p[1].cpu() for p in parts])
    return save_precomputed(path, captions, tokens, mask, encoder=name or getattr(encoder, "cache_key", None))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Precompute caption embeddings (e.g. T5 for PixArt) into one file.")
    parser.add_argument("--captions", required=True, help="caption file: " + _CAPTION_FILE_HELP)
    parser.add_argument("--limit", type=int, default=None, help="the first N captions")
    parser.add_argument("--encoder", default="t5:" + PIXART_T5, help="encoder spec: " + _SPEC_HELP)
    parser.add_argument("--out", required=True, help="output .safetensors or .pt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    encoder = caption_encoder(args.encoder).to(args.device)
    path = precompute(encoder, read_captions(args.captions, args.limit), args.out, args.batch_size, args.encoder)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
