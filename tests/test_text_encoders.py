"""Caption files, the hashed CI encoder, the disk cache, precomputed embeddings, T5's import guard, the spec factory."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tca_lightning.models import text_encoders as te

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


class CountingEncoder(torch.nn.Module):
    """A hashed encoder that records every caption it computes (cache hits never reach it)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.inner = te.HashedWordEncoder(**kwargs)
        self.max_length, self.embed_dim = self.inner.max_length, self.inner.embed_dim
        self.cache_key = self.inner.cache_key
        self.seen: list[str] = []

    def forward(self, captions):
        self.seen += list(captions)
        return self.inner(captions)


# --- read_captions -------------------------------------------------------------------------------------------------

def test_read_captions_every_format(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("a cat\n\n  a dog  \n\n")
    assert te.read_captions(txt) == ["a cat", "a dog"]

    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"image_id": 2, "id": 9, "caption": "A man. \n"},
                                                              {"image_id": 1, "id": 3, "caption": "a bus"}]}))
    assert te.read_captions(coco) == ["A man.", "a bus"]

    mjhq = tmp_path / "meta_data.json"
    mjhq.write_text(json.dumps({"id1": {"prompt": "a castle", "category": "places"},
                                "id0": {"prompt": "a fox", "category": "animals"}}))
    assert te.read_captions(mjhq) == ["a castle", "a fox"]

    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["one", "", "two", {"prompt": "three"}]))
    assert te.read_captions(listed) == ["one", "two", "three"]

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "x"}\n\n{"prompt": "y", "id": 1}\n"z"\n')
    assert te.read_captions(jsonl) == ["x", "y", "z"]
    assert te.read_captions(jsonl, limit=2) == ["x", "y"]


