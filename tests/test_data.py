"""The embedded digits, their style terciles, sampling conditions and the tiny caption encoder."""

from __future__ import annotations

import json

import pytest
import torch

from tca_lightning.data import ConditionDataset, SamplingDataModule
from tca_lightning.data.digits import HELD_OUT_PER_CLASS, digit_styles, load_digits
from tca_lightning.models.captions import (
    DIGIT_WORDS,
    SLANT_WORDS,
    THICKNESS_WORDS,
    VOCAB,
    TinyCaptionEncoder,
    digit_of_caption,
    make_caption,
)


@pytest.fixture(scope="module")
def splits():
    return {name: load_digits(name) for name in ("train", "heldout", "all")}


# --- digits --------------------------------------------------------------------------------------

def test_split_sizes_and_balance(splits):
    (xt, yt), (xh, yh), (xa, ya) = splits["train"], splits["heldout"], splits["all"]
    assert xt.shape == (4500, 1, 32, 32) and yt.shape == (4500,)
    assert xh.shape == (500, 1, 32, 32) and yh.shape == (500,)
    assert xa.shape == (5000, 1, 32, 32)
    assert HELD_OUT_PER_CLASS == 50
    assert torch.equal(torch.bincount(yt, minlength=10), torch.full((10,), 450))
    assert torch.equal(torch.bincount(yh, minlength=10), torch.full((10,), 50))
    assert xt.dtype == torch.float32 and yt.dtype == torch.long


def test_values_and_padding(splits):
    images, _ = splits["all"]
    assert images.min() == -1.0 and images.max() == 1.0
    assert (images[..., :2, :] == -1).all() and (images[..., -2:, :] == -1).all()  # the 2-pixel pad is black
    assert (images[..., :, :2] == -1).all() and (images[..., :, -2:] == -1).all()


def test_splits_are_disjoint_and_cover_everything(splits):
    (xt, yt), (xh, yh), (xa, ya) = splits["train"], splits["heldout"], splits["all"]
    key = lambda x: {bytes(row.numpy().tobytes()) for row in x.flatten(1)}  # noqa: E731
    train, held, everything = key(xt), key(xh), key(xa)
    assert not train & held
    assert train | held == everything
    assert len(held) == 500  # no duplicate images in the held-out set


def test_split_is_deterministic(splits):
    again, labels = load_digits("heldout")
    assert torch.equal(again, splits["heldout"][0]) and torch.equal(labels, splits["heldout"][1])


@pytest.mark.parametrize("split", ["test", "", "Train"])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="split"):
        load_digits(split)


def test_digit_styles_terciles(splits):
    images, labels = splits["heldout"]
    thickness, slant = digit_styles(images, labels)
    assert thickness.shape == slant.shape == labels.shape
    for styles in (thickness, slant):
        assert styles.dtype == torch.long and styles.min() >= 0 and styles.max() <= 2
        for c in range(10):
            counts = torch.bincount(styles[labels == c], minlength=3)
            assert len(counts) == 3 and (counts >= 15).all(), (c, counts)  # ~1/3 each of 50
    # thickness orders the ink mass within a class
    mass = ((images + 1) / 2).flatten(1).sum(1)
    for c in range(10):
        m, t = mass[labels == c], thickness[labels == c]
        assert m[t == 0].max() <= m[t == 1].min() and m[t == 1].max() <= m[t == 2].min()


