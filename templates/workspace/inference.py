#!/usr/bin/env python3
"""Generate one image with Stable Diffusion 3.5 in bf16 or FP8 and report what happened.

This file is copied into each member's workspace and run in the team's dev container (F5 in
VS Code), by `provision verify`, by `bench/fp8_generation.py`, and imported by the team's
generation service (`load_pipeline`, `generate`). It reads as the generation itself:
arguments, load, the denoising loop, decode, save. The machinery lives beside it in `sd35/`,
one concern a module (FP8, compiling, debugger detection, the random-weight pipelines, timers
and metrics); neither imports anything from `provision`.

  --fp8 off      bf16 weights, bf16 compute: the reference image.
  --fp8 storage  FP8 weights cast to bf16 layer by layer: less memory, slower; any device.
  --fp8 dq       real FP8 matmuls (torchao), each transformer block compiled: compute
                 capability >= 8.9 and torch >= 2.5, else a loud fallback to storage
                 (`--strict`: exit 2). sd35/fp8.py says what each trades.

Under a debugger nothing is compiled, whatever `--fp8` or `--compile` say: breakpoints inside
compiled code never fire (sd35/compiling.py). `--model tiny|medium|large` builds that
architecture with seeded random weights, offline; an HF id or local path loads from the HF
cache (sd35/pipelines.py). `--attention-maps DIR` saves where each prompt token attends in
the image (sd35/attention.py; attention_maps.py is also the debug console's helper).

Output: the PNG, and exactly one JSON line of metrics on stdout, everything else on stderr
(its fields: sd35/metrics.py). Exit codes: 0 done, 1 known error (one line on stderr), 2 usage
or `--strict` refusal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35 import InferenceError, StrictRefusal
from sd35.debugger import untraced_by_debugpy

# Under F5, torch and the machinery that imports it load with debugpy's tracing off: seconds
# off the first breakpoint (sd35/debugger.py says why). Everything called later is traced.
with untraced_by_debugpy():
    import torch
    from sd35.attention import block_list, save_attention_maps, start_attention_maps
    from sd35.compiling import compile_blocks, compile_skipped_reason
    from sd35.configs import TRANSFORMER_CONFIGS
    from sd35.flash_attention import choose_attention_
    from sd35.fp8 import apply_fp8, resolve_fp8
    from sd35.metrics import (
        Loaded,
        StepTimer,
        Stopwatch,
        generation_metrics,
        memory_peak_gib,
        reset_memory_peak,
        stdout_reserved,
    )
    from sd35.pipelines import (
        import_diffusers,
        pretrained_pipeline,
        random_pipeline,
        random_prompt_embeds,
        text_encoders,
    )

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline
    from PIL.Image import Image

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (the contract used by launch.json, `provision verify`, the bench)."""
    p = argparse.ArgumentParser(
        description="SD3.5 generation in bf16 or FP8; prints one JSON metrics line on stdout.",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--output", default="outputs/sd35.png", help="PNG path (default: %(default)s)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--seed", type=int, default=0, help="seeds the noise and any random weights")
    p.add_argument("--model", default="large",
                   help="tiny|medium|large (random weights, offline) or an HF id / local path "
                   "(default: %(default)s)")
    p.add_argument("--fp8", choices=("off", "storage", "dq"), default="dq")
    p.add_argument("--compile", action="store_true", help="compile each transformer block")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back from dq")
    p.add_argument("--guidance", type=float, default=3.5, help="CFG scale (default: %(default)s)")
    p.add_argument("--metrics", type=Path, help="also write the JSON metrics line to this file")
    p.add_argument("--attention-maps", type=Path, metavar="DIR",
                   help="save one heatmap PNG per prompt token (where it attends in the image) "
                   "and overlay.png into DIR; runs the transformer eager")
    p.add_argument("--attention-blocks", type=block_list, metavar="N,M-K",
                   help="joint transformer blocks to average the maps over (default: all)")
    p.add_argument("--attention-step", type=int,
                   help="denoising step (1-based) to record the maps at (default: the middle one)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.attention_step is not None and not 1 <= args.attention_step <= args.steps:
        p.error(f"--attention-step must be in 1..{args.steps}")
    if args.height % 16 or args.width % 16 or min(args.height, args.width) < 16:
        p.error("--height and --width must be positive multiples of 16 (VAE 8x, patch 2)")
    return args


def load_pipeline(args: argparse.Namespace) -> Loaded:
    """Build or load the pipeline of `args.model`, apply FP8, compile when asked and allowed."""
    watch = Stopwatch()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fp8_applied, fallback_reason = resolve_fp8(args.fp8, device, args.strict)  # fail fast
    watch.lap("fp8_check")
    with untraced_by_debugpy():
        import_diffusers()
    watch.lap("imports")
    skipped = compile_skipped_reason(args) if fp8_applied == "dq" or args.compile else None
    compiled = (fp8_applied == "dq" or args.compile) and not skipped

    random_size = args.model if args.model in TRANSFORMER_CONFIGS else None
    what = f"building random-weight SD3.5-{random_size}" if random_size else f"loading {args.model}"
    how = "compiled blocks" if compiled else "eager"
    print(f"inference: {what} on {device}, --fp8 {fp8_applied}, {how}", file=sys.stderr)
    if skipped:
        print(f"inference: NOT COMPILING: {skipped}; the transformer runs eager", file=sys.stderr)
    if random_size:
        pipe = random_pipeline(random_size, device, args.seed)
        weights = f"random (seed {args.seed})"
    else:
        pipe = pretrained_pipeline(args.model, device)
        weights = "pretrained"
    watch.lap("build" if random_size else "load")
    apply_fp8(pipe.transformer, fp8_applied, compiled=compiled)
    watch.lap("fp8")
    attention, attention_note = choose_attention_(pipe.transformer, device, compiled=compiled)
    cache_dir = compile_blocks(pipe.transformer) if compiled else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    watch.lap("ready")
    load_peak, _ = memory_peak_gib(device)
    return Loaded(
        pipe=pipe, device=device, model=args.model, weights=weights,
        text_encoders=text_encoders(random_size), random_size=random_size,
        fp8_requested=args.fp8, fp8_applied=fp8_applied, fp8_fallback_reason=fallback_reason,
        compiled=compiled, compile_skipped_reason=skipped, inductor_cache_dir=cache_dir,
        attention=attention, attention_note=attention_note,
        started=watch.started, load_s=round(time.perf_counter() - watch.started, 3),
        load_phases_s=watch.phases, load_peak_mem_gib=round(load_peak, 3),
    )


def generate(loaded: Loaded, *, prompt: str, height: int, width: int, steps: int, seed: int,
             guidance: float, negative_prompt: str | None = None) -> tuple[Image, dict[str, Any]]:
    """Denoise and decode one image with a loaded pipeline; the image and its metrics.

    The metrics are this file's JSON line less `attention_maps` and `output`; `total_s` is this
    image's time (denoise + decode). Random Medium/Large weights have no text encoders: their
    seeded random prompt embeddings stand in for prompt and negative prompt alike.
    """
    pipe, device = loaded.pipe, loaded.device
    t_start = time.perf_counter()
    call: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt}
    if loaded.random_size in ("medium", "large"):
        call = random_prompt_embeds(pipe.transformer.config, device, seed)
    reset_memory_peak(device)
    timer = StepTimer(device)
    hook = pipe.transformer.register_forward_pre_hook(timer.on_transformer_call)
    t_denoise = time.perf_counter()
    try:
        with torch.inference_mode():
            # The denoising loop is diffusers' (step into this call): per step, the transformer
            # on [negative, prompt], classifier-free guidance, then `self.scheduler.step`.
            latents = pipe(
                **call,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),  # CPU noise: same on any device
                output_type="latent",
                callback_on_step_end=timer.on_step_end,
            ).images
            denoise_s = timer.now() - t_denoise
            t_decode = time.perf_counter()
            image = decode(pipe, latents)
            decode_s = timer.now() - t_decode
    finally:
        hook.remove()  # a failed request must not leave its timer on the next one's calls
    return image, generation_metrics(
        loaded, timer, latents, started=t_start, denoise_s=denoise_s, decode_s=decode_s,
        seed=seed, height=height, width=width, steps=steps, guidance=guidance,
    )


