"""Shared fixtures: tiny random DiT / PixArt transformers, their adapters, and the shipped models.

Every default test runs on 2-layer random models (milliseconds per forward on one CPU thread).
The shipped ``tiny-dit`` / ``tiny-pixart`` weights may not exist yet (they are trained by
``tca_lightning.train_tiny``); tests that need them go through the ``shipped`` fixture, which
skips cleanly when the folder is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
TINY_LAYERS = 2


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and results stay reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def _seeded(build, seed: int = 0, **overrides):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build(**overrides).eval()


@pytest.fixture
def tiny_dit():
    from tca_lightning.models.tiny import build_tiny_dit

    return _seeded(build_tiny_dit, num_layers=TINY_LAYERS)


@pytest.fixture
def tiny_pixart():
    from tca_lightning.models.tiny import build_tiny_pixart

    return _seeded(build_tiny_pixart, num_layers=TINY_LAYERS)


@pytest.fixture
def caption_encoder():
    from tca_lightning.models.captions import TinyCaptionEncoder
    from tca_lightning.models.tiny import TINY_PIXART_CONFIG

    return TinyCaptionEncoder(embed_dim=TINY_PIXART_CONFIG["caption_channels"])


@pytest.fixture
def dit_adapter(tiny_dit):
    from tca_lightning.models.adapters import get_adapter

    return get_adapter(tiny_dit)


@pytest.fixture
def pixart_adapter(tiny_pixart, caption_encoder):
    from tca_lightning.models.adapters import get_adapter

    return get_adapter(tiny_pixart, caption_encoder)


def shipped_folder(name: str) -> Path:
    from tca_lightning.models.loading import WEIGHTS

    return WEIGHTS / name


def shipped_available(name: str) -> bool:
    folder = shipped_folder(name)
    return (folder / "config.json").is_file() or (folder / "transformer" / "config.json").is_file()


@pytest.fixture
def shipped():
    """``shipped("tiny-dit")`` -> LoadedModel, or a clean skip while the weights do not exist yet."""
    from tca_lightning.models.loading import load_model

    def load(name: str):
        if not shipped_available(name):
            pytest.skip(f"shipped weights {shipped_folder(name)} are not there yet (being trained)")
        return load_model(name)

    return load


def _example_inputs(adapter, batch_size: int = 2):
    """A deterministic (x_t, t, condition) batch for either architecture; the last row is unconditional."""
    from tca_lightning.models.adapters import Condition

    g = torch.Generator().manual_seed(1234)
    size = adapter.config.sample_size
    x = torch.randn(batch_size, adapter.in_channels, size, size, generator=g)
    t = torch.linspace(999, 10, batch_size).long()
    if adapter.kind == "dit":
        labels = torch.arange(batch_size) % adapter.num_classes
        labels[-1] = adapter.num_classes  # the null label
        cond = Condition(labels=labels)
    else:
        captions = ["a thick handwritten seven", "a left-leaning handwritten two", "a handwritten zero"]
        captions = [captions[i % len(captions)] for i in range(batch_size)]
        captions[-1] = ""
        cond = adapter.encode_captions(captions)
    return x, t, cond


@pytest.fixture
def make_inputs():
    """``make_inputs(adapter, batch_size)`` -> a deterministic (x_t, t, condition) batch."""
    return _example_inputs


_ADAPTER_PARAMS = ["random-dit", "random-pixart", "shipped-dit", "shipped-pixart"]


@pytest.fixture(params=_ADAPTER_PARAMS)
def any_adapter(request):
    """Each adapter under test: the 2-layer random models always, the shipped ones when present."""
    from tca_lightning.models.adapters import get_adapter

    if request.param == "random-dit":
        return request.getfixturevalue("dit_adapter")
    if request.param == "random-pixart":
        return request.getfixturevalue("pixart_adapter")
    loaded = request.getfixturevalue("shipped")("tiny-" + request.param.split("-")[1])
    return get_adapter(loaded.transformer, loaded.caption_encoder)


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, timeout=..., extra_env=...)`` runs ``python -m tca_lightning`` from the repo root, one thread."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")

    def run(*args: str, timeout: float = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tca_lightning", *args], cwd=REPO_ROOT, env={**env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout)

    return run
