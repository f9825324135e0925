"""FP8 attention in SD3.5-Large's compiled dq step, against FA3 bf16 (issue 27), on an H200.

Each variant is one process running inference.py's load and generate (Large, random weights,
1024², 28 steps, `--fp8 dq`, blocks compiled) with the compiled blocks' FA3 call swapped for
the variant's; `off` is the bf16 eager reference the images are compared with (pixel cosine,
PSNR: bench/fp8_generation.py's). The variants quantise q, k, v to e4m3 for FA3's FP8 kernel:

  fa3-bf16          what the product runs (sd35/flash_attention.py)
  fp8-scaled        q, k, v each scaled per (batch, head) to e4m3's range (amax / 448)
  fp8-cast-qk       q and k cast as they are (RMS-normalised per head: e4m3's range holds
                    them), v scaled per (batch, head)

  python3 bench/fa3/variants.py --out DIR      (FA3 and the image's packages importable)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORKSPACE = ROOT / "templates" / "workspace"
FP8_MAX = 448.0
VARIANTS = ("off", "fa3-bf16", "fp8-scaled", "fp8-cast-qk")


def per_head(x: Any) -> tuple[Any, Any]:
    """x [B, S, H, D] in e4m3 with one scale per (batch, head), and FA3's descale [B, H]."""
    import torch

    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-6)
    scale = FP8_MAX / amax
    q = (x.float() * scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, 1.0 / scale


def attend_for(variant: str) -> Any:
    import torch
    from flash_attn_interface import flash_attn_func

    def fp8(query: Any, key: Any, value: Any) -> Any:
        if variant == "fp8-scaled":
            (q, qd), (k, kd) = per_head(query), per_head(key)
        else:
            q, k = query.to(torch.float8_e4m3fn), key.to(torch.float8_e4m3fn)
            qd = kd = None
        v, vd = per_head(value)
        out = flash_attn_func(q, k, v, q_descale=qd, k_descale=kd, v_descale=vd)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(query.dtype)

    return fp8


def run_variant(variant: str, out: Path) -> dict[str, Any]:
    """In this process: load, generate, save the PNG; the metrics."""
    sys.path.insert(0, str(WORKSPACE))
    import inference
    from sd35 import flash_attention

    if variant.startswith("fp8"):
        flash_attention.load_fa3 = lambda: attend_for(variant)
        flash_attention.probe_reason = lambda *_: None  # its bf16 tolerance is not FP8's
    args = inference.parse_args(["--model", "large", "--fp8", "off" if variant == "off" else "dq",
                                 "--strict", "--output", str(out / f"{variant}.png")])
    args.output = Path(args.output)
    return inference.run(args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", choices=VARIANTS, help="(internal) run this one here")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.out)))
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from fp8_generation import image_similarity

    results: dict[str, Any] = {}
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--variant",
                               variant], capture_output=True, text=True, timeout=300)
        if done.returncode:
            results[variant] = {"error": done.stderr.strip().splitlines()[-5:]}
            print(variant, results[variant], flush=True)
            continue
        m = json.loads(done.stdout.strip().splitlines()[-1])
        results[variant] = {k: m.get(k) for k in ("step_ms_mean", "first_step_s", "attention",
                                                  "attention_note", "compiled")}
        if variant != "off":
            results[variant] |= image_similarity(args.out / "off.png",
                                                 args.out / f"{variant}.png")
        print(variant, results[variant], flush=True)
        (args.out / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
