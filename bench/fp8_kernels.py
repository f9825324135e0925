#!/usr/bin/env python3
"""Where a dq denoising step's GPU time goes, kernel by kernel (issue 27: "measure each
kernel, fuse what the measurement says is worth it").

Loads the pipeline exactly as `templates/workspace/inference.py` does (`load_pipeline`: random
SD3.5 weights, `--fp8 dq`, compiled blocks, the attention `choose_attention_` picks), warms the
compiled transformer up on one 1024² CFG call (batch 2, the bench's prompt length), then records
`--calls` transformer calls with torch.profiler (CUDA activity only). Each kernel's GPU time is
summed over the calls and divided by them: ms per call, which is ms per denoising step (one
transformer call on [negative, prompt] per step). Kernels are put in families by their names
(FP8 GEMM, bf16 GEMM, attention, Inductor's fused Triton kernels, other), and the wall time of a
call beside the sum of its kernels says how long the GPU waited on the host.

    python3 bench/fp8_kernels.py --workspace templates/workspace --out "$OUT/kernels.json"

Writes JSON (families, the top kernels, wall and kernel ms per call) and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Families by kernel name, first match wins. Inductor's generated kernels start with triton_
# (one that prepares attention's inputs is named after it); cuBLAS's FP8 GEMMs carry e4m3 or,
# as cuBLAS 13 names them on the H200, nvjet_sm90_qq… (the 228 launches a call: the blocks' six
# FP8 Linears x 38); FA3's are flash_fwd…, cuDNN's attention fmha/cudnn.
FAMILIES = (
    ("triton (Inductor, fused)", re.compile(r"^triton_")),
    ("fp8 gemm", re.compile(r"e4m3|fp8|f8f8|nvjet_sm90_qq", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|sdpa|attention", re.I)),
    ("bf16 gemm", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_", re.I)),
)


def family_of(name: str) -> str:
    return next((family for family, pattern in FAMILIES if pattern.search(name)), "other")


def kernel_times(transformer: Any, inputs: dict[str, Any], calls: int) -> tuple[dict, list]:
    """{kernel name: (GPU ms per call, launches per call)}, and each call's wall ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = transformer.device.type == "cuda"  # a CPU run (tiny) is the script's smoke test
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    walls = []
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    with profile(activities=[activity]) as recorded:
        for _ in range(calls):
            synchronize()
            start = time.perf_counter()
            transformer(**inputs, return_dict=False)
            synchronize()
            walls.append((time.perf_counter() - start) * 1000)
    total: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in recorded.events():
        if event.device_type == kind and (on_gpu or not event.cpu_parent):
            ms = (event.device_time_total if on_gpu else event.cpu_time_total) / 1000
            total[event.name][0] += ms / calls
            total[event.name][1] += 1 / calls
    return {name: (ms, count) for name, (ms, count) in total.items()}, walls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--model", default="large")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    sys.path.insert(0, str(args.workspace.resolve()))
    import inference
    import torch
    from sd35.pipelines import random_step_inputs

    loaded = inference.load_pipeline(inference.parse_args(["--model", args.model, "--fp8", "dq"]))
    transformer = loaded.pipe.transformer
    inputs = random_step_inputs(transformer, loaded.device, 0, 1)
    with torch.inference_mode():
        for _ in range(2):  # compile, then one warm call
            transformer(**inputs, return_dict=False)
        kernels, walls = kernel_times(transformer, inputs, args.calls)
    families: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in kernels.items():
        families[family_of(name)] += ms
    kernel_ms = sum(families.values())
    wall_ms = statistics.median(walls)
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])
    record = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "model": args.model,
        "fp8": loaded.fp8_applied, "compiled": loaded.compiled, "attention": loaded.attention,
        "attention_note": loaded.attention_note, "calls": args.calls,
        "wall_ms_per_call": round(wall_ms, 2), "kernel_ms_per_call": round(kernel_ms, 2),
        "gpu_idle_ms_per_call": round(wall_ms - kernel_ms, 2),
        "families_ms": {k: round(v, 2) for k, v in sorted(families.items(), key=lambda i: -i[1])},
        "top_kernels": [{"name": name[:160], "family": family_of(name), "ms": round(ms, 3),
                         "launches": round(count, 1)} for name, (ms, count) in ranked[:args.top]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.model} {loaded.fp8_applied}, attention {loaded.attention}: wall "
          f"{wall_ms:.2f} ms per call, kernels {kernel_ms:.2f}, GPU idle {wall_ms - kernel_ms:.2f}")
    for family, ms in record["families_ms"].items():
        print(f"  {ms:8.2f} ms  {family}")
    for row in record["top_kernels"]:
        print(f"  {row['ms']:8.3f} ms  x{row['launches']:<5} {row['family']:<12} "
              f"{row['name'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
