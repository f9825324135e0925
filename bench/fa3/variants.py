"""FP8 attention in SD3.5-Large's compiled dq step, against FA3 bf16 (issue 27), on an H200.

Each variant is one process running inference.py's load and generate (Large, random weights,
1024², 28 steps, `--fp8 dq`, blocks compiled) with the compiled blocks' FA3 call swapped for
the variant's; `off` is the bf16 eager reference the images are compared with (pixel cosine,
PSNR: bench/fp8_generation.py's). The variants quantise q, k, v to e4m3 for FA3's FP8 kernel:

  fa3-bf16          FA3's bf16 kernel, no quantisation
  fp8-scaled        q, k, v each scaled per (batch, head) to e4m3's range (amax / 448)
  fp8-cast-qk       what the product runs (sd35/flash_attention.py): q and k cast as they are
                    (RMS-normalised per head: e4m3's range holds them), v scaled per head

  python3 bench/fa3/variants.py --out DIR      (FA3 and the image's packages importable)

bench/results/fa3-h200/variants/variants.json was measured by this file's first version
(ed7ddfd), which spelled the same quantisation out itself, before the product had it.
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
VARIANTS = ("off", "fa3-bf16", "fp8-scaled", "fp8-cast-qk")


def attend_for(variant: str) -> Any:
    """The compiled blocks' attention for a variant other than the product's."""
    from flash_attn_interface import flash_attn_func
    from sd35.flash_attention import fp8_attention

    if variant == "fa3-bf16":
        return lambda q, k, v, _normalised: flash_attn_func(q, k, v)
    scaled = fp8_attention(flash_attn_func)
    return lambda q, k, v, _normalised: scaled(q, k, v, False)  # as if q, k were not normalised


def run_variant(variant: str, out: Path) -> dict[str, Any]:
    """In this process: load, generate, save the PNG; the metrics."""
    sys.path.insert(0, str(WORKSPACE))
    import inference
    from sd35 import flash_attention

    if variant in ("fa3-bf16", "fp8-scaled"):
        flash_attention.load_fa3 = lambda: attend_for(variant)
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
