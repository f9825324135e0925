"""What a run measured, and the one JSON line on stdout that reports it.

Fields: ok, device, gpu, compute_capability, cuda, torch, diffusers, transformers, torchao,
model, weights, text_encoders, fp8_requested, fp8_applied, fp8_fallback_reason,
fp8_linear_layers, linear_layers, compiled, compile_skipped_reason, inductor_cache_dir,
attention, attention_note, seed, height, width, steps, guidance, load_s, load_phases_s,
first_step_s, step_ms_mean, step_ms_note, denoise_s, decode_s, total_s, peak_mem_gib,
peak_mem_kind, load_peak_mem_gib, transformer_weights_gib, transformer_params, latents_shape,
attention_maps, output. load_s runs from start to ready-to-denoise (library imports, build or
load, FP8 conversion; load_phases_s splits it); compilation happens in the first step, so
first_step_s holds it and step_ms_mean (on a GPU timed by CUDA events, which do not stall the
steps) leaves step 1 out. peak_mem_gib is the CUDA allocator peak during generation
(load_peak_mem_gib: while loading) on a GPU, the process's max RSS on a CPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from sd35.fp8 import is_fp8_weight

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

GIB = 1024**3


class Stopwatch:
    """Seconds spent in each loading phase, for the metrics' load_phases_s."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now


class StepTimer:
    """When each denoising step ends, on the device's own timeline.

    On CUDA a mark is an event recorded on the stream and read after the run: synchronising at
    every step would idle the GPU while the host launches the next step, a cost of measuring,
    not of the model (the pipeline itself never waits between steps). On the CPU the work is
    synchronous, and the host's clock is the device's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.marks: list[Any] = []  # CUDA events, or perf_counter seconds on the CPU
        self.clock = (
            "timed by CUDA events, no synchronisation between steps"
            if self.on_cuda
            else "timed by the host's clock"
        )

    def now(self) -> float:
        """The host's clock once the device has finished what was queued."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self) -> None:
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def on_transformer_call(self, _module: torch.nn.Module, _args: Any) -> None:
        """Forward pre-hook: marks the start of the first step only."""
        if not self.marks:
            self.mark()

    def on_step_end(
        self, _pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """The pipeline's callback_on_step_end: marks the end of each step."""
        self.mark()
        return callback_kwargs

    def durations(self) -> list[float]:
        """Seconds between consecutive marks; on CUDA, once the last one has been reached."""
        if not self.on_cuda:
            return [b - a for a, b in itertools.pairwise(self.marks)]
        if self.marks:
            self.marks[-1].synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(self.marks)]


def memory_peak_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA allocator peak on a GPU, process max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "process_max_rss"


def reset_memory_peak(device: torch.device) -> None:
    """Start a generation's CUDA peak afresh (a process's max RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def package_version(name: str) -> str | None:
    """Installed version without importing the package (importing torchao is slow and noisy)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, looking inside tensor subclasses (torchao float8 + scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


class Loaded(NamedTuple):
    """A pipeline ready to denoise, and what loading it did: the load half of the metrics.

    Built once by inference.py's `load_pipeline`, then used by its `generate` for one image
    (a run of inference.py) or for every request (the team's generation service), never
    changed: a tuple."""

    pipe: StableDiffusion3Pipeline
    device: torch.device
    model: str
    weights: str
    text_encoders: str
    random_size: str | None
    fp8_requested: str
    fp8_applied: str
    fp8_fallback_reason: str | None
    compiled: bool
    compile_skipped_reason: str | None
    inductor_cache_dir: str | None
    attention: str  # the joint attention's kernel (sd35/flash_attention.py)
    attention_note: str | None  # why SDPA, where it is SDPA
    started: float  # perf_counter at the start of loading
    load_s: float
    load_phases_s: dict[str, float]
    load_peak_mem_gib: float


def generation_metrics(
    loaded: Loaded,
    timer: StepTimer,
    latents: torch.Tensor,
    *,
    started: float,
    denoise_s: float,
    decode_s: float,
    seed: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
) -> dict[str, Any]:
    """One generation's metrics, in the JSON line's order, less `attention_maps` and `output`;
    `total_s` runs from `started` (perf_counter) to now."""
    device, transformer = loaded.device, loaded.pipe.transformer
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    durations = timer.durations()
    measured = durations[1:] if len(durations) > 1 else durations
    peak, peak_kind = memory_peak_gib(device)
    weight_bytes = sum(map(tensor_bytes, (*transformer.parameters(), *transformer.buffers())))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return {
        "ok": True,
        "device": str(device),
        "gpu": gpu,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "torchao": package_version("torchao"),
        "model": loaded.model,
        "weights": loaded.weights,
        "text_encoders": loaded.text_encoders,
        "fp8_requested": loaded.fp8_requested,
        "fp8_applied": loaded.fp8_applied,
        "fp8_fallback_reason": loaded.fp8_fallback_reason,
        "fp8_linear_layers": sum(is_fp8_weight(m.weight) for m in linears),
        "linear_layers": len(linears),
        "compiled": loaded.compiled,
        "compile_skipped_reason": loaded.compile_skipped_reason,
        "inductor_cache_dir": loaded.inductor_cache_dir,
        "attention": loaded.attention,
        "attention_note": loaded.attention_note,
        "seed": seed,
        "height": height,
        "width": width,
        "steps": steps,
        "guidance": guidance,
        "load_s": loaded.load_s,
        "load_phases_s": loaded.load_phases_s,
        "first_step_s": round(durations[0], 3) if durations else None,
        "step_ms_mean": round(1000 * sum(measured) / len(measured), 2) if measured else None,
        "step_ms_note": (
            f"mean over steps 2..N; step 1 (compilation, allocator warm-up) excluded; {timer.clock}"
            if len(durations) > 1
            else f"single step: includes warm-up; {timer.clock}"
        ),
        "denoise_s": round(denoise_s, 3),
        "decode_s": round(decode_s, 3),
        "total_s": round(time.perf_counter() - started, 3),
        "peak_mem_gib": round(peak, 3),
        "peak_mem_kind": peak_kind + (" (generation)" if device.type == "cuda" else ""),
        "load_peak_mem_gib": loaded.load_peak_mem_gib,
        "transformer_weights_gib": round(weight_bytes / GIB, 4),
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "latents_shape": list(latents.shape),
    }


@contextlib.contextmanager
def stdout_reserved() -> Iterator[Any]:
    """Send everything written to fd 1 (Python, C extensions, compile workers) to stderr.

    Yields a writer for the real stdout, so the metrics line is the only thing a caller
    parsing stdout ever sees.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real_stdout = os.fdopen(saved, "w", closefd=True)
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        real_stdout.flush()
        os.dup2(real_stdout.fileno(), 1)
        real_stdout.close()
