"""CPU latency of the integer paths at DiT-XL/2's linear shapes and for one DiT-XL/2 forward, vs FP32 and BF16.

    python benchmarks/cpu_latency.py            # M = 512, 2048, 8192 and the full forward (~10-15 min, 2 threads)
    python benchmarks/cpu_latency.py --quick    # M = 512 and the full forward
    python benchmarks/cpu_latency.py --rows 512 2048 --threads 1   # other M values / thread counts

Run it on an otherwise idle machine: with the cores oversubscribed, the 2-thread oneDNN and group
paths slowed 5-12x (OpenMP threads waiting on a descheduled peer), FP32 1.3-3.6x, e.g.
attn_out M = 512 oneDNN W8A8 11.8 -> 144 ms. Each row records the load average (``load_1m``).

Layers (hidden 1152, MLP 4608): qkv 1152->3456, attn_out 1152->1152, fc1 1152->4608, fc2 4608->1152;
M = tokens x batch = 256 x 2, 1024 x 2 (= 256 x 8), 1024 x 8. Paths, each from FP32 activations to
FP32 outputs, activation quantization included, weights prepared beforehand (load-time work):

- ``fp32`` / ``bf16``: ``F.linear`` (bf16 with BF16 input, weight and bias);
- ``w4a4_g32``: ``tca_lightning.kernels.w4a4_linear`` (INT4 per group of 32, symmetric, int16 bmm on CPU);
- ``w8a8_onednn``: ``tca_lightning.kernels.onednn`` with per-channel weights and asymmetric per-token
  activations (QuantRecipe's defaults); W8A8 runs with the weight split in two (K doubled) to stay exact
  on AVX2 (see that module); ``w4a4_onednn``: the same path with 4-bit codes, one pass;
- ``w8a8_g32``: the group kernel of the repo's W8A8 recipe (``kernels.grouped.int8_group_gemm``, int32
  bmm), at M = 512 only (it is slow).

Before timing, each oneDNN shape is checked on 64 rows: integer sums (unit scales) equal an int64 matmul.
The forward (batch 2, 256 px = 256 tokens, random weights, ``random:dit-xl-2-256``) runs FP32, BF16,
and copies with their linears swapped for PackedLinear the way Finalize packs them: ``w4a4_g32`` is
configs/tiny_dit.yaml's recipe (W4A4 per group of 32, asymmetric activations, embedders/final W8A8),
``w8a8_onednn`` QuantRecipe() (W8A8 per channel/token), ``w4a4_onednn`` QuantRecipe(wbits=4, abits=4)
(ARC's default granularity, per channel/token). Timing: rounds that run every path of a row once, in
turn (so a load change on the shared machine hits all paths alike); medians of ``--repeats`` rounds
(more, up to 15, while a round is under 1 s) after one warm-up round.
Writes benchmarks/results/cpu_latency.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import os
import sys
import time

import torch
import torch.nn.functional as F

from common import machine, now, write_tables

LAYERS = {"qkv": (1152, 3456), "attn_out": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
ROWS = (512, 2048, 8192)
GROUP_PATH_ROWS = (512,)
PATHS = ("fp32", "bf16", "w4a4_g32", "w8a8_onednn", "w4a4_onednn", "w8a8_g32")
COLUMNS = ("layer", "M", "K", "N", *(f"{p}_ms" for p in PATHS), "w8a8_onednn_vs_fp32", "w4a4_onednn_vs_fp32",
           "w4a4_g32_vs_fp32", "w4a4_g32_vs_bf16", "w8a8_onednn_vs_bf16", "w4a4_onednn_vs_bf16", "onednn_int_exact",
           "w8a8_split", "load_1m")


def interleaved_medians(fns: dict, repeats: int, min_seconds: float = 1.0, max_repeats: int = 15,
                        only_first: dict | None = None) -> dict[str, float]:
    """Median wall-clock milliseconds of each callable, timed in rounds that run every path once
    (a load change on the machine hits all paths alike, so their ratios hold). One warm-up round;
    ``repeats`` rounds, more (up to ``max_repeats``) while a round takes under ``min_seconds`` in total.
    ``only_first``: {name: rounds} for slow paths timed in the first rounds only."""
    warm = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    fast = sum(t for name, t in warm.items() if name not in (only_first or {}))
    rounds = repeats if fast >= min_seconds else min(max_repeats, max(repeats, int(min_seconds / max(fast, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if only_first and name in only_first and r >= only_first[name]:
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def ratios(row: dict) -> dict:
    """Speedups (baseline ms / path ms) of the integer paths vs FP32 and BF16; None where a path was not run."""
    out = {}
    for path in ("w8a8_onednn", "w4a4_onednn", "w4a4_g32"):
        for base in ("fp32", "bf16"):
            a, b = row.get(f"{base}_ms"), row.get(f"{path}_ms")
            out[f"{path}_vs_{base}"] = a / b if a and b else None
    return out


def per_channel_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel codes (N, K) int8 and FP16-rounded scales (N,) (the packed checkpoint's)."""
    from tca_lightning.kernels.reference import quantize_act_codes

    _, scale, _ = quantize_act_codes(w, bits, True, w.shape[1])
    scale16 = scale.reshape(-1).to(torch.float16).float()
    qmax = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(w / scale16[:, None]), -qmax - 1, qmax).to(torch.int8)
    return codes, scale16


