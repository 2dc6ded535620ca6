"""ARC (issue 4, in progress): fits on ATG items, keeps rotations orthogonal, folds exactly."""

import dataclasses

import lightning as L
import pytest
import torch

from tca_lightning.arc import ARC, ARCConfig
from tca_lightning.data.atg_datamodule import ATGDataModule
from tca_lightning.data.calibration import CalibrationConfig
from tca_lightning.methods.base import QuantRecipe
from tca_lightning.models.adapters import Condition, get_adapter
from tca_lightning.models.samplers import SamplerConfig

RECIPE = QuantRecipe(wbits=4, abits=4, weight_granularity="group", act_granularity="group", group_size=32)


def _module(tmp_path, **arc):
    return ARC(model="random:tiny-dit", recipe=RECIPE, arc=ARCConfig(**arc), sampler=SamplerConfig(num_steps=4),
               reference_cache=None, calibration=CalibrationConfig(num_conditions=4, num_steps=4, cache_dir=str(tmp_path)))


def _fit(tmp_path, epochs=2, module=None, callbacks=(), ckpt_path=None, checkpoint_dir=None, **arc):
    module = module or _module(tmp_path, **arc)
    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(checkpoint_dir, save_top_k=-1, every_n_epochs=1)] if checkpoint_dir else []
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=bool(checkpoints),
                        default_root_dir=tmp_path, enable_progress_bar=False, log_every_n_steps=1,
                        callbacks=[*checkpoints, *callbacks], enable_model_summary=False)
    trainer.fit(module, ATGDataModule(k=2, calib_batch_size=4), ckpt_path=ckpt_path)
    return module, trainer


class LossLog(L.Callback):
    def __init__(self):
        self.recon = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.recon.append(float(trainer.callback_metrics["train/recon"]))


def test_fit_moves_the_transforms_and_keeps_rotations_orthogonal(tmp_path):
    module, trainer = _fit(tmp_path)
    assert module.transforms and all(t.orthogonality_error() <= 1e-5 for t in module.transforms.values())
    first = next(iter(module.transforms.values()))
    assert not torch.allclose(first.log_scale, torch.zeros_like(first.log_scale))
    assert {"train/recon", "train/align", "recon/block0"} <= set(trainer.callback_metrics)
    assert module._quant_record["max_orthogonality_error"] <= 1e-5


def test_calibrated_transforms_are_exact_when_quantization_is_off(tmp_path):
    module, _ = _fit(tmp_path, epochs=1)
    for q in module.qlinears.values():
        q.set_specs(dataclasses.replace(q.weight_spec, bits=16), dataclasses.replace(q.act_spec, bits=16))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor(500)
    cond = Condition(labels=torch.tensor([1, 2]))
    fp = module.reference_model(x, timestep=t.expand(2), class_labels=cond.labels).sample
    out = module.adapter.forward(x, t, cond)
    assert ((out - fp).abs().max() / fp.abs().max()) <= 1e-5


def test_reconstruction_loss_decreases(tmp_path):
    log = LossLog()
    _fit(tmp_path, epochs=6, callbacks=[log], lr=2e-2)
    per_epoch = torch.tensor(log.recon).view(6, -1).mean(1)  # 8 items in batches of 4: 2 steps per epoch
    assert (per_epoch.diff() < 0).sum() >= 4 and per_epoch[-1] < 0.97 * per_epoch[0], per_epoch


def test_resume_from_a_mid_fit_checkpoint_continues_the_same_run(tmp_path):
    straight, _ = _fit(tmp_path / "a", epochs=2)
    _fit(tmp_path / "b", epochs=1, checkpoint_dir=tmp_path / "ckpt")
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed, trainer = _fit(tmp_path / "b", epochs=2, module=_module(tmp_path / "b"), ckpt_path=str(ckpt))
    assert trainer.global_step == 4  # 2 steps per epoch, the first epoch's from the checkpoint
    a, b = straight.transforms.state_dict(), resumed.transforms.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_fit_refuses_a_baseline_quantization(tmp_path):
    from tca_lightning.methods import RTN

    module = _module(tmp_path)
    module.quantization = RTN(RECIPE)
    with pytest.raises(ValueError, match="evaluate baselines with `test`"):
        _fit(tmp_path, epochs=1, module=module)


def test_an_uncalibrated_module_evaluates_the_fp_model(tmp_path):
    module = _module(tmp_path)
    assert not module.is_quantized and not module.compares_to_reference
    assert module.record_overrides() == {}
    _fit(tmp_path, epochs=1, module=module)
    assert module.is_quantized and module.record_overrides()["method"] == "tca-dit"


