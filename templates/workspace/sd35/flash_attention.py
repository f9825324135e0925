"""FlashAttention-3's FP8 attention in the compiled blocks on Hopper: SD3.5's joint attention.

Why: on an H200, SD3.5-Large's attention call (batch 2, 4429 tokens, 38 heads of 64) takes
~1.0 ms in cuDNN's bf16 kernel, which SDPA picks, 0.82 ms in FA3's bf16 kernel and 0.71 ms in
its FP8 (e4m3) kernel, 38 calls a step (bench/results/fa3-h200/). In the compiled dq step
(bench/results/fa3-h200/variants/): cuDNN 93-98 ms, FA3 bf16 90.6, FA3 FP8 86.8, image cosine
0.9878 -> 0.9837 against bf16. FP8 needs its inputs in e4m3's range: q and k are RMS-normalised
per head in SD3.5 (qk_norm), so they are cast as they are (clamped to the range, never NaN);
v, and q and k of a model without that norm, are scaled per (batch, head), which costs a pass
over them (scaling q and k too ate the kernel's gain: 90.8 ms).

Only compiled blocks take it. Eager runs (F5, where a member's breakpoints sit in diffusers'
`JointAttnProcessor2_0.__call__`, and `--attention-maps`) keep diffusers' own processor. FA3
is no dependency of the image: no index publishes it for the image's torch, so its wheel is
built from Dao-AILab's source (bench/fa3/build.py) and pinned as `[image] flash_attn_3` from a
wheelhouse. Where it is missing, does not load or disagrees with SDPA, or the GPU is not sm90,
SDPA stays and the metrics say why (`attention`, `attention_note`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

SDPA = "sdpa"
FA3 = "flash-attention-3 fp8"
FP8_MAX = 448.0  # e4m3's largest value
# (query, key, value, whether q and k are RMS-normalised per head) -> attention output
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
Kernel = Callable[..., Any]  # FA3's flash_attn_func: q, k, v, q_descale=, k_descale=, v_descale=


def hardware_reason(capability: tuple[int, int] | None, name: str) -> str | None:
    """Why FA3's kernels cannot run on this device, or None: they are written for sm90 only
    (Hopper's warp-group MMA and TMA); Blackwell and Ada have none of them."""
    if capability is None:
        return "no CUDA GPU: FlashAttention-3 runs on Hopper (sm90) GPUs"
    if capability != (9, 0):
        return f"{name} is sm{capability[0]}{capability[1]}: FlashAttention-3 is built for sm90"
    return None


def load_fa3() -> Attend | str:
    """FA3's FP8 attention in [batch, tokens, heads, head_dim], or why it does not import."""
    try:
        from flash_attn_interface import flash_attn_func
    except (ImportError, OSError) as exc:  # not installed, or its library does not load
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return (f"FlashAttention-3 does not load ({first}): the image has no flash_attn_3 wheel "
                "for its torch (docs/reference.md, FlashAttention-3)")
    return fp8_attention(flash_attn_func)


def e4m3(x: torch.Tensor, *, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, S, H, D] in e4m3, and the descale FA3 multiplies back ([B, H], None: 1).

    Scaled: each (batch, head) maps its largest magnitude to e4m3's largest value. Unscaled:
    clamped to the range and cast, for values that already lie well inside it.
    """
    if not scaled:
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), None
    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-6)
    scale = FP8_MAX / amax
    quantised = (x.float() * scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return quantised.to(torch.float8_e4m3fn), 1.0 / scale


def fp8_attention(kernel: Kernel) -> Attend:
    """Attention through an FP8 kernel with FA3's signature, inputs quantised as above."""

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               normalised: bool) -> torch.Tensor:
        q, q_descale = e4m3(query, scaled=not normalised)
        k, k_descale = e4m3(key, scaled=not normalised)
        v, v_descale = e4m3(value, scaled=True)
        out = kernel(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
        out = out[0] if isinstance(out, tuple) else out  # older FA3 also returned the LSE
        return out.to(query.dtype)

    return attend


def probe_reason(attend: Attend, device: torch.device, head_dim: int) -> str | None:
    """Run FA3 once on the model's head size against SDPA; why not to use it, or None.

    A build may lack this head size or this GPU's code, and fails only when called: better
    here, with SDPA kept, than in the first compiled step.
    """
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, head_dim, device=device, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    try:
        out = attend(q, k, v, True)
    except RuntimeError as exc:
        return f"FlashAttention-3 failed on head size {head_dim}: {str(exc).splitlines()[0]}"
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    cosine = float(F.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0))
    if not cosine >= 0.99:  # FP8 here: ~0.998 (bench/results/fa3-h200/attention.json)
        return f"FlashAttention-3 differs from SDPA (cosine {cosine:.4f}) on head size {head_dim}"
    return None


def choose_attention_(transformer: torch.nn.Module, device: torch.device, *,
                      compiled: bool) -> tuple[str, str | None]:
    """Give each joint attention of a compiled transformer FA3 where it can run; the kernel
    used and, when it is SDPA, why (the metrics' `attention` and `attention_note`)."""
    if not compiled:
        return SDPA, "eager blocks keep diffusers' processor (where breakpoints are set)"
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    on_gpu = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if on_gpu else None
    reason = hardware_reason(capability, torch.cuda.get_device_name(device) if on_gpu else "")
    attend = load_fa3() if reason is None else reason
    if isinstance(attend, str):
        return SDPA, attend
    reason = probe_reason(attend, device, transformer.config.attention_head_dim)
    if reason:
        return SDPA, reason
    processor = JointFlashAttention(attend)
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), JointAttnProcessor2_0):
            module.set_processor(processor)
    return FA3, None


class JointFlashAttention:
    """diffusers' JointAttnProcessor2_0 with `attend` where it calls SDPA.

    Written by hand what diffusers does (0.40 to 0.42 have no attention-backend switch for
    SD3's processor; their dispatcher serves other models), in FA3's layout: heads stay
    [batch, tokens, heads, head_dim], so the transposes SDPA's layout needs go. The per-head
    norms act on the last axis either way. tests/test_inference.py checks it against diffusers'.
    """

    def __init__(self, attend: Attend) -> None:
        self.attend = attend

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        batch, tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context_query = heads(attn.add_q_proj(encoder_hidden_states))
            context_key = heads(attn.add_k_proj(encoder_hidden_states))
            context_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=1)
            key = torch.cat([key, context_key], dim=1)
            value = torch.cat([value, context_value], dim=1)
        normalised = attn.norm_q is not None and attn.norm_k is not None
        out = self.attend(query, key, value, normalised)
        out = out.reshape(batch, -1, out.shape[-2] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, context = out[:, :tokens], out[:, tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context