def decode(pipe: StableDiffusion3Pipeline, latents: torch.Tensor) -> Image:
    """Undo SD3's latent scaling and shift, run the VAE, return the PIL image."""
    z = latents / pipe.vae.config.scaling_factor  # BREAKPOINT: latents before VAE decode
    z = z + pipe.vae.config.shift_factor
    pixels = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build or load the pipeline, apply FP8, denoise, decode, save; return the metrics."""
    loaded = load_pipeline(args)
    recording = start_attention_maps(args, loaded.pipe.transformer)
    image, metrics = generate(loaded, prompt=args.prompt, height=args.height, width=args.width,
                              steps=args.steps, seed=args.seed, guidance=args.guidance)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output)
    attention = save_attention_maps(args, loaded.pipe, recording, image) if recording else None
    # From the start of loading, as before the service shared generate(): one run, one total.
    metrics["total_s"] = round(time.perf_counter() - loaded.started, 3)
    return {**metrics, "attention_maps": attention, "output": str(args.output)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output = Path(args.output)
    with stdout_reserved() as out:
        try:
            metrics = run(args)
        except InferenceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, StrictRefusal) else 1
        line = json.dumps(metrics)
        if args.metrics:
            args.metrics.parent.mkdir(parents=True, exist_ok=True)
            args.metrics.write_text(line + "\n")
        print(line, file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