def test_digit_slant_sign():
    """A stroke whose top leans right is slant 2, one leaning left slant 0 (within the same class)."""
    images = -torch.ones(3, 1, 32, 32)
    for row in range(6, 26):
        images[0, 0, row, 16 + (16 - row) // 3] = 1.0  # top to the right
        images[1, 0, row, 16] = 1.0  # upright
        images[2, 0, row, 16 - (16 - row) // 3] = 1.0  # top to the left
    _, slant = digit_styles(images, torch.zeros(3, dtype=torch.long))
    assert slant.tolist() == [2, 1, 0]


# --- conditions -----------------------------------------------------------------------------------

def test_condition_dataset():
    ds = ConditionDataset(num_samples=57, num_classes=10, seed=0)
    assert len(ds) == 57
    for i in range(57):
        item = ds[i]
        assert item["index"] == i and item["label"] == i % 10
        assert digit_of_caption(item["caption"]) == i % 10
        assert ds[i] == item  # same index, same caption
    captions = {ds[i]["caption"] for i in range(57)}
    assert len(captions) > 10, "captions vary their style words"
    assert any(w in c for c in captions for w in THICKNESS_WORDS) and any(w in c for c in captions for w in SLANT_WORDS)
    other = ConditionDataset(num_samples=57, num_classes=10, seed=1)
    assert [other[i]["caption"] for i in range(57)] != [ds[i]["caption"] for i in range(57)]
    TinyCaptionEncoder().tokenize(sorted(captions))  # every caption fits the tiny vocabulary and length


def test_condition_dataset_fewer_classes():
    ds = ConditionDataset(num_samples=9, num_classes=3, seed=0)
    assert [ds[i]["label"] for i in range(9)] == [0, 1, 2] * 3


def test_sampling_datamodule():
    dm = SamplingDataModule(num_samples=25, batch_size=10)
    batches = list(dm.test_dataloader())
    assert [len(b["index"]) for b in batches] == [10, 10, 5]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(25))
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.arange(25) % 10)
    assert batches[0]["caption"][3] == ConditionDataset(25, 10, 0)[3]["caption"]
    assert len(list(dm.predict_dataloader())) == 3
    for bad in (dict(num_samples=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            SamplingDataModule(**bad)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_batches_deal_fixed_batches_once(world):
    """Every rank gets whole batches b = rank, rank + world, ...: together each sample exactly once (no
    DistributedSampler padding), and batch b holds the same indices whatever the device count."""
    from tca_lightning.data.conditions import ConditionBatches, RankBatches

    batches = ConditionBatches(ConditionDataset(23, 10, 0), batch_size=4)
    seen = {}
    for rank in range(world):
        for b in RankBatches(batches, world, rank):
            assert b % world == rank and b not in seen
            seen[b] = batches[b]
        assert len(RankBatches(batches, world, rank)) == len(range(rank, 6, world))
    assert sorted(seen) == list(range(6))
    assert torch.equal(torch.cat([seen[b]["index"] for b in range(6)]), torch.arange(23))
    assert seen[5]["index"].tolist() == [20, 21, 22] and seen[5]["batch"] == 5 and seen[5]["batch_size"] == 4


def test_dit_labels_beyond_the_models_classes_fail_clearly(dit_adapter):
    from tca_lightning.data.conditions import batch_condition, condition_batch

    batch = condition_batch(12, num_classes=12)
    with pytest.raises(ValueError, match="out of range for a DiT with 10 classes: set data.init_args.num_classes"):
        batch_condition(dit_adapter, batch)


# --- captions ---------------------------------------------------------------------------------------

def test_make_and_read_captions():
    assert make_caption(7) == "a handwritten seven"
    assert make_caption(7, 2, 0) == "a thick left-leaning handwritten seven"
    for d in range(10):
        assert digit_of_caption(make_caption(d, 1, 2)) == d
    assert digit_of_caption("A Handwritten NINE") == 9
    for bad in ("a handwritten digit", "a one and a two"):
        with pytest.raises(ValueError, match="exactly one digit"):
            digit_of_caption(bad)


def test_encoder_unknown_word_names_it():
    with pytest.raises(ValueError, match="purple"):
        TinyCaptionEncoder().tokenize(["a purple handwritten seven"])
    with pytest.raises(ValueError, match="<eos>"):  # special tokens are not words
        TinyCaptionEncoder().tokenize(["a <eos> seven"])


def test_encoder_too_long_caption():
    encoder = TinyCaptionEncoder(max_length=8)
    encoder.tokenize(["a thick left-leaning handwritten digit seven seven"])  # 7 words + <eos> fit
    with pytest.raises(ValueError, match="longer than"):
        encoder.tokenize(["a thick left-leaning handwritten digit seven seven seven"])


def test_encoder_tokens_and_mask():
    encoder = TinyCaptionEncoder(embed_dim=16, max_length=8)
    ids, mask = encoder.tokenize(["a handwritten seven", ""])
    eos = VOCAB.index("<eos>")
    assert ids[0, :4].tolist() == [VOCAB.index("a"), VOCAB.index("handwritten"), VOCAB.index("seven"), eos]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1, 0] == eos and mask[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # "" is the null caption
    assert (ids[mask == 0] == VOCAB.index("<pad>")).all()
    emb, emask = encoder(["a handwritten seven", ""])
    assert emb.shape == (2, 8, 16) and torch.equal(emask, mask)
    assert torch.equal(emb[0, 2], encoder.table[VOCAB.index("seven")])
    assert not encoder.table.requires_grad and "table" in dict(encoder.named_buffers())


def test_encoder_is_seeded():
    assert torch.equal(TinyCaptionEncoder(seed=0).table, TinyCaptionEncoder(seed=0).table)
    assert not torch.equal(TinyCaptionEncoder(seed=0).table, TinyCaptionEncoder(seed=1).table)
    assert TinyCaptionEncoder().table.shape == (len(VOCAB), 64)
    assert len(set(VOCAB)) == len(VOCAB) and set(DIGIT_WORDS) <= set(VOCAB)


def test_encoder_round_trip(tmp_path):
    encoder = TinyCaptionEncoder(embed_dim=12, max_length=6, seed=5)
    encoder.table.mul_(3.0)  # the saved table, not the seed, must come back
    encoder.save_pretrained(tmp_path)
    loaded = TinyCaptionEncoder.from_pretrained(tmp_path)
    assert (loaded.embed_dim, loaded.max_length, loaded.seed) == (12, 6, 5)
    assert torch.equal(loaded.table, encoder.table)
    captions = ["a thin handwritten one", ""]
    for a, b in zip(encoder(captions), loaded(captions)):
        assert torch.equal(a, b)


def test_encoder_rejects_another_vocabulary(tmp_path):
    TinyCaptionEncoder(embed_dim=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab"] = config["vocab"][:-1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocabulary"):
        TinyCaptionEncoder.from_pretrained(tmp_path)