def test_bake_turns_learned_transforms_into_exact_fixed_buffers(tmp_path):
    module, _ = _fit(tmp_path, epochs=1)
    for q in module.qlinears.values():
        q.set_specs(dataclasses.replace(q.weight_spec, bits=16), dataclasses.replace(q.act_spec, bits=16))
    x, t, cond = torch.randn(2, 1, 32, 32), torch.tensor(500), Condition(labels=torch.tensor([1, 2]))
    fp = module.reference_model(x, timestep=t.expand(2), class_labels=cond.labels).sample
    module.bake()
    baked = [q for q in module.qlinears.values() if q.input_rotation is not None]
    assert baked and all(q.transform is None and q.smooth is not None for q in baked)
    # the rotation stays Kronecker-factored (small to store, k (a + b) per token online), never densified
    assert all(q.rotation is None and isinstance(q.input_rotation, tuple) for q in baked)
    # FP16 values (stored in FP16 by the packed checkpoint), which the fold keeps exact
    assert all(torch.equal(f, f.half().float()) for q in baked for f in (q.smooth, *q.input_rotation))
    out = module.adapter.forward(x, t, cond)
    assert ((out - fp).abs().max() / fp.abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="already has a fixed"):
        q = baked[0]
        q.transform = next(iter(module.transforms.values()))
        module.bake()


def test_scale_init_picks_smoothquant_or_ones_and_rejects_anything_else(tmp_path):
    from tca_lightning.data.calibration import LinearStats

    module = _module(tmp_path, scale_init="ones")
    names = [r.name for r in module.adapter.linears()]
    stats = LinearStats(torch.arange(3), absmax={n: torch.rand(3, r.module.in_features) * 10 + 1
                                                 for n, r in zip(names, module.adapter.linears())})
    module.build(stats)
    assert all(torch.equal(t.log_scale, torch.zeros_like(t.log_scale)) for t in module.transforms.values())
    smooth = _module(tmp_path, scale_init="smoothquant")
    smooth.build(stats)
    assert not any(torch.equal(t.log_scale, torch.zeros_like(t.log_scale)) for t in smooth.transforms.values())
    with pytest.raises(ValueError, match="scale_init must be 'smoothquant' or 'ones'"):
        ARCConfig(scale_init="unit")


def test_learning_against_fp_weights_quantizes_them_at_bake(tmp_path):
    usual = _module(tmp_path)
    usual.build(None)
    module = _module(tmp_path, fake_quant_weights=False)
    module.build(None)
    inside = [n for n, q in module.qlinears.items() if q.block is not None]
    assert inside and all(not module.qlinears[n].weight_spec.enabled for n in inside)
    assert all(q.weight_spec == usual.qlinears[n].weight_spec  # no block loss sees them: quantized throughout
               for n, q in module.qlinears.items() if q.block is None)
    module.bake()
    assert all(q.weight_spec == usual.qlinears[n].weight_spec for n, q in module.qlinears.items())


def test_gradient_checkpointing_learns_the_same_transforms(tmp_path):
    """checkpoint_blocks recomputes the blocks in backward: the same losses and gradients, so the same fit."""
    start = _module(tmp_path).transforms  # built lazily: compare the two fits with each other and with no fit
    plain, _ = _fit(tmp_path / "plain", epochs=1)
    recomputed, _ = _fit(tmp_path / "ckpt", epochs=1, checkpoint_blocks=True)
    a, b = plain.transforms.state_dict(), recomputed.transforms.state_dict()
    assert a.keys() == b.keys() and a and not start
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "log_scale" in k), "the fit moved the scales"


def test_guided_error_is_the_relative_error_of_the_guided_update():
    block_in, target = torch.zeros(4, 3, 2), torch.zeros(4, 3, 2)
    target[:2] = 1.0  # rows [conditional; unconditional]: the conditional update is 1, the unconditional 0
    weight = torch.ones(2)
    assert float(ARC._guided_error(target.clone(), target, block_in, 3.0, weight)) == 0.0
    same = target + 0.1  # one error in both halves: (1 - g) u + g c keeps it at 0.1, vs the guided update 3
    assert float(ARC._guided_error(same, target, block_in, 3.0, weight)) == pytest.approx(0.01 / 9, rel=1e-5)
    opposite = target.clone()
    opposite[:2] += 0.1
    opposite[2:] -= 0.1  # opposite errors: amplified to (1 - g)(-0.1) + g (0.1) = 0.5
    assert float(ARC._guided_error(opposite, target, block_in, 3.0, weight)) == pytest.approx(0.25 / 9, rel=1e-5)


