"""Model resolution: random architectures, local folders, pipeline folders, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from tca_lightning.models import loading
from tca_lightning.models.adapters import get_adapter
from tca_lightning.models.captions import TinyCaptionEncoder
from tca_lightning.models.classifier import MnistFeatures
from tca_lightning.models.loading import ARCHITECTURES, ModelNotFoundError, load_classifier, load_model
from tca_lightning.models.tiny import TINY_DIT_CONFIG, TINY_PIXART_CONFIG, build_tiny_dit, build_tiny_pixart


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- random:<arch> ------------------------------------------------------------------------------

def test_random_tiny_dit():
    before = torch.random.get_rng_state()
    loaded = load_model("random:tiny-dit")
    assert torch.equal(torch.random.get_rng_state(), before), "random init must not consume the global RNG"
    assert loaded.name == "random:tiny-dit"
    assert isinstance(loaded.transformer, DiTTransformer2DModel)
    assert not loaded.transformer.training, "load_model returns eval mode (a DiT in train mode drops labels)"
    assert loaded.caption_encoder is None and loaded.vae is None and loaded.scheduler_config == {}
    for key, value in TINY_DIT_CONFIG.items():
        assert loaded.transformer.config[key] == value, key
    assert same_weights(loaded.transformer, load_model("random:tiny-dit").transformer), "same seed, same weights"
    assert not same_weights(loaded.transformer, load_model("random:tiny-dit", seed=1).transformer)


def test_random_tiny_pixart():
    loaded = load_model("random:tiny-pixart")
    assert isinstance(loaded.transformer, PixArtTransformer2DModel) and not loaded.transformer.training
    assert isinstance(loaded.caption_encoder, TinyCaptionEncoder)
    assert loaded.caption_encoder.embed_dim == TINY_PIXART_CONFIG["caption_channels"]
    for key, value in TINY_PIXART_CONFIG.items():
        assert loaded.transformer.config[key] == value, key
    adapter = get_adapter(loaded.transformer, loaded.caption_encoder)
    cond = adapter.encode_captions(["a handwritten five"])
    out = adapter.forward(torch.zeros(1, 1, 32, 32), torch.tensor([3]), cond)
    assert out.shape == (1, 2, 32, 32)


def test_torch_dtype_applies_to_the_transformer():
    loaded = load_model("random:tiny-dit", torch_dtype=torch.float64)
    assert {p.dtype for p in loaded.transformer.parameters()} == {torch.float64}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_configs_build(arch):
    """Every registered config is valid for diffusers and fully covered by its adapter's role table.

    One layer only: the real architectures are DiT-XL/2-sized (about 675M parameters at 28 layers).
    """
    cls, config = ARCHITECTURES[arch]
    with torch.device("meta"):
        model = cls(**{**config, "num_layers": 1})
    adapter = get_adapter(model)
    refs = adapter.linears()
    assert len(refs) == sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert adapter.learned_sigma


@pytest.mark.slow
def test_random_dit_xl_2_256_full_size():
    loaded = load_model("random:dit-xl-2-256")
    model = loaded.transformer
    n = sum(p.numel() for p in model.parameters())
    # DiT-XL/2 has 675M parameters with one timestep/label embedder; diffusers keeps one (equal) copy per block.
    per_block_embedder = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    assert abs(n - 27 * per_block_embedder - 675e6) < 2e6, n
    assert len(get_adapter(loaded.transformer).blocks()) == 28


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, needle", [
    ("./no/such/model", "does not exist"),
    ("/no/such/model", "does not exist"),
    ("no/such/model/", "does not exist"),
    ("tiny-ditt", "unknown model name"),
    ("random:nope", "unknown architecture"),
])
def test_unresolvable_models_raise_clear_errors(model, needle):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(model)
    message = str(info.value)
    assert repr(model.split(":", 1)[1] if model.startswith("random:") else model) in message
    assert needle in message
    assert isinstance(info.value, FileNotFoundError)  # callers catching FileNotFoundError still work


def test_unknown_name_lists_the_choices():
    with pytest.raises(ModelNotFoundError) as info:
        load_model("tiny-ditt")
    assert "tiny-dit" in str(info.value) and "random:" in str(info.value)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("random:nope")
    assert "dit-xl-2-256" in str(info.value)


@pytest.mark.parametrize("model", ["", None, 3])
def test_non_string_or_empty_model(model):
    with pytest.raises(ModelNotFoundError, match="non-empty string"):
        load_model(model)


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_pipeline_folder_without_transformer_config(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path / "transformer") in str(info.value)


def test_folder_of_an_unsupported_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ModelNotFoundError, match="UNet2DModel"):
        load_model(str(tmp_path))


def test_missing_embedded_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "WEIGHTS", tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("tiny-dit")
    assert str(tmp_path / "tiny-dit") in str(info.value)
    assert "train_tiny tiny-dit" in str(info.value)


def test_hub_id_offline_raises_clear_error(monkeypatch, tmp_path):
    """A hub id that is neither cached nor reachable: one ModelNotFoundError naming it (no network used)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        load_model("facebook/DiT-XL-2-256")
    message = str(info.value)
    assert "'facebook/DiT-XL-2-256'" in message and "huggingface-cli download facebook/DiT-XL-2-256" in message


