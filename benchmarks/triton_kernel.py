"""Triton W4A4 group GEMM vs torch FP16/BF16 matmul (and INT8 ``torch._int_mm``) at DiT-XL/2's linear shapes.

    python benchmarks/triton_kernel.py                      # on a CUDA machine: checks + timings
    TRITON_INTERPRET=1 python benchmarks/triton_kernel.py --dry-run   # CPU, tiny shapes: checks only

DiT-XL/2 (Peebles & Xie, 2023): hidden 1152, MLP 4608; qkv 1152->3456, attention out 1152->1152,
fc1 1152->4608, fc2 4608->1152. Tokens: 256 (256 px) and 1024 (512 px), batch 2 and 8 images, so
M = 512, 2048, 8192 rows. Weights INT4 per group of 32 along K (FP16 scales), activations INT4 per
token per group, quantized and packed on the fly (``w4a4 linear`` includes that step; ``w4a4 gemm``
starts from packed activations). Each shape is checked before it is timed: integer accumulation
bit-exact (unit scales, FP32 output) and the scaled output vs the PyTorch reference. The kernel is
not autotuned by Triton: a few tile configurations are timed and the fastest is reported.
Timings: ``triton.testing.do_bench`` medians (CUDA events). Writes benchmarks/results/triton_w4a4.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import machine, now, write_tables

LAYERS = {"qkv": (1152, 3456), "attn_out": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
ROWS = (512, 2048, 8192)  # 256 tokens x 2, 256 x 8 (= 1024 x 2), 1024 x 8
CHECK_ROWS = 1024
TILES = ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (128, 256, 8))
COLUMNS = ("layer", "M", "K", "N", "fp16_ms", "bf16_ms", "int8_mm_ms", "w4a4_gemm_ms", "w4a4_linear_ms",
           "speedup_vs_fp16", "gemm_speedup_vs_fp16", "speedup_vs_bf16", "w4a4_tops", "fp16_tops", "tile",
           "int_exact", "max_rel_err", "weight_bytes_ratio")


def timer(device: str):
    """Median milliseconds of ``fn``: CUDA events via triton.testing on a GPU, wall clock otherwise."""
    if device == "cuda":
        from triton.testing import do_bench

        def bench(fn):
            try:
                return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except TypeError:  # older Triton: no return_mode
                return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0])
        return bench

    def bench(fn, reps: int = 3):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    return bench


def int8_linear(x: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """W8A8 per-token/per-channel with ``torch._int_mm``: the INT8 tensor-core baseline."""
    sx = x.abs().amax(1, keepdim=True).float().clamp_min(1e-8) / 127
    x8 = (x.float() / sx).round().clamp(-127, 127).to(torch.int8)
    return (torch._int_mm(x8, w8) * sx * sw).to(x.dtype)


def one_shape(layer: str, m: int, k: int, n: int, group: int, device: str, bench, tiles) -> dict:
    from tca_lightning.kernels import (quantize_act_int4_triton, quantize_weight_int4, w4a4_gemm_reference,
                                       w4a4_gemm_triton)
    from tca_lightning.kernels.reference import quantize_act_int4

    gen = torch.Generator(device=device).manual_seed(m * 7 + k + n)
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    w = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(dtype)
    bias = torch.randn(n, device=device, generator=gen).to(dtype)
    w_packed, w_scale = quantize_weight_int4(w.float(), group)
    a_packed, a_scale = quantize_act_int4_triton(x, group)
    ref_packed, ref_scale = quantize_act_int4(x.float(), group)
    if not torch.equal(a_packed, ref_packed):
        frac = (a_packed != ref_packed).float().mean().item()
        print(f"  note: {layer} M={m}: Triton activation codes differ from the reference in {frac:.2e} of bytes",
              flush=True)
    # checked on the first CHECK_ROWS rows: tiles are independent, and the CPU reference is slow at M = 8192
    c = min(m, CHECK_ROWS)
    ones_a, ones_w = torch.ones_like(a_scale[:c]), torch.ones_like(w_scale)
    cpu = lambda *ts: [t.cpu() for t in ts]  # noqa: E731  the reference's integer bmm has no CUDA kernel
    exact = torch.equal(w4a4_gemm_triton(a_packed[:c], ones_a, w_packed, ones_w, group).cpu(),
                        w4a4_gemm_reference(*cpu(a_packed[:c], ones_a, w_packed, ones_w), group))
    ref = w4a4_gemm_reference(*cpu(a_packed[:c], a_scale[:c], w_packed, w_scale), group, bias.float().cpu())
    out = w4a4_gemm_triton(a_packed[:c], a_scale[:c], w_packed, w_scale, group, bias, dtype)
    rel = ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()

    gemm_times = {}
    for bm, bn, warps in tiles:
        gemm_times[(bm, bn, warps)] = bench(lambda: w4a4_gemm_triton(
            a_packed, a_scale, w_packed, w_scale, group, bias, dtype, block_m=bm, block_n=bn, num_warps=warps))
    (bm, bn, warps), gemm_ms = min(gemm_times.items(), key=lambda kv: kv[1])

    def w4a4_linear():
        ap, sc = quantize_act_int4_triton(x, group)
        return w4a4_gemm_triton(ap, sc, w_packed, w_scale, group, bias, dtype, block_m=bm, block_n=bn,
                                num_warps=warps)

    linear_ms = bench(w4a4_linear)
    fp16_ms = bench(lambda: torch.nn.functional.linear(x, w, bias))
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    bf16_ms = bench(lambda: torch.nn.functional.linear(xb, wb, bb))
    int8_ms = None
    if device == "cuda":
        sw = w.float().abs().amax(1).clamp_min(1e-8) / 127
        w8 = (w.float() / sw[:, None]).round().clamp(-127, 127).to(torch.int8)  # (N, K): mat2 column-major
        try:
            int8_ms = bench(lambda: int8_linear(x, w8.t(), sw))
        except RuntimeError as err:
            print(f"  note: torch._int_mm failed at M={m} K={k} N={n}: {err}", flush=True)
    flops = 2 * m * n * k
    fp16_bytes = w.numel() * 2
    return {"layer": layer, "M": m, "K": k, "N": n, "fp16_ms": fp16_ms, "bf16_ms": bf16_ms, "int8_mm_ms": int8_ms,
            "w4a4_gemm_ms": gemm_ms, "w4a4_linear_ms": linear_ms, "speedup_vs_fp16": fp16_ms / linear_ms,
            "gemm_speedup_vs_fp16": fp16_ms / gemm_ms, "speedup_vs_bf16": bf16_ms / linear_ms,
            "w4a4_tops": flops / linear_ms / 1e9, "fp16_tops": flops / fp16_ms / 1e9,
            "tile": f"{bm}x{bn}/w{warps}", "int_exact": exact, "max_rel_err": rel,
            "weight_bytes_ratio": fp16_bytes / (w_packed.numel() + w_scale.numel() * 2),
            "all_tiles_ms": {f"{a}x{b}/w{c}": t for (a, b, c), t in gemm_times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU (with TRITON_INTERPRET=1): runs the checks, writes nothing")
    args = parser.parse_args()
    if args.dry_run:
        device, shapes, tiles = "cpu", [("tiny", 40, 128, 96)], ((32, 32, 4),)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run this on a GPU machine, or use --dry-run (TRITON_INTERPRET=1) to check it")
        device, tiles = "cuda", TILES
        shapes = [(name, m, *LAYERS[name]) for m in args.rows for name in args.layers]
    bench = timer(device)
    rows = []
    for layer, m, k, n in shapes:
        try:
            row = one_shape(layer, m, k, n, args.group_size, device, bench, tiles)
        except Exception as err:  # one failing shape (e.g. a compile error) must not hide the others
            print(f"FAILED {layer} M={m} K={k} N={n}: {type(err).__name__}: {err}", flush=True)
            continue
        rows.append(row)
        print(f"{layer:8s} M={m:5d} K={k} N={n}: fp16 {row['fp16_ms']:.4f} ms, w4a4 linear {row['w4a4_linear_ms']:.4f} "
              f"ms (gemm {row['w4a4_gemm_ms']:.4f}, tile {row['tile']}), x{row['speedup_vs_fp16']:.2f} vs fp16; "
              f"int exact {row['int_exact']}, rel err {row['max_rel_err']:.1e}", flush=True)
        if not args.dry_run:
            write(rows, args.group_size)  # after every shape: a run cut short keeps what it measured
    if args.dry_run:
        bad = [r for r in rows if not r["int_exact"] or r["max_rel_err"] > 1e-2]
        sys.exit(1 if bad or not rows else 0)
    print(write(rows, args.group_size))


def write(rows: list[dict], group: int) -> str:
    import triton

    header = {"date": now(), "machine": f"{machine(1, 'gpu')}, Triton {triton.__version__}",
              "invocation": "python benchmarks/triton_kernel.py " + " ".join(sys.argv[1:])}
    ratios = [r["speedup_vs_fp16"] for r in rows]
    notes = [f"W4A4 groups of {group} along K (FP16 weight scales, FP32 per-token activation scales), "
             "FP16 in and out, bias fused; speedups are FP16 time / W4A4 time measured in this run",
             "w4a4_linear: activation quantize+pack kernel + group GEMM; w4a4_gemm: GEMM from packed activations",
             "int8_mm: W8A8 per-token/per-channel via torch._int_mm plus scaling (PyTorch ops, not fused)",
             "int_exact: the Triton INT32 group sums equal the reference's (unit scales); max_rel_err: scaled "
             "FP16 output vs the FP32 reference, relative to its largest magnitude",
             f"tile: fastest of {', '.join(f'{a}x{b}/w{c}' for a, b, c in TILES)} (BLOCK_M x BLOCK_N / warps); "
             "the kernel is not autotuned otherwise",
             f"speedup vs FP16 over the {len(rows)} shapes: min {min(ratios, default=0):.2f}, "
             f"max {max(ratios, default=0):.2f}",
             f"{len(rows)} of {len(LAYERS) * len(ROWS)} shapes (a run cut short writes what it measured)"]
    return write_tables("triton_w4a4", "Triton W4A4 kernel vs FP16 at DiT-XL/2 linear shapes", header, rows, COLUMNS,
                        notes)


if __name__ == "__main__":
    main()