def onednn_exact(codes: torch.Tensor, x: torch.Tensor, act_bits: int) -> bool:
    """Integer sums of the oneDNN path (unit scales) on 64 rows vs an int64 matmul of the same codes."""
    from tca_lightning.kernels import onednn

    unit = onednn.prepack_weight(codes, torch.ones(codes.shape[0]), act_bits)
    u, _, _ = onednn.quantize_act_u8(x[:64], act_bits, False)
    zp = 2 ** (act_bits - 1)
    ref = ((u.long() - zp) @ codes.long().t()).float()
    return torch.equal(onednn.int_gemm_onednn(u, zp, unit), ref)


@torch.no_grad()
def one_shape(layer: str, m: int, k: int, n: int, repeats: int) -> dict:
    from tca_lightning.kernels import onednn, quantize_weight_int4, w4a4_linear
    from tca_lightning.kernels.grouped import int8_group_gemm, quantize_act_codes

    gen = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.02
    bias = torch.randn(n, generator=gen) * 0.1
    row = {"layer": layer, "M": m, "K": k, "N": n}
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    w4_packed, w4_scale = quantize_weight_int4(w, 32)
    fns = {"fp32": lambda: F.linear(x, w, bias), "bf16": lambda: F.linear(xb, wb, bb),
           "w4a4_g32": lambda: w4a4_linear(x, w4_packed, w4_scale, bias, 32, torch.float32)}
    exact = True
    for bits, name in ((8, "w8a8_onednn"), (4, "w4a4_onednn")):
        codes, scale = per_channel_codes(w, bits)
        exact &= onednn_exact(codes, x, bits)
        weight = onednn.prepack_weight(codes, scale, bits)
        if bits == 8:
            row["w8a8_split"] = weight.split
        fns[name] = lambda weight=weight: onednn.onednn_linear(x, weight, False, bias)
    row["onednn_int_exact"] = exact
    if m in GROUP_PATH_ROWS:
        codes8, scale8 = per_channel_codes(w, 8)
        w_scale = scale8[:, None].expand(n, k // 32).contiguous()

        def group_path():
            a, s, _ = quantize_act_codes(x, 8, True, 32)
            return int8_group_gemm(a, s, codes8, w_scale, 32, bias)

        fns["w8a8_g32"] = group_path
    medians = interleaved_medians(fns, repeats, only_first={"w8a8_g32": max(1, repeats - 2)})
    row.update({f"{name}_ms": ms for name, ms in medians.items()})
    return {**row, **ratios(row)}


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): each packed copy frees 3 GB of FP32 linears in pieces
    that otherwise stay resident (measured: 13.4 GB -> 6.9 GB RSS with the five models of the forward row)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def forward_row(repeats: int, model_name: str = "random:dit-xl-2-256") -> dict:
    """One DiT-XL/2 forward, batch 2 at 256 px, on each path (see the module docstring)."""
    from memory import pack_transformer, repo_recipe
    from tca_lightning.methods import QuantRecipe
    from tca_lightning.models.loading import load_model

    fp32 = load_model(model_name, seed=0).transformer.eval()
    cfg = fp32.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = torch.tensor([500.0, 20.0])
    labels = torch.tensor([3, cfg.num_embeds_ada_norm])  # a class and the null label

    def run(model, dtype=torch.float32):
        xx = x.to(dtype)
        return lambda: model(xx, timestep=t, class_labels=labels).sample

    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    row = {"layer": f"{model_name} forward (batch 2, {tokens} tokens)", "M": 2 * tokens,
           "K": cfg.num_attention_heads * cfg.attention_head_dim, "N": None}
    ref = run(fp32)()
    fns = {"fp32": run(fp32), "bf16": run(copy.deepcopy(fp32).to(torch.bfloat16), torch.bfloat16)}
    recipes = {"w4a4_g32": repo_recipe(), "w8a8_onednn": QuantRecipe(),
               "w4a4_onednn": QuantRecipe(wbits=4, abits=4)}
    errors = {}
    for name, recipe in recipes.items():
        model = copy.deepcopy(fp32)
        pack_transformer(model, recipe)
        release_freed_memory()
        fns[name] = run(model)
        errors[name] = float((fns[name]() - ref).norm() / ref.norm())
    row.update({f"{name}_ms": ms for name, ms in interleaved_medians(fns, repeats).items()})
    row["rel_l2_vs_fp32"] = errors
    row["recipes"] = {k: dataclasses.asdict(v) for k, v in recipes.items()}
    return {**row, **ratios(row)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="M = 512 only (plus the forward)")
    parser.add_argument("--rows", nargs="+", type=int, default=None, help=f"M values (default {ROWS})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-forward", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    header = {"date": now(), "machine": machine(args.threads),
              "invocation": "python benchmarks/cpu_latency.py " + " ".join(sys.argv[1:])}
    rows = []
    for m in args.rows or (ROWS[:1] if args.quick else ROWS):
        for layer, (k, n) in LAYERS.items():
            rows.append({**one_shape(layer, m, k, n, args.repeats), "load_1m": os.getloadavg()[0]})
            r = rows[-1]
            print(f"[{time.time() - start:5.0f}s] {layer} M={m}: " + ", ".join(
                f"{p} {r[p + '_ms']:.1f}" for p in PATHS if r.get(p + "_ms")) + f" ms; exact {r['onednn_int_exact']}",
                flush=True)
    if not args.no_forward:
        rows.append({**forward_row(args.repeats), "load_1m": os.getloadavg()[0]})
        print(f"[{time.time() - start:5.0f}s] forward: " + ", ".join(
            f"{p} {rows[-1][p + '_ms']:.0f}" for p in PATHS if rows[-1].get(p + "_ms")) + " ms", flush=True)
    notes = [f"torch threads: {args.threads}; wall clock; paths of a row timed in interleaved rounds, medians of "
             f"{args.repeats} rounds (up to 15 while a round takes < 1 s) after one warm-up round",
             "every path from FP32 activations to FP32 output, activation quantization included; weight "
             "quantization/prepacking done beforehand (load time)",
             "*_vs_fp32 / *_vs_bf16: baseline ms / path ms (> 1: the integer path is faster), from this one run",
             "w8a8_onednn: per-channel weights, asymmetric per-token activations; on AVX2 without VNNI the weight is "
             "split in two (w8a8_split) so the int32 sums stay exact: twice the GEMM work of w4a4_onednn",
             "w4a4_g32 (layers): symmetric activations, the w4a4_linear entry point; w8a8_g32: M = 512 only",
             "forward rows: w4a4_g32 = configs/tiny_dit.yaml's recipe (W4A4 G32 asymmetric activations, "
             "embedders/final W8A8 G32); w8a8_onednn = QuantRecipe() (W8A8 per channel/token); w4a4_onednn = "
             "QuantRecipe(wbits=4, abits=4) (per channel/token); attention, norms and GELU stay FP32; "
             "relative L2 vs the FP32 output in cpu_latency.json",
             f"load_1m: the 1-minute load average after the row (the machine has {os.cpu_count()} cores; above "
             f"~{args.threads + 0.5:g} something else was running and the row's timings are disturbed)",
             f"wall time: {time.time() - start:.0f} s"]
    print(write_tables("cpu_latency", "CPU latency: integer W4A4/W8A8 paths vs FP32 and BF16 at DiT-XL/2 shapes",
                       header, rows, COLUMNS, notes))


if __name__ == "__main__":
    main()