def fake_hub_cache(cache, repo_id: str, files: dict) -> None:
    """A Hugging Face cache holding ``repo_id`` at revision main (the layout huggingface_hub reads offline)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for relative, writer in files.items():
        writer(snapshot / relative)


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_hub_id_loads_from_the_local_cache(tmp_path, monkeypatch, layout):
    """A cached hub id loads without network: a pipeline repo (transformer/ + scheduler/) or a bare transformer."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = build_tiny_dit(num_layers=1).eval()
    files = {"transformer" if layout == "pipeline" else ".": lambda p: model.save_pretrained(p)}
    if layout == "pipeline":
        files["scheduler/scheduler_config.json"] = lambda p: (p.parent.mkdir(parents=True),
                                                               p.write_text(json.dumps({"beta_end": 0.012})))
    fake_hub_cache(tmp_path, "owner/some-dit", files)
    loaded = load_model("owner/some-dit")
    assert loaded.name == "owner/some-dit" and not loaded.transformer.training
    assert isinstance(loaded.transformer, DiTTransformer2DModel) and same_weights(model, loaded.transformer)
    assert loaded.scheduler_config.get("beta_end") == (0.012 if layout == "pipeline" else None)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1, latent_channels=1,
                         in_channels=1, out_channels=1)


def save_pipeline_with_vae(folder):
    torch.manual_seed(0)
    build_tiny_dit(num_layers=1).save_pretrained(folder / "transformer")
    tiny_vae().save_pretrained(folder / "vae")


