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
"""

from __future__ import annotations

import sys

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


def apply_fp8(transformer: torch.nn.Module, mode: str) -> None:
    """Convert the transformer (only: it holds ~all FLOPs) to the resolved FP8 mode."""
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


def is_fp8_weight(w: torch.Tensor) -> bool:
    """Whether a Linear weight is stored as FP8 (layerwise casting) or an FP8 subclass (torchao)."""
    return w.dtype in FP8_DTYPES or hasattr(w, "__tensor_flatten__")
