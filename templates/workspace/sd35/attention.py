"""`--attention-maps DIR`: the chosen blocks hooked at the chosen step, their maps saved.

For the joint attention of `--attention-blocks` at `--attention-step`, one heatmap PNG per
prompt token (where that token attends in the image) and an overlay on the final image. The
maps themselves are attention_maps.py's (beside inference.py, also the debug console's
helper): imported only with the flag, so without it nothing of it is imported or hooked.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import torch

from sd35 import InferenceError

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline
    from PIL.Image import Image

Recording = tuple[list[int], int, list[torch.Tensor]]  # blocks, 0-based step, maps being filled


def block_list(text: str) -> list[int]:
    """`--attention-blocks`: "0,5,10-12" -> [0, 5, 10, 11, 12]."""
    blocks: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            blocks += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0,5,10-12") from None
    if not blocks:
        raise argparse.ArgumentTypeError("no block given")
    return sorted(set(blocks))


def start_attention_maps(
    args: argparse.Namespace, transformer: torch.nn.Module
) -> Recording | None:
    """With --attention-maps: hook the chosen blocks; (blocks, 0-based step, maps being filled)."""
    if not args.attention_maps:
        return None
    from attention_maps import record

    count = len(transformer.transformer_blocks)
    blocks = args.attention_blocks or list(range(count))
    if blocks[-1] >= count:
        raise InferenceError(f"--attention-blocks: this transformer has blocks 0..{count - 1}")
    step = (args.attention_step or (args.steps + 1) // 2) - 1
    return blocks, step, record(transformer, blocks, step)


def save_attention_maps(
    args: argparse.Namespace,
    pipe: StableDiffusion3Pipeline,
    recording: Recording,
    image: Image,
) -> dict[str, Any]:
    """Write the recorded maps (averaged over the blocks) as PNGs; their part of the metrics."""
    from attention_maps import prompt_tokens, save_maps

    blocks, step, maps = recording
    tokens, source = prompt_tokens(pipe, args.prompt)
    patch = pipe.transformer.config.patch_size * pipe.vae_scale_factor
    grid = (args.height // patch, args.width // patch)
    files = save_maps(torch.stack(maps).mean(dim=0), tokens, grid, image, args.attention_maps)
    return {
        "dir": str(args.attention_maps),
        "blocks": blocks,
        "step": step + 1,
        "tokens": [label for _, label in tokens],
        "token_source": source,
        "files": [p.name for p in files],
        "overlay": "overlay.png",
    }
