"""The adapter layer: architecture lookup, the role of every linear, forward, capture and replay."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from torch import nn

from tca_lightning.models.adapters import (
    ROLES,
    Condition,
    DiTAdapter,
    PixArtAdapter,
    get_adapter,
    register_adapter,
)
from tca_lightning.models import adapters as adapters_module
from tca_lightning.models.tiny import TINY_DIT_CONFIG, build_tiny_dit, tie_dit_embedders


def expected_role_counts(adapter) -> dict[str, int]:
    n = adapter.config.num_layers
    if adapter.kind == "dit":
        # per block: to_q/k/v, to_out.0, ff in/out, adaLN modulation, timestep embedder (2 linears); 2 final linears
        return {"qkv": 3 * n, "attn_out": n, "fc1": n, "fc2": n, "adaln": n, "embedders": 2 * n, "final": 2}
    # PixArt: + cross-attention per block; one shared adaLN-single (timestep MLP + modulation), caption projection
    return {"qkv": 3 * n, "attn_out": n, "cross_q": n, "cross_kv": 2 * n, "cross_out": n, "fc1": n, "fc2": n,
            "adaln": 1, "embedders": 4, "final": 1}


IN_BLOCK = {"dit": {"qkv": 3, "attn_out": 1, "fc1": 1, "fc2": 1, "adaln": 1, "embedders": 2},
            "pixart": {"qkv": 3, "attn_out": 1, "cross_q": 1, "cross_kv": 2, "cross_out": 1, "fc1": 1, "fc2": 1}}


def hidden_states_in(io) -> torch.Tensor:
    return io.args[0] if io.args else io.kwargs["hidden_states"]


# --- lookup -------------------------------------------------------------------------------------

def test_get_adapter_picks_the_architecture(tiny_dit, tiny_pixart, caption_encoder):
    dit = get_adapter(tiny_dit)
    pixart = get_adapter(tiny_pixart, caption_encoder)
    assert type(dit) is DiTAdapter and dit.kind == "dit" and dit.transformer is tiny_dit
    assert type(pixart) is PixArtAdapter and pixart.kind == "pixart" and pixart.caption_encoder is caption_encoder
    assert dit.in_channels == 1 and dit.learned_sigma and dit.num_classes == 10
    assert pixart.in_channels == 1 and pixart.learned_sigma
    assert len(dit.blocks()) == len(pixart.blocks()) == 2


def test_get_adapter_on_shipped_models(shipped):
    dit = shipped("tiny-dit")
    assert isinstance(dit.transformer, DiTTransformer2DModel)
    assert type(get_adapter(dit.transformer)) is DiTAdapter
    pixart = shipped("tiny-pixart")
    assert isinstance(pixart.transformer, PixArtTransformer2DModel)
    assert pixart.caption_encoder is not None, "tiny-pixart must ship its caption encoder"
    assert type(get_adapter(pixart.transformer, pixart.caption_encoder)) is PixArtAdapter


@pytest.mark.parametrize("module", [nn.Linear(2, 2), nn.Sequential()], ids=["Linear", "Sequential"])
def test_get_adapter_rejects_unsupported_modules(module):
    with pytest.raises(TypeError, match=type(module).__name__) as info:
        get_adapter(module)
    assert "DiTTransformer2DModel" in str(info.value) and "register_adapter" in str(info.value)


def test_register_adapter_adds_an_architecture(monkeypatch):
    class MyDiT(DiTTransformer2DModel):
        pass

    model = MyDiT(**{**TINY_DIT_CONFIG, "num_layers": 1})
    with pytest.raises(TypeError, match="MyDiT"):
        get_adapter(model)
    monkeypatch.setitem(adapters_module._REGISTRY, "MyDiT", DiTAdapter)  # undone after the test
    register_adapter("MyDiT", DiTAdapter)
    assert type(get_adapter(model)) is DiTAdapter


# --- linears and roles -----------------------------------------------------------------------------

def test_linears_cover_every_linear_once_with_roles(any_adapter):
    refs = any_adapter.linears()
    model = any_adapter.transformer
    all_linears = {id(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert len(refs) == len(all_linears), "every nn.Linear exactly once"
    assert {id(r.module) for r in refs} == all_linears
    assert len({r.name for r in refs}) == len(refs)
    for r in refs:
        assert r.role in ROLES
        assert model.get_submodule(r.name) is r.module
    assert dict(Counter(r.role for r in refs)) == expected_role_counts(any_adapter)


def test_linears_block_indices(any_adapter):
    n = any_adapter.config.num_layers
    refs = any_adapter.linears()
    per_block = IN_BLOCK[any_adapter.kind]
    for i in range(n):
        in_block = [r for r in refs if r.block == i]
        assert all(r.name.startswith(f"transformer_blocks.{i}.") for r in in_block)
        assert dict(Counter(r.role for r in in_block)) == per_block
    outside = [r for r in refs if r.block is None]
    assert all(not r.name.startswith("transformer_blocks.") for r in outside)
    assert {r.block for r in refs} == set(range(n)) | {None}
    assert len(outside) == sum(expected_role_counts(any_adapter).values()) - n * sum(per_block.values())


def test_linears_role_filter(any_adapter):
    everything = any_adapter.linears()
    for roles in [("qkv",), ("fc1", "fc2"), ("final",), ("adaln", "embedders")]:
        picked = any_adapter.linears(roles)
        assert [r.name for r in picked] == [r.name for r in everything if r.role in roles]
        assert picked and {r.role for r in picked} == set(roles)
    assert any_adapter.linears(()) == []


def test_linears_of_tied_dit_embedders_are_listed_once():
    model = build_tiny_dit(num_layers=3)
    tie_dit_embedders(model)  # the training layout: one embedder module shared by all blocks
    refs = get_adapter(model).linears()
    embedders = [r for r in refs if r.role == "embedders"]
    assert len(embedders) == 2 and {r.block for r in embedders} == {0}
    assert len({id(r.module) for r in refs}) == len(refs)
    assert len(refs) == len({id(m) for m in model.modules() if isinstance(m, nn.Linear)})


@pytest.mark.parametrize("where", ["top", "block"])
def test_unknown_linear_raises(any_adapter, where):
    if where == "top":
        any_adapter.transformer.extra_head = nn.Linear(4, 4)
        name = "extra_head"
    else:
        any_adapter.blocks()[0].attn1.to_gate = nn.Linear(4, 4)
        name = "transformer_blocks.0.attn1.to_gate"
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        any_adapter.linears()
    with pytest.raises(ValueError):  # the role filter does not hide an unknown linear
        any_adapter.linears(("qkv",))


# --- conditioning and forward --------------------------------------------------------------------

def test_null_conditions(dit_adapter, pixart_adapter):
    null = dit_adapter.null_condition(3)
    assert torch.equal(null.labels, torch.full((3,), 10)) and null.tokens is None
    null = pixart_adapter.null_condition(3)
    tokens, mask = pixart_adapter.caption_encoder([""])
    assert null.tokens.shape == (3, *tokens.shape[1:]) and torch.equal(null.tokens[2], tokens[0])
    assert torch.equal(null.mask, mask.expand(3, -1))
    assert len(null) == 3


def test_forward_shapes_and_missing_conditions(any_adapter, make_inputs):
    x, t, cond = make_inputs(any_adapter, 3)
    out = any_adapter.forward(x, t, cond)
    assert out.shape == (3, any_adapter.config.out_channels, *x.shape[2:])
    assert torch.isfinite(out).all()
    # a scalar timestep broadcasts to the batch
    same_t = any_adapter.forward(x, torch.tensor(500), cond)
    assert torch.allclose(same_t, any_adapter.forward(x, torch.full((3,), 500), cond), atol=1e-6)
    with pytest.raises(ValueError, match="labels" if any_adapter.kind == "dit" else "tokens"):
        any_adapter.forward(x, t, Condition())


def test_forward_depends_on_the_condition(dit_adapter, pixart_adapter, make_inputs):
    for adapter in (dit_adapter, pixart_adapter):
        x, t, cond = make_inputs(adapter, 2)
        null = adapter.null_condition(2)
        assert not torch.allclose(adapter.forward(x, t, cond)[0], adapter.forward(x, t, null)[0])


def test_pixart_without_caption_encoder(tiny_pixart):
    adapter = get_adapter(tiny_pixart)
    with pytest.raises(ValueError, match="caption encoder"):
        adapter.encode_captions(["a handwritten one"])
    with pytest.raises(ValueError, match="caption encoder"):
        adapter.null_condition(1)


def test_condition_cat_and_len():
    a = Condition(labels=torch.tensor([1, 2]))
    b = Condition(labels=torch.tensor([3]))
    both = a.cat(b)
    assert len(both) == 3 and torch.equal(both.labels, torch.tensor([1, 2, 3])) and both.tokens is None
    c = Condition(tokens=torch.zeros(2, 4, 8), mask=torch.ones(2, 4))
    cc = c.cat(c)
    assert len(cc) == 4 and cc.tokens.shape == (4, 4, 8) and cc.mask.shape == (4, 4) and cc.labels is None


# --- capture and replay -----------------------------------------------------------------------------

def test_capture_matches_forward_and_sees_every_block(any_adapter, make_inputs):
    x, t, cond = make_inputs(any_adapter, 2)
    plain = any_adapter.forward(x, t, cond)
    out, captured = any_adapter.capture(x, t, cond)
    assert torch.allclose(out, plain, rtol=0, atol=1e-6)
    assert sorted(captured) == list(range(any_adapter.config.num_layers))
    for io in captured.values():
        assert io.output is not None and io.output.shape == hidden_states_in(io).shape
        assert not io.output.requires_grad


def test_capture_subset_of_blocks(any_adapter, make_inputs):
    x, t, cond = make_inputs(any_adapter, 2)
    last = any_adapter.config.num_layers - 1
    _, captured = any_adapter.capture(x, t, cond, blocks=[last])
    assert list(captured) == [last]


def test_capture_removes_its_hooks(any_adapter, make_inputs):
    x, t, cond = make_inputs(any_adapter, 2)
    any_adapter.capture(x, t, cond)
    with pytest.raises(ValueError):
        any_adapter.capture(x, t, Condition())  # the forward fails: hooks must still go away
    for block in any_adapter.blocks():
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_run_block_replays_the_captured_output(any_adapter, make_inputs):
    x, t, cond = make_inputs(any_adapter, 2)
    _, captured = any_adapter.capture(x, t, cond)
    for i, io in captured.items():
        replay = any_adapter.run_block(i, io)
        assert torch.allclose(replay, io.output, rtol=0, atol=1e-5), f"block {i}"


def test_run_block_uses_the_stand_in(dit_adapter, make_inputs):
    x, t, cond = make_inputs(dit_adapter, 2)
    _, captured = dit_adapter.capture(x, t, cond, blocks=[1])
    copy_block = copy.deepcopy(dit_adapter.blocks()[1])
    assert torch.allclose(dit_adapter.run_block(1, captured[1], copy_block), captured[1].output, atol=1e-5)
    with torch.no_grad():
        copy_block.ff.net[2].weight.mul_(2.0)
    assert not torch.allclose(dit_adapter.run_block(1, captured[1], copy_block), captured[1].output, atol=1e-3)


def test_captured_blocks_chain(any_adapter, make_inputs):
    x, t, cond = make_inputs(any_adapter, 2)
    _, captured = any_adapter.capture(x, t, cond)
    for i in range(any_adapter.config.num_layers - 1):
        assert torch.equal(captured[i].output, hidden_states_in(captured[i + 1])), f"block {i} -> {i + 1}"


def test_captured_inputs_are_not_changed_by_later_blocks(any_adapter, make_inputs):
    """Captured tensors are detached views: replaying block 0 must not alter what block 1 captured."""
    x, t, cond = make_inputs(any_adapter, 2)
    _, captured = any_adapter.capture(x, t, cond)
    before = hidden_states_in(captured[1]).clone()
    any_adapter.run_block(0, captured[0])
    any_adapter.run_block(1, captured[1])
    assert torch.equal(hidden_states_in(captured[1]), before)
