#!/usr/bin/env python3
"""The MLP's GELU + rowwise FP8 quantisation of SD3.5-Large, alone: Inductor's kernel (what the
compiled blocks run, bench/fp8_kernels.py: 7.7 ms of a 1024² CFG step) against hand-written
Triton kernels of the same function (issue 27: fuse what the measurement says is worth it).

The function, as the product computes it (sd35/compiling.py's sigmoid-form GELU, then
sd35/fp8.py's rowwise quantisation, torchao 0.17's ops): g = bf16(GELU_tanh(x)) in float32;
scale = max|row of g| / 448 (in float32: compiled, Inductor leaves out the eager bf16 rounding
of the division); q = e4m3(clamp(g / scale, +-448)). Input: the up-projection's output of one
step, 2 x 4429 tokens x 9728, bf16. Each variant's outputs are compared with Inductor's (the
fraction of bytes that differ) and timed by CUDA events (median of 50 after 10 warm-up calls);
GB/s counts one read of x and one write of q and the scales. "Fast division": sigmoid's
reciprocal by the hardware's approximate division and the row's scale applied as one
reciprocal, not an IEEE division per element.
Needs a GPU and Triton (a dependency of torch's CUDA builds, so not in pyproject's extras: the CPU
build CI installs has none).

    python3 bench/fp8_gelu_quant.py --out "$OUT/gelu-quant.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from cuda_timing import median_ms  # bench/, beside this script
from triton.language.extra import libdevice

ROWS, COLS = 2 * 4429, 9728
FP8_MAX = 448.0


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product's ops (compiled by Inductor here, as in the compiled blocks)."""
    f = x.float()
    g = (f * torch.sigmoid(1.5957691216057308 * (f + 0.044715 * f * f * f))).to(x.dtype)
    scale = (g.abs().amax(dim=-1, keepdim=True) / FP8_MAX).to(torch.float32)
    q = (g.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


@triton.jit
def _gelu_bf16(x, FAST: tl.constexpr):
    """FAST: sigmoid's reciprocal by the hardware's approximate division (~2 ulp), not IEEE."""
    f = x.to(tl.float32)
    z = 1.5957691216057308 * (f + 0.044715 * f * f * f)
    if FAST:
        return (f * libdevice.fast_dividef(1.0, 1.0 + tl.exp(-z))).to(tl.bfloat16)
    return (f * (1.0 / (1.0 + tl.exp(-z)))).to(tl.bfloat16)


@triton.jit
def _quantise(g, scale, FAST: tl.constexpr):
    """FAST: multiply by the row's reciprocal scale, once computed, not an IEEE division each."""
    if FAST:
        return tl.clamp(g.to(tl.float32) * (1.0 / scale), -448.0, 448.0).to(tl.float8e4nv)
    return tl.clamp(g.to(tl.float32) / scale, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def one_pass_kernel(x_ptr, q_ptr, s_ptr, cols, BLOCK: tl.constexpr, FAST: tl.constexpr):
    """A row per program, held in registers: read once, written once."""
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    x = tl.load(x_ptr + row * cols + offsets, mask=mask, other=0.0)
    g = _gelu_bf16(x, FAST)
    amax = tl.max(tl.abs(g), axis=0)
    scale = amax.to(tl.float32) / 448.0
    q = _quantise(g, scale, FAST)
    tl.store(q_ptr + row * cols + offsets, q, mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def two_pass_kernel(x_ptr, q_ptr, s_ptr, cols, CHUNK: tl.constexpr, FAST: tl.constexpr):
    """A row per program in chunks: the maximum, then the second read (from L2) quantised."""
    row = tl.program_id(0)
    base = row * cols
    amax = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in range(0, cols, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + base + offsets, mask=offsets < cols, other=0.0)
        amax = tl.maximum(amax, tl.abs(_gelu_bf16(x, FAST)).to(tl.float32))
    scale = tl.max(amax, axis=0) / 448.0
    for start in range(0, cols, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        mask = offsets < cols
        g = _gelu_bf16(tl.load(x_ptr + base + offsets, mask=mask, other=0.0), FAST)
        q = _quantise(g, scale, FAST)
        tl.store(q_ptr + base + offsets, q, mask=mask)
    tl.store(s_ptr + row, scale)


def launch(kernel, x: torch.Tensor, num_warps: int, **block) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    s = torch.empty((x.shape[0], 1), device=x.device, dtype=torch.float32)
    kernel[(x.shape[0],)](x, q, s, x.shape[1], num_warps=num_warps, **block)
    return q, s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    # The up-projection's output of a step is ~N(0, 1)-like with outliers: a few large rows.
    x = torch.randn(ROWS, COLS, device="cuda", dtype=torch.bfloat16)
    x[::97] *= 8
    compiled = torch.compile(reference)
    want_q, want_s = compiled(x)
    moved = ROWS * COLS * 3 + ROWS * 4  # bytes: x read once, q written, scales
    variants = {"inductor (the product)": lambda: compiled(x)}
    block = triton.next_power_of_2(COLS)
    for fast in (False, True):
        how = "fast division" if fast else "IEEE division"
        for warps in (8, 32):
            variants[f"one pass, {warps} warps, {how}"] = (
                lambda w=warps, f=fast: launch(one_pass_kernel, x, w, BLOCK=block, FAST=f))
        for warps, chunk in ((4, 1024), (8, 2048)):
            variants[f"two passes, {warps} warps, chunk {chunk}, {how}"] = (
                lambda w=warps, c=chunk, f=fast: launch(two_pass_kernel, x, w, CHUNK=c, FAST=f))
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "rows": ROWS, "cols": COLS, "variants": {}}
    for name, fn in variants.items():
        q, s = fn()
        ms = median_ms(fn, calls=50, warmup=10)
        differ = float((q.view(torch.uint8) != want_q.view(torch.uint8)).float().mean())
        scales_differ = float((s != want_s).float().mean())
        record["variants"][name] = {"ms": round(ms, 4), "GB/s": round(moved / ms / 1e6),
                                    "q_bytes_differing": differ, "scales_differing": scales_differ,
                                    "per_step_ms": round(ms * 37, 2)}
        print(f"{ms:8.4f} ms  {moved / ms / 1e6:6.0f} GB/s  q differ {differ:.2e}  "
              f"scales differ {scales_differ:.2e}  {name}", flush=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
