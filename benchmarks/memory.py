"""Weight memory of the real DiT-XL/2 and PixArt-alpha 512 transformers: packed checkpoint vs FP16.

    python benchmarks/memory.py                      # both models: the repo's recipe, plus the variants below
    python benchmarks/memory.py --recipes tiny_dit   # the repo's recipe only

Random weights from the published configs (``random:dit-xl-2-256``, ``random:pixart-alpha-512`` of
tca_lightning.models.loading; nothing downloaded): byte counts do not depend on the values.
Packing is the Finalize callback's: each linear the recipe quantizes becomes
``QuantLinear.from_float`` (round to nearest on the recipe's grid) and then
``PackedLinear.from_quant_linear``, swapped into the transformer one layer at a time (what
``save_quantized`` stores). Counted: every tensor of the transformer's state_dict (what a checkpoint
holds), floating tensors at 2 bytes (FP16; the FP16 baseline is the same count for the unquantized
model), integer codes at their own size. DiT rows come in two layouts: diffusers' (each of the 28
blocks holds its own timestep/label embedder, equal copies in the converted checkpoints: 750M
parameters) and ``tied`` (one shared embedder as in the DiT paper, 675M;
``tca_lightning.models.tiny.tie_dit_embedders``). Recipes:

- ``tiny_dit``: configs/tiny_dit.yaml's (read from it): W4 per group of 32 with FP16 scales,
  embedders and final layer W8, adaLN modulation W4 like every block linear;
- ``g128``: the same with groups of 128 (not a repo recipe: what the 3.8x target costs in group size);
- ``g128-w4-all``: groups of 128 and the embedders/final layer at W4 too (not a repo recipe).

``--transforms tca`` also gives every quantized linear the fixed input transform a TCA-DiT checkpoint
stores (ARC's smoothing vector and Kronecker rotation factors in FP16, RGQ's int16 permutation where
activations are grouped; one per shared input, as save_quantized stores q/k/v's once), so the ratio is
that of what ``fit`` writes, not of bare RTN weights; ``dense_rotation_mb``
says what the same rotations would cost stored as k x k matrices (format 1, before they were kept factored).

Writes benchmarks/results/memory.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict

import torch
import yaml

from common import ROOT, machine, now, write_tables

from tca_lightning.quant.transforms import TRANSFORM_BUFFERS

MODELS = {"dit-xl-2-256": "random:dit-xl-2-256", "pixart-alpha-512": "random:pixart-alpha-512"}
COLUMNS = ("model", "embedders", "recipe", "transforms", "params_m", "quantized_linears", "linear_fp16_mb", "linear_packed_mb", "linear_ratio",
           "linear_bits_per_weight", "transformer_fp16_mb", "transformer_packed_mb", "transformer_ratio",
           "kept_fp16_mb", "transforms_mb", "dense_rotation_mb", "meets_3_8x", "seconds")
MB = 2**20


def repo_recipe():
    """configs/tiny_dit.yaml's recipe, as the QuantRecipe the fit uses."""
    from tca_lightning.methods import QuantRecipe

    config = yaml.safe_load((ROOT / "configs" / "tiny_dit.yaml").read_text())
    return QuantRecipe(**config["model"]["init_args"]["recipe"])


def recipes() -> dict:
    base = repo_recipe()
    g128 = dataclasses.replace(base, group_size=128)
    w4_all = dataclasses.replace(g128, role_overrides={})
    return {"tiny_dit": base, "g128": g128, "g128-w4-all": w4_all}


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes of one checkpoint tensor: floating point at FP16, integer codes at their own size."""
    return t.numel() * (2 if t.dtype.is_floating_point else t.element_size())


def state_bytes(module: torch.nn.Module) -> dict[str, int]:
    """{state_dict key: stored bytes}, each storage counted once (tied tensors). Input transforms count as
    save_quantized stores them: at their own dtype (FP16 after ARC.bake), each distinct one once
    (export.store_once: q, k and v share theirs)."""
    from tca_lightning.export import store_once

    out, seen, transforms = {}, set(), {}
    for key, t in module.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.numel() else None
        if ptr in seen:
            continue
        seen.add(ptr)
        if key.rpartition(".")[2] in TRANSFORM_BUFFERS:
            transforms[key] = t
        else:
            out[key] = stored_bytes(t)
    out.update({key: t.numel() * t.element_size() for key, t in store_once(transforms)[0].items()})
    return out


def owner_kind(module: torch.nn.Module, key: str) -> str:
    """'<owning module's class>.<tensor name>', e.g. PackedLinear.qweight, Embedding.weight."""
    parent, _, leaf = key.rpartition(".")
    return f"{type(module.get_submodule(parent) if parent else module).__name__}.{leaf}"


