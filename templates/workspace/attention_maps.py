"""Where SD3.5's prompt tokens attend in the image: attention maps SDPA never materialises.

SD3's joint attention runs image and text tokens through one `scaled_dot_product_attention`
call, which never forms the attention probabilities, so there is nothing to look at in a
debugger. This module recomputes them for one attention layer from that layer's own
projections and norms, exactly as diffusers' `JointAttnProcessor2_0` builds its queries and
keys, in float32:

    text_to_image(attn, hidden_states, encoder_hidden_states)   # [text tokens, image tokens]

Each row is one text token's attention over the image tokens only (softmax over the image
keys, so every row sums to 1); image token i sits at row i // (W/16), column i % (W/16) of the
image. `per_head=True` keeps the heads apart ([heads, text, image]). Under classifier-free
guidance the batch holds [negative, prompt]; `batch_index=-1` (the default) is the prompt.

From the debug console, stopped on the first line of `JointAttnProcessor2_0.__call__`
(diffusers/models/attention_processor.py), where its arguments are still the inputs:

    from attention_maps import text_to_image
    m = text_to_image(attn, hidden_states, encoder_hidden_states)

or stopped in `JointTransformerBlock.forward` after its norms:
`text_to_image(self.attn, norm_hidden_states, norm_encoder_hidden_states)`.

`inference.py --attention-maps DIR` (through `sd35/attention.py`) uses `record` and `save_maps`
to write one heatmap PNG per prompt token plus an overlay on the final image; nothing here is
imported without that flag.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL.Image import Image

TILE = 256  # px: the longer side of each token's tile in the overlay sheet

# A perceptually ordered dark-to-bright colour ramp (inferno's anchor colours), interpolated
# linearly: readable heatmaps without matplotlib in the image.
RAMP = (
    (0, 0, 4),
    (66, 10, 104),
    (147, 38, 103),
    (221, 81, 58),
    (252, 165, 10),
    (252, 255, 164),
)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, tokens, heads * dim] -> [batch, heads, tokens, dim], as the processor splits."""
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def text_to_image(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    per_head: bool = False,
    batch_index: int = -1,
) -> torch.Tensor:
    """Text-token -> image-token attention of one joint attention layer, rows summing to 1.

    `attn` is the diffusers `Attention` module, `hidden_states` its image-token input and
    `encoder_hidden_states` its text-token input (both [batch, tokens, channels]). Returns
    float32 [text, image] averaged over heads, or [heads, text, image] with `per_head`.
    """
    if encoder_hidden_states is None:
        raise ValueError("this attention layer has no text tokens (an image-only attn2 layer)")
    with torch.no_grad():
        image = hidden_states[batch_index : batch_index + 1 or None]
        text = encoder_hidden_states[batch_index : batch_index + 1 or None]
        key = _heads(attn.to_k(image), attn.heads)
        query = _heads(attn.add_q_proj(text), attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.norm_added_q is not None:
            query = attn.norm_added_q(query)
        query, key = query[0].float(), key[0].float()
        scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
        probs = scores.softmax(dim=-1)
    return probs if per_head else probs.mean(dim=0)


class Recorder:
    """Stands in for a block's attention processor: at one denoising step it adds the block's
    text -> image map to a running mean, then runs the real processor unchanged.

    Each joint block's attention runs once per step (classifier-free guidance is batched), so
    the n-th call with text tokens is step n.
    """

    def __init__(self, processor: Any, step: int, maps: list[torch.Tensor]) -> None:
        self.processor = processor
        self.step = step
        self.maps = maps
        self.calls = 0

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if encoder_hidden_states is not None:
            if self.calls == self.step:
                self.maps.append(text_to_image(attn, hidden_states, encoder_hidden_states))
            self.calls += 1
        return self.processor(
            attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
        )


def record(transformer: Any, blocks: list[int], step: int) -> list[torch.Tensor]:
    """Put a `Recorder` on each chosen block's joint attention; the returned list fills with
    one [text, image] map per block during `step` (0-based)."""
    maps: list[torch.Tensor] = []
    for index in blocks:
        attn = transformer.transformer_blocks[index].attn
        attn.set_processor(Recorder(attn.processor, step, maps))
    return maps


def prompt_tokens(pipe: Any, prompt: str) -> tuple[list[tuple[int, str]], str]:
    """(position in the joint text sequence, label) of each prompt token, and how they were
    found.

    The joint text sequence starts with the 77 CLIP positions ([BOS] prompt [EOS] padding), so
    CLIP-L's tokenization names them. Without a tokenizer (random stand-in prompt embeddings)
    the prompt's words are laid on CLIP positions 1..n, one each.
    """
    tokenizer = pipe.tokenizer
    if tokenizer is None:
        words = prompt.split()
        return [(i, w) for i, w in enumerate(words, 1)], (
            "no tokenizer (random prompt embeddings): word i of the prompt at CLIP position i; "
            "the maps show the mechanism, not meaning"
        )
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    special = set(tokenizer.all_special_ids)
    tokens = [
        (i, tokenizer.decode([t]).strip() or repr(tokenizer.decode([t])))
        for i, t in enumerate(ids)
        if t not in special
    ]
    return tokens, f"{type(tokenizer).__name__} (the CLIP-L positions of the text sequence)"


def _colour(values: Any) -> Any:
    """[h, w] floats in [0, 1] -> [h, w, 3] uint8 along RAMP."""
    import numpy as np

    ramp = np.array(RAMP, dtype=np.float64)
    x = np.clip(values, 0, 1) * (len(ramp) - 1)
    low = np.minimum(x.astype(int), len(ramp) - 2)
    t = (x - low)[..., None]
    return ((1 - t) * ramp[low] + t * ramp[low + 1]).round().astype(np.uint8)


def _filename(index: int, position: int, label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")[:24] or "tok"
    return f"token-{index:02d}-pos{position:03d}-{safe}.png"


def save_maps(
    mean_map: torch.Tensor,
    tokens: list[tuple[int, str]],
    grid: tuple[int, int],
    image: Image,
    out: Path,
) -> list[Path]:
    """One heatmap PNG per prompt token (the image grid, scaled to the image's size, each map
    stretched to its own min..max) and `overlay.png`: the final image under each heatmap, one
    labelled tile per token. Returns the token PNGs in prompt order."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    rows, cols = grid
    scale = TILE / max(image.size)
    tile = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = np.asarray(image.convert("RGB").resize(tile), dtype=np.float64)
    label_h = 14
    per_row = max(1, min(len(tokens), 8))
    sheet = PILImage.new(
        "RGB",
        (per_row * tile[0], -(-len(tokens) // per_row) * (tile[1] + label_h)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    written = []
    for n, (position, label) in enumerate(tokens):
        heat = mean_map[position].reshape(rows, cols).float().cpu().numpy()
        span = heat.max() - heat.min()
        heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
        coloured = PILImage.fromarray(_colour(heat))
        path = out / _filename(n, position, label)
        coloured.resize(image.size, PILImage.Resampling.BILINEAR).save(path)
        written.append(path)
        over = np.asarray(coloured.resize(tile, PILImage.Resampling.BILINEAR), dtype=np.float64)
        blend = PILImage.fromarray((0.45 * base + 0.55 * over).round().astype(np.uint8))
        x, y = (n % per_row) * tile[0], (n // per_row) * (tile[1] + label_h)
        sheet.paste(blend, (x, y))
        draw.text((x + 2, y + tile[1]), f"{position}: {label}"[:40], fill="black")
    sheet.save(out / "overlay.png")
    return written
