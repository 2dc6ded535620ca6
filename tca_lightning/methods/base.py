"""What every quantization method shares: the recipe (bits, granularity, per-role overrides),
swapping a model's linears for QuantLinears, and the method interface.

A method is a class with ``calibrate(adapter, qlinears, stats)``: it *sets* parts of the
QuantLinears (scales, rotations, weights) from calibration statistics. ``quantize_model``
runs wrap -> calibrate -> freeze; the YAML picks the class (``method.class_path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from tca_lightning.models.adapters import ROLES, DiffusionAdapter
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec

# DiT PTQ papers (PTQ4DiT, Q-DiT) keep the embedders and the final layer at 8 bits: so do we by default.
DEFAULT_ROLE_OVERRIDES = {"embedders": {"wbits": 8, "abits": 8}, "final": {"wbits": 8, "abits": 8}}


@dataclass(frozen=True)
class QuantRecipe:
    """Bits and granularity for every quantized linear, with per-role overrides."""

    wbits: int = 8
    """Weight bits (16 = keep FP)."""
    abits: int = 8
    """Activation bits (16 = keep FP)."""
    weight_granularity: str = "channel"
    """``channel`` (per output channel) or ``group``."""
    act_granularity: str = "token"
    """``token`` (dynamic per token), ``group`` (dynamic per token and group) or ``tensor``."""
    group_size: int = 64
    """Group size along the input dimension, shared by weights and activations."""
    act_symmetric: bool = False
    """Asymmetric activations by default (post-GELU and adaLN-modulated inputs are skewed)."""
    weight_scale_dtype: str = "float16"
    """Weight scales as the packed checkpoint stores them (FP16), so fake quant = the deployed model."""
    role_overrides: dict = field(default_factory=lambda: dict(DEFAULT_ROLE_OVERRIDES))
    """Per-role changes, e.g. {"embedders": {"wbits": 8, "abits": 8}, "adaln": {"abits": 16}, "final": {"skip": true}}."""

    def __post_init__(self):
        unknown = set(self.role_overrides) - set(ROLES)
        if unknown:
            raise ValueError(f"role_overrides has unknown roles {sorted(unknown)}; roles are {ROLES}")
        for role, override in self.role_overrides.items():
            bad = set(override) - {"wbits", "abits", "weight_granularity", "act_granularity", "group_size", "skip"}
            if bad:
                raise ValueError(f"role_overrides[{role!r}] has unknown keys {sorted(bad)}")
        self.specs("qkv")  # validates bits and granularities early

    def specs(self, role: str) -> tuple[QuantSpec, QuantSpec] | None:
        """(weight spec, activation spec) of a role, or None when the role stays in floating point."""
        o = self.role_overrides.get(role, {})
        if o.get("skip", False):
            return None
        wbits, abits = o.get("wbits", self.wbits), o.get("abits", self.abits)
        gs = o.get("group_size", self.group_size)
        w = QuantSpec(bits=wbits, symmetric=True, granularity=o.get("weight_granularity", self.weight_granularity),
                      group_size=gs, scale_dtype=self.weight_scale_dtype)
        a = QuantSpec(bits=abits, symmetric=self.act_symmetric,
                      granularity=o.get("act_granularity", self.act_granularity), group_size=gs)
        return w, a

    def with_bits(self, wbits: int, abits: int) -> "QuantRecipe":
        return replace(self, wbits=wbits, abits=abits)


def wrap_linears(adapter: DiffusionAdapter, recipe: QuantRecipe) -> dict[str, QuantLinear]:
    """Swap every quantizable linear for a QuantLinear (in place); returns them by qualified name."""
    wrapped = {}
    for ref in adapter.linears():
        specs = recipe.specs(ref.role)
        if specs is None:
            continue
        q = QuantLinear.from_float(ref.module, *specs, name=ref.name)
        q.role, q.block = ref.role, ref.block
        _set_submodule(adapter.transformer, ref.name, q)
        wrapped[ref.name] = q
    return wrapped


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def per_timestep_absmax(stats, name: str, in_features: int) -> torch.Tensor:
    """``stats.absmax[name]`` as a float (T, in_features) tensor, or a ValueError saying what is missing.

    Shared by every method that reads activation ranges.
    """
    if stats is None:
        raise ValueError("calibration statistics are missing: pass the LinearStats of "
                         "tca_lightning.data.calibration.collect_linear_stats to quantize()")
    absmax = getattr(stats, "absmax", None)
    if absmax is None or name not in absmax:
        raise ValueError(f"calibration statistics have no absmax for {name}: collect them with "
                         "collect_linear_stats(adapter, traj) over every quantizable linear (names=None)")
    a = absmax[name]
    if a.dim() != 2 or a.shape[1] != in_features:
        raise ValueError(f"absmax of {name} must have shape (timesteps, {in_features}), got {tuple(a.shape)}")
    if a.shape[0] < 1:
        raise ValueError(f"absmax of {name} has no timesteps")
    return a.float()


class QuantMethod:
    """Base: round-to-nearest of the recipe's specs, nothing calibrated. Subclasses set parts."""

    name = "rtn"
    needs_stats: tuple[str, ...] = ()  # which statistics calibrate() reads: "absmax", "hessian", "samples"

    def __init__(self, recipe: QuantRecipe = QuantRecipe()):
        self.recipe = recipe

    def calibrate(self, adapter: DiffusionAdapter, qlinears: dict[str, QuantLinear], stats) -> None:
        """Set transforms/weights of ``qlinears`` from calibration ``stats`` (none for RTN)."""

    @torch.no_grad()
    def quantize(self, adapter: DiffusionAdapter, stats=None) -> dict[str, QuantLinear]:
        qlinears = wrap_linears(adapter, self.recipe)
        if self.needs_stats and stats is None:
            raise ValueError(f"{type(self).__name__} needs calibration statistics {self.needs_stats}")
        self.calibrate(adapter, qlinears, stats)
        for q in qlinears.values():
            q.freeze()
        return qlinears
