"""ARC's learnable transforms: exact folds, orthogonality kept by the parametrization through training."""

import pytest
import torch

from tca_lightning.quant.learnable import KronTransform
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec


@pytest.mark.parametrize("rotate, scale", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dim", [64, 256, 1152])
def test_fold_is_exact_and_starts_orthogonal(dim, rotate, scale):
    torch.manual_seed(0)
    t = KronTransform(dim, rotate=rotate, scale=scale, init_scale=torch.rand(dim) + 0.5)
    x, w = torch.randn(4, dim, dtype=torch.float32), torch.randn(8, dim)
    y = t(x) @ t.fold_weight(w).t()
    assert ((y - x @ w.t()).abs().max() / (x @ w.t()).abs().max()) <= 1e-5
    assert t.orthogonality_error() <= 1e-5


def test_rotation_stays_orthogonal_and_loss_falls_while_training_under_quantization():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(256, 64)
    x[:, [3, 17]] *= 30  # outlier channels make 4-bit activations hard
    q = QuantLinear.from_float(linear, QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=4, granularity="token"))
    q.set_learnable_transform(KronTransform(64, init="identity"))
    ref = linear(x).detach()
    opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(60):
        loss = (q(x) - ref).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert q.transform.orthogonality_error() <= 1e-5
    assert not torch.allclose(q.transform.rotation_matrix(), torch.eye(64), atol=1e-3)  # it did move


def test_only_transform_and_clip_parameters_are_trainable():
    q = QuantLinear.from_float(torch.nn.Linear(64, 8), QuantSpec(bits=4), QuantSpec(bits=4, granularity="token"))
    q.set_learnable_transform(KronTransform(64))
    names = {n for n, p in q.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("transform.") for n in names)


def test_bad_init_is_rejected():
    with pytest.raises(ValueError, match="rotation init"):
        KronTransform(64, init="random")
    with pytest.raises(ValueError, match="init_scale must have shape"):
        KronTransform(64, init_scale=torch.ones(32))
