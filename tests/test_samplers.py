"""CFG sampling: per-sample reproducibility, configuration checks, schedulers, decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from tca_lightning.models.adapters import Condition
from tca_lightning.models.samplers import (
    SCHEDULERS,
    TRAIN_SCHEDULE,
    SamplerConfig,
    decode,
    initial_noise,
    make_scheduler,
    sample,
    sample_generators,
)

STEPS = 4
SCHEDULER_NAMES = ["ddim", "ddpm", "dpm-solver"]


def labels(*values) -> Condition:
    return Condition(labels=torch.tensor(values))


def close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(scheduler="euler"), "scheduler"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=-3), "num_steps"),
    (dict(guidance_scale=0.5), "guidance_scale"),
])
def test_sampler_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**kwargs)


def test_sampler_config_defaults_are_valid():
    config = SamplerConfig()
    assert config.scheduler in SCHEDULERS and config.num_steps >= 1 and config.guidance_scale >= 1.0
    SamplerConfig(guidance_scale=1.0, num_steps=1)  # the boundaries are allowed


@pytest.mark.parametrize("name, cls", [("ddim", DDIMScheduler), ("ddpm", DDPMScheduler),
                                       ("dpm-solver", DPMSolverMultistepScheduler)])
def test_make_scheduler(name, cls):
    scheduler = make_scheduler(SamplerConfig(scheduler=name, num_steps=7))
    assert type(scheduler) is cls
    assert len(scheduler.timesteps) == 7
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"
    assert scheduler.config.beta_start == TRAIN_SCHEDULE["beta_start"]
    assert list(scheduler.timesteps) == sorted(scheduler.timesteps, reverse=True)
    if name in ("ddim", "ddpm"):
        assert scheduler.config.clip_sample is False


def test_make_scheduler_variance_and_overrides():
    learned = make_scheduler(SamplerConfig(scheduler="ddpm", num_steps=5), learned_sigma=True)
    fixed = make_scheduler(SamplerConfig(scheduler="ddpm", num_steps=5), learned_sigma=False)
    assert learned.config.variance_type == "learned_range" and fixed.config.variance_type == "fixed_small"
    # the model's own training schedule wins over the default; unrelated keys are ignored
    scheduler = make_scheduler(SamplerConfig(), {"beta_end": 0.012, "prediction_type": "v_prediction"})
    assert scheduler.config.beta_end == 0.012 and scheduler.config.prediction_type == "epsilon"


def test_sample_generators_follow_the_documented_seed():
    gens = sample_generators(3, [0, 5])
    assert [g.initial_seed() for g in gens] == [3 * 1_000_003, 3 * 1_000_003 + 5]
    assert [g.initial_seed() for g in sample_generators(0, torch.tensor([2, 7]))] == [2, 7]


def test_initial_noise_is_per_sample(dit_adapter):
    noise = initial_noise(dit_adapter, sample_generators(0, [4, 9]))
    assert noise.shape == (2, 1, 32, 32)
    alone = initial_noise(dit_adapter, sample_generators(0, [9]))
    assert torch.equal(noise[1], alone[0])


# --- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_same_seed_and_index_same_sample_whatever_the_batch(dit_adapter, scheduler):
    config = SamplerConfig(scheduler=scheduler, num_steps=STEPS, guidance_scale=1.5, seed=7)
    full = sample(dit_adapter, labels(0, 1, 2, 3), [0, 1, 2, 3], config)
    part = sample(dit_adapter, labels(2, 3), [2, 3], config)
    assert full.shape == (4, 1, 32, 32) and torch.isfinite(full).all()
    assert close(full[2:], part)
    reordered = sample(dit_adapter, labels(3, 0), [3, 0], config)
    assert close(reordered[0], full[3]) and close(reordered[1], full[0])
    again = sample(dit_adapter, labels(0, 1, 2, 3), torch.tensor([0, 1, 2, 3]), config)
    assert torch.equal(full, again), "same call, same result (tensor or list indices)"


def test_pixart_sampling_is_batch_invariant(pixart_adapter):
    config = SamplerConfig(scheduler="dpm-solver", num_steps=STEPS, guidance_scale=2.0, seed=0)
    captions = ["a handwritten one", "a thick handwritten two", "a upright handwritten three"]
    full = sample(pixart_adapter, pixart_adapter.encode_captions(captions), [0, 1, 2], config)
    part = sample(pixart_adapter, pixart_adapter.encode_captions(captions[1:]), [1, 2], config)
    assert close(full[1:], part)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_different_seeds_differ(dit_adapter, scheduler):
    a = sample(dit_adapter, labels(1, 2), [0, 1], SamplerConfig(scheduler=scheduler, num_steps=STEPS, seed=0))
    b = sample(dit_adapter, labels(1, 2), [0, 1], SamplerConfig(scheduler=scheduler, num_steps=STEPS, seed=1))
    assert not close(a[0], b[0]) and not close(a[1], b[1])


def test_different_indices_differ(dit_adapter):
    config = SamplerConfig(num_steps=STEPS)
    out = sample(dit_adapter, labels(1, 1), [0, 1], config)
    assert not close(out[0], out[1])


@pytest.mark.parametrize("adapter_name", ["dit_adapter", "pixart_adapter"])
def test_guidance_changes_samples(request, adapter_name):
    adapter = request.getfixturevalue(adapter_name)
    cond = labels(3, 8) if adapter.kind == "dit" else adapter.encode_captions(["a handwritten three", "a handwritten eight"])
    plain = sample(adapter, cond, [0, 1], SamplerConfig(num_steps=STEPS, guidance_scale=1.0))
    guided = sample(adapter, cond, [0, 1], SamplerConfig(num_steps=STEPS, guidance_scale=2.0))
    assert not close(plain, guided)


def test_guidance_one_makes_one_forward_per_step(dit_adapter, monkeypatch):
    batch_sizes = []
    forward = dit_adapter.forward

    def spy(x, t, cond):
        batch_sizes.append(len(x))
        return forward(x, t, cond)

    monkeypatch.setattr(dit_adapter, "forward", spy)
    sample(dit_adapter, labels(1, 2), [0, 1], SamplerConfig(num_steps=3, guidance_scale=1.0))
    assert batch_sizes == [2, 2, 2]
    batch_sizes.clear()
    sample(dit_adapter, labels(1, 2), [0, 1], SamplerConfig(num_steps=3, guidance_scale=1.5))
    assert batch_sizes == [4, 4, 4]  # conditional and unconditional halves in one call


def test_sampling_leaves_the_global_rng_alone(dit_adapter):
    state = torch.random.get_rng_state()
    sample(dit_adapter, labels(1, 2), [0, 1], SamplerConfig(scheduler="ddpm", num_steps=STEPS))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_condition_and_index_counts_must_match(dit_adapter):
    with pytest.raises(ValueError, match="3 conditions for 2 sample indices"):
        sample(dit_adapter, labels(1, 2, 3), [0, 1], SamplerConfig(num_steps=STEPS))


def test_on_step_sees_every_x_t(dit_adapter):
    config = SamplerConfig(scheduler="ddim", num_steps=5)
    seen = []
    out = sample(dit_adapter, labels(2, 5), [3, 4], config,
                 on_step=lambda step, t, x: seen.append((step, int(t), x.clone())))
    assert [s for s, _, _ in seen] == list(range(5))
    assert [t for _, t, _ in seen] == [int(t) for t in make_scheduler(config).timesteps]
    first = initial_noise(dit_adapter, sample_generators(config.seed, [3, 4]))
    assert torch.equal(seen[0][2], first)  # DDIM's init_noise_sigma is 1
    assert not torch.equal(seen[-1][2], out)


# --- decoding ------------------------------------------------------------------------------------

def test_decode_maps_pixels_to_unit_range():
    x0 = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, -3.0, 3.0]).view(1, 1, 1, 7)
    expected = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 1.0]).view(1, 1, 1, 7)
    assert torch.equal(decode(x0), expected)


def test_decode_through_a_vae():
    calls = []

    class StubVAE:
        dtype = torch.float32
        config = SimpleNamespace(scaling_factor=0.5)

        def decode(self, z):
            calls.append(z.clone())
            return SimpleNamespace(sample=z)  # the identity "decoder"

    latents = torch.tensor([0.25, -0.25]).view(1, 1, 1, 2)
    out = decode(latents, StubVAE())
    assert torch.equal(calls[0], latents / 0.5)
    assert torch.equal(out, torch.tensor([0.75, 0.25]).view(1, 1, 1, 2))