@torch.no_grad()
def pack_transformer(transformer: torch.nn.Module, recipe, transforms: str = "none") -> dict:
    """Swap every linear the recipe quantizes for its PackedLinear (in place); returns them by name.

    ``transforms="tca"``: each first gets TCA-DiT's stored input transform (random values: only how many
    distinct ones there are matters for bytes).
    """
    from tca_lightning.kernels.packed_linear import PackedLinear
    from tca_lightning.methods.base import _set_submodule
    from tca_lightning.models.adapters import get_adapter
    from tca_lightning.quant.linear import QuantLinear
    from tca_lightning.quant.transforms import fp16_values, kron_factors

    packed = {}
    adapter = get_adapter(transformer)
    group_of = {name: i for i, group in enumerate(adapter.shared_input_groups()) for name in group}
    made = {}  # one transform per shared input (q/k/v), as ARC learns and RGQ orders them

    def tca_transform(name: str, k: int, grouped: bool) -> dict:
        key = group_of.get(name, name)
        if key not in made:  # distinct values per input, FP16-rounded like ARC.bake's
            made[key] = {"smooth": fp16_values(torch.rand(k) + 0.5),
                         "rotation": tuple(fp16_values(torch.linalg.qr(torch.randn(n, n))[0]) for n in kron_factors(k)),
                         "perm": torch.randperm(k) if grouped else None}
        return made[key]

    for ref in adapter.linears():
        specs = recipe.specs(ref.role)
        if specs is None:
            continue
        q = QuantLinear.from_float(ref.module, *specs, name=ref.name)
        q.role = ref.role
        if transforms == "tca":
            grouped = q.act_spec.enabled and q.act_spec.granularity == "group"
            q.set_transform(**tca_transform(ref.name, q.in_features, grouped))
        packed[ref.name] = PackedLinear.from_quant_linear(q)
        _set_submodule(transformer, ref.name, packed[ref.name])
    return packed


def measure(model: str, recipe_name: str, recipe, tied: bool = False, seed: int = 0, transforms: str = "none") -> dict:
    from tca_lightning.export import memory_summary
    from tca_lightning.models.loading import load_model
    from tca_lightning.models.tiny import tie_dit_embedders

    start = time.perf_counter()
    transformer = load_model(MODELS[model], seed=seed).transformer
    if tied:
        tie_dit_embedders(transformer)
    params = sum(p.numel() for p in transformer.parameters())
    fp16 = sum(state_bytes(transformer).values())
    packed = pack_transformer(transformer, recipe, transforms)
    sizes = state_bytes(transformer)
    kinds = defaultdict(int)
    for key, n in sizes.items():
        kinds[owner_kind(transformer, key)] += n
    linear_packed = sum(p.weight_nbytes() for p in packed.values())
    linear_weights = sum(p.in_features * p.out_features for p in packed.values())
    total = sum(sizes.values())
    transform_keys = tuple(f"PackedLinear.{t}" for t in TRANSFORM_BUFFERS)
    kept = {k: v for k, v in kinds.items() if k not in ("PackedLinear.qweight", "PackedLinear.weight_scale")
            and k not in transform_keys}
    dense_rotations = sum(2 * p.in_features ** 2 for p in packed.values()) if transforms == "tca" else 0
    layout = "tied" if tied else ("per block" if model.startswith("dit") else "shared (adaLN-single)")
    return {"model": model, "embedders": layout, "recipe": recipe_name, "transforms": transforms, "params_m": params / 1e6, "quantized_linears": len(packed),
            "linear_fp16_mb": 2 * linear_weights / MB, "linear_packed_mb": linear_packed / MB,
            "linear_ratio": 2 * linear_weights / linear_packed, "linear_bits_per_weight": 8 * linear_packed / linear_weights,
            "transformer_fp16_mb": fp16 / MB, "transformer_packed_mb": total / MB, "transformer_ratio": fp16 / total,
            "kept_fp16_mb": sum(kept.values()) / MB,
            "transforms_mb": sum(v for k, v in kinds.items() if k in transform_keys) / MB,
            "dense_rotation_mb": dense_rotations / MB, "meets_3_8x": fp16 / total >= 3.8,
            "seconds": round(time.perf_counter() - start, 1),
            "kept_fp16_by_kind_mb": {k: round(v / MB, 3) for k, v in sorted(kept.items(), key=lambda kv: -kv[1])},
            "by_weight_bits": memory_summary(packed.values()), "recipe_config": dataclasses.asdict(recipe)}