def test_read_captions_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions_val2014.json.*meta_data.json.*txt"):
        te.read_captions(tmp_path / "nope.json")
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown caption file format '.csv'"):
        te.read_captions(tmp_path / "c.csv")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no captions found"):
        te.read_captions(tmp_path / "empty.txt")
    (tmp_path / "odd.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="unknown caption JSON layout"):
        te.read_captions(tmp_path / "odd.json")
    (tmp_path / "bad.jsonl").write_text('{"caption": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match="line 2 .*no \"caption\" or \"prompt\""):
        te.read_captions(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="limit"):
        te.read_captions(tmp_path / "odd.json", limit=0)


# --- HashedWordEncoder ---------------------------------------------------------------------------------------------

def test_hashed_encoder_shapes_mask_and_determinism(tmp_path):
    enc = te.HashedWordEncoder(embed_dim=16, max_length=6)
    tokens, mask = enc(["a red cat", "", "Cat a RED", "w " * 10])
    assert tokens.shape == (4, 6, 16) and tokens.dtype == torch.float32
    assert mask.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6]
    assert torch.equal(tokens[0, 0], tokens[2, 1]) and torch.equal(tokens[0, 2], tokens[2, 0])  # same word, same vector
    assert not torch.equal(tokens[0, 0], tokens[0, 1])
    end = tokens[1, 0]
    assert torch.equal(tokens[0, 3], end) and torch.equal(tokens[3, 5], end)  # truncated captions keep the end token
    assert (tokens[mask == 0] == 0).all()

    again = te.HashedWordEncoder(embed_dim=16, max_length=6)(["a red cat", ""])
    assert torch.equal(again[0], tokens[:2]) and torch.equal(again[1], mask[:2])
    assert not torch.equal(te.HashedWordEncoder(embed_dim=16, max_length=6, seed=1)(["a red cat"])[0], tokens[:1])

    assert enc.state_dict() == {}  # no weights: it saves as config only
    enc.save_pretrained(tmp_path / "enc")
    loaded = te.HashedWordEncoder.from_pretrained(tmp_path / "enc")
    assert (loaded.embed_dim, loaded.max_length, loaded.seed) == (16, 6, 0)
    assert torch.equal(loaded(["a red cat"])[0], tokens[:1])


def test_hashed_encoder_drives_a_pixart_adapter(tiny_pixart, make_inputs):
    from tca_lightning.models.adapters import get_adapter

    enc = te.HashedWordEncoder(embed_dim=tiny_pixart.config.caption_channels, max_length=8)
    adapter = get_adapter(tiny_pixart, enc)
    x, t, cond = make_inputs(adapter, batch_size=2)
    out = adapter.forward(x, t, cond)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert adapter.null_condition(3).tokens.shape == (3, 8, tiny_pixart.config.caption_channels)


# --- CachedCaptionEncoder ------------------------------------------------------------------------------------------

def test_cache_computes_each_caption_once_across_runs(tmp_path):
    captions = ["a cat", "", "a dog", "a cat", ""]
    counting = CountingEncoder(embed_dim=8, max_length=5)
    cached = te.CachedCaptionEncoder(counting, tmp_path, memory_items=0)
    tokens, mask = cached(captions)
    assert counting.seen == ["a cat", "", "a dog"]  # repeats in a batch are computed once
    reference = te.HashedWordEncoder(embed_dim=8, max_length=5)(captions)
    assert torch.equal(tokens, reference[0]) and torch.equal(mask, reference[1])
    assert tokens.dtype == reference[0].dtype and mask.dtype == reference[1].dtype

    entries = sorted(tmp_path.rglob("*.safetensors"))
    assert len(entries) == 3 and not list(tmp_path.rglob("*.tmp"))
    assert len({p.parent.parent for p in entries}) == 1 and (entries[0].parent.parent / "key.json").is_file()

    cached(["a dog", "a cat"])  # the same instance, no memory cache: from disk
    fresh = CountingEncoder(embed_dim=8, max_length=5)
    again = te.CachedCaptionEncoder(fresh, tmp_path)(captions)  # a new run (or another rank)
    assert counting.seen == ["a cat", "", "a dog"] and fresh.seen == []
    assert torch.equal(again[0], tokens) and torch.equal(again[1], mask)

    other = CountingEncoder(embed_dim=8, max_length=4)  # another max_length is another key, not a stale hit
    assert te.CachedCaptionEncoder(other, tmp_path)(["a cat"])[0].shape == (1, 4, 8) and other.seen == ["a cat"]


def test_cache_memory_lru_and_key_required(tmp_path):
    counting = CountingEncoder(embed_dim=4, max_length=3)
    cached = te.CachedCaptionEncoder(counting, cache_dir=None, memory_items=2)
    cached(["a", "b"])
    cached(["a", "b"])
    assert counting.seen == ["a", "b"]
    cached(["c"])
    cached(["a"])  # evicted by c
    assert counting.seen == ["a", "b", "c", "a"]
    with pytest.raises(ValueError, match="needs a key"):
        te.CachedCaptionEncoder(lambda caps: counting(caps), tmp_path)
    keyed = te.CachedCaptionEncoder(lambda caps: counting(caps), tmp_path, key="my-encoder")
    assert keyed(["z"])[0].shape == (1, 3, 4) and list(tmp_path.rglob("*.safetensors"))


# --- precomputed ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_precomputed_round_trip_and_missing_caption(tmp_path, suffix):
    enc = te.HashedWordEncoder(embed_dim=8, max_length=5)
    captions = ["a cat", "a dog", ""]
    tokens, mask = enc(captions)
    path = te.save_precomputed(tmp_path / f"emb{suffix}", captions, tokens.to(torch.bfloat16), mask, encoder="hashed")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))

    pre = te.CachedCaptionEncoder.from_precomputed(path)
    got_tokens, got_mask = pre(["", "a dog", "a dog", "a cat"])
    assert got_tokens.dtype == torch.bfloat16 and got_mask.dtype == torch.long
    assert torch.equal(got_tokens, tokens.to(torch.bfloat16)[[2, 1, 1, 0]])
    assert torch.equal(got_mask, mask[[2, 1, 1, 0]])
    assert (pre.max_length, pre.embed_dim) == (5, 8)

    with pytest.raises(te.MissingCaptionError, match="'a bird' is not in the precomputed embeddings.*save_precomputed"):
        pre(["a cat", "a bird"])
    no_null = te.CachedCaptionEncoder.from_precomputed(
        te.save_precomputed(tmp_path / f"nonull{suffix}", captions[:2], tokens[:2], mask[:2]))
    with pytest.raises(te.MissingCaptionError, match="null caption"):
        no_null([""])

    counting = CountingEncoder(embed_dim=8, max_length=5)  # an encoder computes only what the file lacks
    mixed = te.CachedCaptionEncoder.from_precomputed(path, encoder=counting)
    assert mixed(["a cat", "a bird"])[0].shape == (2, 5, 8) and counting.seen == ["a bird"]