@pytest.mark.parametrize("term", ["guided", "output"])
def test_an_optional_term_joins_the_loss_when_enabled(tmp_path, term):
    _, trainer = _fit(tmp_path, epochs=1, **{f"lambda_{term}": 1.0})
    metrics = trainer.callback_metrics
    assert f"train/{term}" in metrics and float(metrics[f"train/{term}"]) > 0
    expected = metrics["train/recon"] + 0.01 * metrics["train/align"] + metrics[f"train/{term}"]
    assert torch.allclose(metrics["train/loss"], expected, rtol=1e-5)


def test_output_error_is_the_relative_error_of_the_guided_noise_prediction():
    target = torch.zeros(4, 2, 1, 1)  # rows [conditional; unconditional], channels [eps, learned variance]
    target[:2, 0], target[2:, 0] = 1.0, 0.5  # guided eps at g = 3: 0.5 + 3 (1 - 0.5) = 2
    weight = torch.ones(2)
    out = target.clone()
    out[:, 1] += 5.0  # the learned variance is not what the sampler guides: no error
    assert float(ARC._output_error(out, target, 1, 3.0, weight)) == 0.0
    out[:2, 0] += 0.1  # a conditional error of 0.1 becomes 0.3 in the guided prediction of norm 2
    assert float(ARC._output_error(out, target, 1, 3.0, weight)) == pytest.approx(0.09 / 4, rel=1e-5)
    assert float(ARC._output_error(out[:2], target[:2], 1, 1.0, weight)) == pytest.approx(0.01 / 1, rel=1e-5)


def test_finalize_adds_a_lowrank_branch_to_the_chosen_roles_only(tmp_path):
    from tca_lightning.callbacks import Finalize
    from tca_lightning.methods.svdquant import lowrank_rank

    module, _ = _fit(tmp_path, epochs=1,
                     callbacks=[Finalize(lowrank_rank=32, lowrank_roles=["fc1"], pack=False, save=False)])
    assert module.finalized
    fc1 = [q for q in module.qlinears.values() if q.role == "fc1"]
    assert fc1 and all(q.lowrank_a.shape[1] == lowrank_rank(32, q.in_features, q.out_features) for q in fc1)
    assert all(q.lowrank_a is None for q in module.qlinears.values() if q.role != "fc1")
    with pytest.raises(ValueError, match=r"lowrank_roles \['fc3'\] match no quantized linear"):
        Finalize().add_lowrank(module.qlinears, 32, ["fc3"])


def test_finalize_rejects_a_negative_rank():
    from tca_lightning.callbacks import Finalize

    with pytest.raises(ValueError, match="lowrank_rank must be >= 0"):
        Finalize(lowrank_rank=-1, pack=False)


def test_finalize_debiases_the_gelus_and_both_checkpoints_keep_them_and_the_lowrank_branch(tmp_path):
    from tca_lightning.callbacks import Finalize
    from tca_lightning.export import load_quantized, save_quantized
    from tca_lightning.quant.debias import DebiasedGELU

    module, trainer = _fit(tmp_path, epochs=1, callbacks=[Finalize(debias_gelu=True, lowrank_rank=32, lowrank_roles=["fc1"],
                                                                   pack=False, save=False)])
    debiased = {n: m for n, m in module.transformer.named_modules() if isinstance(m, DebiasedGELU)}
    fc1 = {n.rpartition(".")[0] for n, q in module.qlinears.items() if q.role == "fc1"}
    assert set(debiased) == fc1 and all(float(m.noise_var.min()) > 0 for m in debiased.values())
    assert module._quant_record["debias_gelu"] is True
    x, t, cond = torch.randn(2, 1, 32, 32), torch.tensor(500), Condition(labels=torch.tensor([1, 2]))
    with torch.no_grad():
        out = module.adapter.forward(x, t, cond)
        trainer.save_checkpoint(tmp_path / "finalized.ckpt")
        reloaded = ARC.load_from_checkpoint(tmp_path / "finalized.ckpt", map_location="cpu")
        for q in reloaded.qlinears.values():
            q.freeze()
        torch.testing.assert_close(reloaded.adapter.forward(x, t, cond), out)
        save_quantized(module, tmp_path / "quantized", RECIPE, "random:tiny-dit", method="tca-dit")
        packed = load_quantized(tmp_path / "quantized")
        loaded = {n: m for n, m in packed.named_modules() if isinstance(m, DebiasedGELU)}
        assert set(loaded) == fc1
        assert all(torch.equal(loaded[n].noise_var, debiased[n].noise_var) for n in fc1)
        assert all(loaded[n].proj.lowrank_a.dtype == torch.float16 for n in fc1)  # the FP16 branch packs as is
        packed_out = get_adapter(packed).forward(x, t, cond)
        # Kronecker rotations: summation-order ulps flip a few 4-bit codes (test_packed_checkpoint's bound)
        assert float((packed_out - out).norm() / out.norm()) < 5e-2