def test_local_pipeline_folder_loads_its_vae(tmp_path):
    save_pipeline_with_vae(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.vae is not None and type(loaded.vae).__name__ == "AutoencoderKL" and not loaded.vae.training


def test_hub_pipeline_loads_its_vae(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    fake_hub_cache(tmp_path / "cache", "owner/latent-dit", {".": save_pipeline_with_vae})
    loaded = load_model("owner/latent-dit")
    assert isinstance(loaded.transformer, DiTTransformer2DModel)
    assert loaded.vae is not None


@pytest.mark.slow
def test_hub_id_without_network_raises_clear_error():
    """The real thing: the hub is unreachable from this machine (retries take ~50 s)."""
    with pytest.raises(ModelNotFoundError, match="facebook/DiT-XL-2-256"):
        load_model("facebook/DiT-XL-2-256")


def test_missing_vae_folder_raises(tmp_path):
    (tmp_path / "vae").mkdir()  # exists, but holds no AutoencoderKL
    with pytest.raises(ModelNotFoundError, match="VAE") as info:
        load_model("random:tiny-dit", vae=str(tmp_path / "vae"))
    assert str(tmp_path / "vae") in str(info.value)


# --- local folders: round trips ---------------------------------------------------------------------

def test_transformer_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_dit(num_layers=2).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.name == str(tmp_path) and loaded.caption_encoder is None
    assert isinstance(loaded.transformer, DiTTransformer2DModel) and not loaded.transformer.training
    assert same_weights(model, loaded.transformer)
    x = torch.randn(2, 1, 32, 32)
    t, labels = torch.tensor([10, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(model(x, timestep=t, class_labels=labels).sample,
                           loaded.transformer(x, timestep=t, class_labels=labels).sample)


def test_pipeline_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_pixart(num_layers=2).eval()
    encoder = TinyCaptionEncoder(embed_dim=64, seed=3)
    model.save_pretrained(tmp_path / "transformer")
    encoder.save_pretrained(tmp_path / "caption_encoder")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_end": 0.012}))
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.transformer, PixArtTransformer2DModel) and same_weights(model, loaded.transformer)
    assert isinstance(loaded.caption_encoder, TinyCaptionEncoder) and loaded.caption_encoder.seed == 3
    assert torch.equal(loaded.caption_encoder.table, encoder.table)
    assert loaded.scheduler_config == {"beta_end": 0.012}
    a, b = get_adapter(model, encoder), get_adapter(loaded.transformer, loaded.caption_encoder)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 900])
    cond_a, cond_b = a.encode_captions(["a thin handwritten four", ""]), b.encode_captions(["a thin handwritten four", ""])
    assert torch.equal(a.forward(x, t, cond_a), b.forward(x, t, cond_b))


# --- shipped models and classifier --------------------------------------------------------------------

def test_shipped_tiny_dit_loads(shipped):
    loaded = shipped("tiny-dit")
    assert isinstance(loaded.transformer, DiTTransformer2DModel) and not loaded.transformer.training
    for key, value in TINY_DIT_CONFIG.items():
        assert loaded.transformer.config[key] == value, key


def test_shipped_tiny_pixart_loads(shipped):
    loaded = shipped("tiny-pixart")
    assert isinstance(loaded.transformer, PixArtTransformer2DModel) and not loaded.transformer.training
    assert isinstance(loaded.caption_encoder, TinyCaptionEncoder)
    for key, value in TINY_PIXART_CONFIG.items():
        assert loaded.transformer.config[key] == value, key


def test_load_classifier_default_and_missing(tmp_path):
    classifier = load_classifier()
    assert isinstance(classifier, MnistFeatures) and not classifier.training
    assert classifier.num_features == 128 and classifier.num_classes == 10
    with pytest.raises(ModelNotFoundError, match="classifier folder"):
        load_classifier(str(tmp_path))


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MnistFeatures(width=4, num_features=8).eval()
    model.save_pretrained(tmp_path)
    loaded = load_classifier(str(tmp_path))
    assert loaded.num_features == 8 and same_weights(model, loaded)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.equal(model.logits(x), loaded.logits(x))
    assert model(x).shape == (3, 8)


def test_shipped_classifier_accuracy():
    """The shipped mnist-features classifies the held-out digits (the docs claim 99.2%)."""
    from tca_lightning.data.digits import load_digits

    images, labels = load_digits("heldout")
    with torch.no_grad():
        accuracy = (load_classifier().logits(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.98


# --- shrunk random architectures (configs/shrink/*.yaml) --------------------------------------------

SHRUNK_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=4)
SHRUNK_VAE = dict(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, sample_size=8)


def test_model_config_shrinks_a_random_architecture_and_keeps_the_rest():
    from diffusers import AutoencoderKL

    from tca_lightning.models.samplers import decode

    loaded = load_model("random:dit-xl-2-256", vae="random:sd-vae-ft-ema", model_config=SHRUNK_DIT,
                        vae_config=SHRUNK_VAE)
    config = loaded.transformer.config
    assert (config.num_layers, config.num_attention_heads * config.attention_head_dim) == (2, 32)
    assert (config.num_embeds_ada_norm, config.in_channels, config.out_channels) == (1000, 4, 8)  # DiT-XL/2's
    assert isinstance(loaded.vae, AutoencoderKL) and not loaded.vae.training
    assert loaded.vae.config.scaling_factor == 0.18215 and tuple(loaded.vae.config.block_out_channels) == (8, 8)
    images = decode(torch.randn(2, 4, 4, 4), loaded.vae)
    assert images.shape == (2, 3, 8, 8) and images.is_contiguous() and 0 <= images.min() <= images.max() <= 1
    again = load_model("random:dit-xl-2-256", vae="random:sd-vae-ft-ema", model_config=SHRUNK_DIT, vae_config=SHRUNK_VAE)
    assert same_weights(loaded.vae, again.vae) and same_weights(loaded.transformer, again.transformer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="random:dit-xl-2-256", model_config={"num_layer": 2}), r"unknown config keys \['num_layer'\]"),
    (dict(model="tiny-dit", model_config={"num_layers": 2}), "overrides a random:<arch> model"),
    (dict(model="random:tiny-dit", vae="some/vae", vae_config={"layers_per_block": 1}), "overrides a random:<arch> VAE"),
    (dict(model="random:tiny-dit", vae="random:no-such-vae"), "unknown VAE architecture 'no-such-vae'"),
])
def test_bad_architecture_overrides_fail_clearly(kwargs, message):
    with pytest.raises((ValueError, ModelNotFoundError), match=message):
        load_model(**kwargs)