def test_precomputed_format_errors_and_diffusers_names(tmp_path):
    tokens, mask = te.HashedWordEncoder(embed_dim=4, max_length=3)(["x", ""])
    with pytest.raises(ValueError, match="2 captions but 1 rows"):
        te.save_precomputed(tmp_path / "a.pt", ["x", ""], tokens[:1], mask[:1])
    with pytest.raises(ValueError, match="mask must be"):
        te.save_precomputed(tmp_path / "a.pt", ["x", ""], tokens, mask[:, :2])
    with pytest.raises(ValueError, match=r"\.safetensors or \.pt"):
        te.save_precomputed(tmp_path / "a.npz", ["x", ""], tokens, mask)
    with pytest.raises(FileNotFoundError, match="save_precomputed"):
        te.CachedCaptionEncoder.from_precomputed(tmp_path / "missing.safetensors")
    torch.save({"tokens": tokens}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a precomputed caption file"):
        te.CachedCaptionEncoder.from_precomputed(tmp_path / "bad.pt")
    torch.save({"captions": ["x", ""], "prompt_embeds": tokens, "prompt_attention_mask": mask}, tmp_path / "d.pt")
    assert torch.equal(te.CachedCaptionEncoder.from_precomputed(tmp_path / "d.pt")([""])[0], tokens[1:])


def test_precompute_cli_adds_the_null_caption(tmp_path):
    (tmp_path / "c.txt").write_text("a cat\na dog\na fox\n")
    out = te.main(["--captions", str(tmp_path / "c.txt"), "--limit", "2", "--encoder", "hashed:8",
                   "--out", str(tmp_path / "e.safetensors"), "--device", "cpu"])
    pre = te.CachedCaptionEncoder.from_precomputed(out)
    assert sorted(pre.precomputed_captions) == ["", "a cat", "a dog"]
    ref = te.HashedWordEncoder(embed_dim=8)(["a dog", ""])
    assert torch.equal(pre(["a dog", ""])[0], ref[0])


# --- T5 and the factory --------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_TRANSFORMERS, reason="transformers is installed: the missing-package error cannot happen")
def test_t5_without_transformers_explains_the_fix():
    with pytest.raises(ImportError, match="pip install transformers sentencepiece.*precomputed"):
        te.T5CaptionEncoder()
    with pytest.raises(ImportError, match="t5"):
        te.caption_encoder("t5:DeepFloyd/t5-v1_1-xxl")


def test_t5_subfolders(tmp_path):
    assert te._t5_subfolders("PixArt-alpha/PixArt-XL-2-512x512") == ("text_encoder", "tokenizer")
    assert te._t5_subfolders("DeepFloyd/t5-v1_1-xxl") == ("", "")
    (tmp_path / "pipe" / "text_encoder").mkdir(parents=True)
    (tmp_path / "t5").mkdir()
    assert te._t5_subfolders(str(tmp_path / "pipe")) == ("text_encoder", "tokenizer")
    assert te._t5_subfolders(str(tmp_path / "t5")) == ("", "")


def test_factory_forms(tmp_path):
    enc = te.caption_encoder("hashed:32", max_length=7)
    assert isinstance(enc, te.HashedWordEncoder) and (enc.embed_dim, enc.max_length) == (32, 7)
    assert te.caption_encoder("hashed", embed_dim=12).embed_dim == 12
    cached = te.caption_encoder("hashed:8", cache_dir=tmp_path / "cache", max_length=4)
    assert isinstance(cached, te.CachedCaptionEncoder) and cached(["a", ""])[0].shape == (2, 4, 8)
    assert list((tmp_path / "cache").rglob("*.safetensors"))
    tokens, mask = te.HashedWordEncoder(embed_dim=4, max_length=3)(["x", ""])
    path = te.save_precomputed(tmp_path / "p.safetensors", ["x", ""], tokens, mask)
    assert torch.equal(te.caption_encoder(f"precomputed:{path}")(["x"])[0], tokens[:1])
    for bad, message in [("clip:foo", "unknown caption encoder spec.*t5.*precomputed.*hashed"),
                         ("", "unknown caption encoder spec"), ("hashed:abc", "must be an integer"),
                         ("precomputed:", "names no file")]:
        with pytest.raises(ValueError, match=message):
            te.caption_encoder(bad)


def _fake_transformers(monkeypatch, fail: bool = False):
    """Stand-ins for transformers' T5 classes, recording how they are called (the real T5-XXL is 19 GB)."""
    import importlib.machinery
    import types

    calls = {}

    class Tokenizer:
        @classmethod
        def from_pretrained(cls, source, subfolder="", **kwargs):
            calls["tokenizer"] = (source, subfolder)
            return cls()

        def __call__(self, texts, padding, max_length=None, truncation=False, add_special_tokens=True,
                     return_tensors="pt"):
            calls.setdefault("texts", []).append(list(texts))
            lengths = [len(t.split()) + 1 for t in texts]
            width = max_length if padding == "max_length" else max(lengths)
            ids = torch.zeros(len(texts), width, dtype=torch.long)
            for i, n in enumerate(lengths):
                ids[i, :min(n, width)] = 1
            return types.SimpleNamespace(input_ids=ids, attention_mask=(ids > 0).long())

    class Model(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.proj = torch.nn.Linear(1, 4096, dtype=dtype)

        @property
        def device(self):
            return self.proj.weight.device

        @classmethod
        def from_pretrained(cls, source, subfolder="", torch_dtype=None, **kwargs):
            if fail:
                raise OSError("We couldn't connect to 'https://huggingface.co'")
            calls["model"] = (source, subfolder, torch_dtype)
            return cls(torch_dtype)

        def forward(self, ids, attention_mask):
            return types.SimpleNamespace(last_hidden_state=self.proj(ids[..., None].to(self.proj.weight.dtype)))

    for name, attrs in [("transformers", {"T5Tokenizer": Tokenizer, "T5EncoderModel": Model}), ("sentencepiece", {})]:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        monkeypatch.setitem(__import__("sys").modules, name, module)
    return calls


def test_t5_encoder_follows_the_pixart_pipeline(monkeypatch):
    calls = _fake_transformers(monkeypatch)
    enc = te.T5CaptionEncoder(dtype="float32")
    assert "model" not in calls  # lazy: nothing loads before the first caption
    with pytest.warns(UserWarning, match="truncated"):
        tokens, mask = enc(["  A Red CAT ", "", "w " * 200])
    assert calls["model"] == ("PixArt-alpha/PixArt-XL-2-512x512", "text_encoder", torch.float32)
    assert calls["tokenizer"] == ("PixArt-alpha/PixArt-XL-2-512x512", "tokenizer")
    assert calls["texts"][0][:2] == ["a red cat", ""]  # lower-cased and stripped, as encode_prompt without cleaning
    assert tokens.shape == (3, 120, 4096) and mask.shape == (3, 120) and mask.dtype == torch.long
    assert mask[0].sum() == 4 and mask[1].sum() == 1 and mask[2].sum() == 120
    assert enc.state_dict() == {}  # T5 stays out of checkpoints of modules holding the encoder
    assert "t5:PixArt-alpha/PixArt-XL-2-512x512" in enc.cache_key and "L120" in enc.cache_key


def test_t5_offline_error_names_the_download(monkeypatch):
    _fake_transformers(monkeypatch, fail=True)
    with pytest.raises(OSError, match="huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512 "
                                      "--include 'text_encoder/\\*' 'tokenizer/\\*'"):
        te.T5CaptionEncoder()(["a cat"])
