"""Which FP8 mode can run here, and the transformer converted to it.

The modes trade different things:
  off      bf16 weights, bf16 compute: the reference image.
  storage  diffusers layerwise casting: FP8 (e4m3) weights cast to bf16 layer by layer. Saves
           weight memory, is slower than bf16 (the casts cost; no FP8 matmuls). Any GPU, or CPU.
  dq       torchao float8 dynamic activation + weight quantization, rowwise scales: real FP8
           matmuls (torch._scaled_mm). Needs CUDA compute capability >= 8.9 and torch >= 2.5;
           slower than bf16 unless compiled, so each transformer block is compiled (about half
           a minute the first time on an H200), with the Inductor cache in
           TORCHINDUCTOR_CACHE_DIR so later runs start their first step in seconds.
           Where it cannot run it falls back to `storage` with a warning (`--strict`: exit 2).
           Eager (under a debugger) its Linear layers run `rowwise_fp8_linear`: the same ops
           and result as torchao's, without its per-call dispatch on the host.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

from sd35 import InferenceError, StrictRefusal
from sd35.debugger import untraced_by_debugpy

# Looked up by name: torch < 2.1 has no float8 dtypes, and --fp8 off must still run there.
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch, for the FP8 feature gates."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def dq_unavailable_reason(device: torch.device) -> str | None:
    """Why torchao float8 dynamic quantization cannot run here, or None when it can."""
    if torch_version() < (2, 5):
        return (
            f"torch {torch.__version__} lacks rowwise-scaled torch._scaled_mm (needs torch >= 2.5)"
        )
    if device.type != "cuda":
        return "no CUDA GPU visible (FP8 matmuls need an NVIDIA GPU of compute capability >= 8.9)"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {cc[0]}.{cc[1]} < 8.9: no FP8 tensor cores"
    try:
        with untraced_by_debugpy():
            from torchao.quantization import (  # noqa: F401 - probing importability
                Float8DynamicActivationFloat8WeightConfig,
                PerRow,
            )
    except ImportError as exc:
        return f"torchao float8 API is not importable ({exc}); install torchao matching torch"
    return None


def resolve_fp8(requested: str, device: torch.device, strict: bool) -> tuple[str, str | None]:
    """Pick the FP8 mode that will actually run; refuse or warn loudly when it differs."""
    if requested == "off":
        return "off", None
    if not hasattr(torch, "float8_e4m3fn"):
        raise InferenceError(
            f"torch {torch.__version__} has no torch.float8_e4m3fn (added in torch 2.1): "
            "upgrade torch, or run with --fp8 off"
        )
    if requested == "storage":
        return "storage", None
    reason = dq_unavailable_reason(device)
    if reason is None:
        return "dq", None
    if strict:
        raise StrictRefusal(
            f"--fp8 dq cannot run: {reason}; drop --strict to fall back to --fp8 storage"
        )
    print(
        f"WARNING: --fp8 dq cannot run: {reason}. FALLING BACK to --fp8 storage "
        "(FP8 weights, bf16 compute, no FP8 matmuls, slower than bf16).",
        file=sys.stderr,
    )
    return "storage", reason


def apply_fp8(transformer: torch.nn.Module, mode: str, *, compiled: bool) -> None:
    """Convert the transformer (only: it holds ~all FLOPs) to the resolved FP8 mode; an eager
    dq transformer's Linear layers run `rowwise_fp8_linear`."""
    if mode == "storage":
        if not hasattr(transformer, "enable_layerwise_casting"):
            raise InferenceError(
                "this diffusers has no layerwise casting (added in diffusers 0.33): upgrade it"
            )
        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16
        )
    elif mode == "dq":
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        # set_inductor_config=False: torchao's recommended Inductor settings tune every kernel by
        # coordinate descent, again in every new process: on an H200 the first compiled step took
        # 231 s cold and 83 s with a warm cache, for steps 2% faster; without them 17 s and ~4 s
        # (bench/results/fp8-h200/variants/).
        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), set_inductor_config=False
        )
        quantize_(transformer, config)
        if not compiled:
            eager_fp8_linears(transformer)


def is_fp8_weight(w: torch.Tensor) -> bool:
    """Whether a Linear weight is stored as FP8 (layerwise casting) or an FP8 subclass (torchao)."""
    return w.dtype in FP8_DTYPES or hasattr(w, "__tensor_flatten__")


def eager_fp8_linears(transformer: torch.nn.Module) -> int:
    """Send each torchao rowwise-FP8 Linear of an eager transformer through `rowwise_fp8_linear`.

    Why: eager, as under a debugger where nothing compiles, a torchao Float8Tensor linear spends
    its time on the host, in the tensor subclass's layers of dispatch and in checks it repeats
    on every call (`importlib.util.find_spec("mslk")` twice, the GPU's capability); SD3.5-Large
    calls 536 of them a step, so eager dq steps were host-bound, twice bf16's. Compiled, Inductor
    traces torchao's code once and none of this runs. Only eager transformers take this; the
    weights stay torchao's. Returns how many layers were sent.
    """
    try:
        from torchao.quantization import Float8Tensor, PerRow
    except ImportError:  # torchao < 0.13 quantizes into other tensor types: its path stays
        return 0
    sent = 0
    for module in transformer.modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(module, torch.nn.Linear) and isinstance(weight, Float8Tensor)):
            continue
        act = weight.act_quant_kwargs
        if (act is None or not isinstance(act.granularity, PerRow)
                or act.hp_value_lb is not None or act.hp_value_ub is not None
                or tuple(weight.scale.shape) != (weight.shape[0], 1)):
            continue  # another torchao recipe: its own code path stays right
        module.forward = types.MethodType(_rowwise_fp8_forward, module)
        sent += 1
    return sent


def _rowwise_fp8_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return rowwise_fp8_linear(x, self.weight, self.bias)


def rowwise_fp8_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias as torchao computes it for rowwise FP8: step in here to see the FP8.

    Each row of x gets the scale max|row| / FP8 max (in x's dtype, then float32), is divided by
    it in float32, clamped and cast to FP8; `torch._scaled_mm` multiplies by the weight's FP8
    data and both scales. The same torch ops as torchao 0.17's Float8Tensor path, so the same
    bits (tests/test_inference.py compares them).
    """
    act = weight.act_quant_kwargs
    fp8_max = torch.finfo(act.float8_dtype).max
    rows = x.reshape(-1, x.shape[-1])
    scale = (rows.abs().amax(dim=-1, keepdim=True) / fp8_max).to(torch.float32)
    quantized = (rows.to(torch.float32) / scale).clamp(-fp8_max, fp8_max).to(act.float8_dtype)
    out = torch._scaled_mm(
        quantized, weight.qdata.t(), scale_a=scale, scale_b=weight.scale.t(), bias=bias,
        out_dtype=x.dtype, use_fast_accum=weight.mm_config.use_fast_accum,
    )
    return out.reshape(*x.shape[:-1], out.shape[-1])