def test_arc_learns_with_the_lowrank_branch_and_finalize_deploys_it(tmp_path):
    from tca_lightning.callbacks import Finalize
    from tca_lightning.methods.svdquant import lowrank_rank, svd_lowrank
    from tca_lightning.quant.transforms import fold_input_transform

    seen = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.update({n: q.lowrank_a is not None for n, q in module.qlinears.items()})

    module, _ = _fit(tmp_path, epochs=1, lowrank_rank=32, lowrank_roles=("fc1",),
                     callbacks=[Spy(), Finalize(pack=False, save=False)])
    assert seen and all(v == (module.qlinears[n].role == "fc1") for n, v in seen.items())  # live during ARC
    fc1 = [q for q in module.qlinears.values() if q.role == "fc1"]
    assert module.finalized and module._quant_record["lowrank_rank"] == 32  # Finalize took ARC's branch
    assert all(q.lowrank_a.shape[1] == lowrank_rank(32, q.in_features, q.out_features) for q in fc1)
    assert all(q.lowrank_a is None for q in module.qlinears.values() if q.role != "fc1")
    # after RGQ the branch is the SVD of the baked, permuted weight (FP16-rounded factors)
    # the deployed branch is the SVD of the FP weight in the baked, RGQ-permuted basis (FP16-rounded factors)
    name, q = next((n, q) for n, q in module.qlinears.items() if q.role == "fc1")
    fp_weight = module.teacher.transformer.get_submodule(name).weight
    a, b = svd_lowrank(fold_input_transform(fp_weight, q.smooth, q.input_rotation, q.perm),
                       lowrank_rank(32, q.in_features, q.out_features))
    assert q.perm is not None
    torch.testing.assert_close(q.lowrank_a @ q.lowrank_b, a @ b, rtol=0, atol=2e-3 * float((a @ b).abs().max()))


def test_arc_rejects_a_negative_lowrank_rank():
    with pytest.raises(ValueError, match="arc.lowrank_rank must be >= 0"):
        ARCConfig(lowrank_rank=-1)


def test_finalize_weights_steps_by_the_output_error_it_measures(tmp_path):
    from tca_lightning.callbacks import Finalize
    from tca_lightning.callbacks.finalize import error_weighted, statistics_steps
    from tca_lightning.data.calibration import output_error_per_step

    with pytest.raises(ValueError, match="step_weighting must be 'share' or 'output_error'"):
        Finalize(step_weighting="late")
    module, trainer = _fit(tmp_path, epochs=1, callbacks=[Finalize(stats_steps="all", step_weighting="output_error",
                                                                   pack=False, save=False)])
    traj, _ = statistics_steps(trainer.datamodule, "all")
    error = output_error_per_step(module.adapter, module.teacher, traj, batch_size=8)
    assert error.shape == (traj.num_steps,) and (error > 0).all()
    assert output_error_per_step(module.teacher, module.teacher, traj, batch_size=8).abs().max() == 0  # FP vs FP
    weights = error_weighted(module, traj, None, batch_size=8)
    torch.testing.assert_close(weights, error / error.sum())  # equal shares: proportional to the error
    shares = torch.linspace(1, 2, traj.num_steps)
    torch.testing.assert_close(error_weighted(module, traj, shares, 8), shares * error / (shares * error).sum())
    recorded = module._quant_record["stats_step_weights"]
    assert len(recorded) == traj.num_steps and abs(sum(recorded) - 1) < 1e-3 and max(recorded) > 1.2 / traj.num_steps


def test_finalize_can_read_statistics_at_every_step(tmp_path):
    from tca_lightning.callbacks import Finalize
    from tca_lightning.callbacks.finalize import statistics_steps

    with pytest.raises(ValueError, match="stats_steps must be 'representatives' or 'all'"):
        Finalize(stats_steps="some")
    module, trainer = _fit(tmp_path, epochs=1, callbacks=[Finalize(stats_steps="all", pack=False, save=False)])
    dm = trainer.datamodule
    every, weights = statistics_steps(dm, "all")
    some, group_weights = statistics_steps(dm, "representatives")
    assert module.finalized and every.num_steps == dm.traj.num_steps > some.num_steps == len(group_weights)
    assert weights is None and all(q.perm is not None for q in module.qlinears.values()
                                   if q.act_spec.enabled and q.act_spec.granularity == "group")