def main() -> None:
    choices = recipes()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(choices), choices=list(choices))
    parser.add_argument("--transforms", nargs="+", default=["none", "tca"], choices=["none", "tca"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = {"date": now(), "machine": machine(args.threads),
              "invocation": "python benchmarks/memory.py " + " ".join(sys.argv[1:])}
    rows = []
    for model in args.models:
        for tied, name, transforms in [(t, n, x) for t in ((False, True) if model.startswith("dit") else (False,))
                                       for n in args.recipes for x in args.transforms]:
            row = measure(model, name, choices[name], tied, transforms=transforms)
            row["command"] = f"python benchmarks/memory.py --models {model} --recipes {name} --transforms {transforms}"
            rows.append(row)
            print(f"{model} {row['embedders']} {name}: transformer {row['transformer_fp16_mb']:.0f} -> {row['transformer_packed_mb']:.0f} MB "
                  f"({row['transformer_ratio']:.3f}x), quantized linears {row['linear_ratio']:.3f}x; kept FP16 "
                  f"{row['kept_fp16_mb']:.1f} MB: {row['kept_fp16_by_kind_mb']}", flush=True)
    notes = ["random weights from the published configs (no download); counted: every state_dict tensor, floating "
             "point at 2 bytes (FP16), integer codes at their size; the FP16 column is the unquantized transformer",
             "packing: QuantLinear.from_float (RTN) -> PackedLinear.from_quant_linear per linear, as Finalize/save_quantized",
             "tiny_dit = configs/tiny_dit.yaml's recipe (W4 per group of 32, FP16 scales; embedders and final layer W8, "
             "adaLN W4); g128 and g128-w4-all are not repo recipes: they show what the 3.8x target takes",
             "kept FP16 (per row, by owning module, in memory.json): everything that is not a quantized linear's "
             "codes or scales: quantized linears' biases, label-embedding tables, the patch-embed conv, "
             "positional embeddings, scale-shift tables",
             "transforms tca: each quantized linear also stores TCA-DiT's smoothing vector, Kronecker rotation "
             "factors and (grouped activations) RGQ permutation, as fit's checkpoint (format 3) does: FP16 "
             "smoothing and rotation factors (ARC.bake rounds them; the weight fold is exact for the rounded "
             "factors), int16 permutations, each distinct tensor once (q/k/v share one input's); "
             "dense_rotation_mb: the same rotations as k x k FP16 matrices per layer (format 1, in FP32 even)",
             "DiT embedders 'per block': diffusers' layout (28 equal timestep/label embedders, what a converted "
             "checkpoint and save_quantized store); 'tied': one shared embedder, as the DiT paper's model"]
    print(write_tables("memory", "Weight memory: packed checkpoint vs FP16 (DiT-XL/2, PixArt-alpha 512)", header,
                       merged_with_earlier(rows), COLUMNS, notes))


def merged_with_earlier(rows: list[dict]) -> list[dict]:
    """This invocation's rows plus the committed table's rows it did not remeasure (byte counts are
    deterministic: a row is (model, embedder layout, recipe, transforms)); each keeps its own command."""
    import json

    from common import RESULTS

    key = lambda r: (r["model"], r["embedders"], r["recipe"], r.get("transforms", "none"))  # noqa: E731
    earlier = RESULTS / "memory.json"
    old = json.loads(earlier.read_text()).get("rows", []) if earlier.is_file() else []
    have = {key(r) for r in rows}
    kept = [{**r, "transforms": r.get("transforms", "none")} for r in old if key(r) not in have]
    order = {name: i for i, name in enumerate(recipes())}
    return sorted(kept + rows, key=lambda r: (r["model"], r["embedders"], order.get(r["recipe"], 99),
                                              r.get("transforms", "none")))


if __name__ == "__main__":
    main()
