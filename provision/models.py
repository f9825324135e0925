"""Which SD3.5 model a run on a host uses: the real weights when the shared cache holds them and
the member's GPU can hold them, else the random-weight architecture of the size it can hold.

One rule for `provision verify` and the rendered launch.json, so what a member debugs is what
verify measured. GPU memory needed is what a 1024x1024 Debug run (FP8 dq, eager) peaks at,
from the measured SD3.5-Large numbers (H200: bf16 transformer weights 15.2 GiB, FP8 7.7 GiB,
bf16 generation peak 18.1 GiB) with the rest estimated from parameter counts:

- random Large: built in bf16 before FP8 conversion, 15.2 GiB + ~3 GiB of activations and VAE;
- random Medium (2.5 B parameters): 4.6 GiB + the same activations;
- real weights add their text encoders in bf16: T5-XXL 8.9 GiB, CLIP-G 1.3 GiB, CLIP-L 0.2 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from provision.facts import HostFacts
from provision.inventory import Member

REAL_WEIGHTS = {"large": "stabilityai/stable-diffusion-3.5-large",
                "medium": "stabilityai/stable-diffusion-3.5-medium"}
# GiB of GPU memory each choice needs, in order of preference: the first there that fits is
# taken. Real weights before random ones (real images, real attention maps), then the larger.
NEEDS_GIB = (("real", "large", 32), ("real", "medium", 20), ("random", "large", 20),
             ("random", "medium", 8))


@dataclass(frozen=True)
class ModelChoice:
    """`model` is inference.py's --model; `why` says in words why it was chosen."""

    model: str
    why: str

    @property
    def random(self) -> bool:
        """Random weights (an architecture name), not an HF id of real ones."""
        return "/" not in self.model


def cached_weights(size: str, cache_models: tuple[str, ...]) -> str | None:
    """The HF id of SD3.5-`size` when the shared cache's hub holds it."""
    real = REAL_WEIGHTS.get(size)
    return real if real and f"models--{real.replace('/', '--')}" in cache_models else None


def gpu_memory_gib(facts: HostFacts, member: Member) -> float | None:
    """The smallest of the member's GPUs, in GiB; None when the facts list no GPU of hers."""
    wanted = None if member.gpus == "all" else {int(i) for i in member.gpus.split(",")}
    sizes = [g.memory_mib for g in facts.nvidia.gpus if wanted is None or g.index in wanted]
    return min(sizes) / 1024 if sizes else None


def debug_model(member: Member, facts: HostFacts | None) -> ModelChoice:
    """The model of her launch.json: the first of NEEDS_GIB that is there and fits her GPU."""
    if member.gpus == "none":
        return ModelChoice("tiny", "no GPU: the tiny random-weight SD3.5, on the CPU")
    if facts is None:
        return ModelChoice("large", "random-weight SD3.5-Large: the host was not read; render "
                                    "with --host to use SD3.5 weights from its shared cache")
    memory = gpu_memory_gib(facts, member)
    gpu = f"her GPU has {memory:.0f} GiB" if memory is not None else "her GPU's memory is unknown"
    cached = {size: cached_weights(size, facts.cache_models) for size in REAL_WEIGHTS}
    for kind, size, needs in NEEDS_GIB:
        real = cached[size] if kind == "real" else None
        if (kind == "real" and real is None) or (memory is not None and memory < needs):
            continue
        if real:
            return ModelChoice(real, f"SD3.5-{size.title()} weights in {facts.cache.path}; {gpu}")
        held = ("the cached SD3.5 weights need more GPU memory" if any(cached.values())
                else f"no SD3.5 weights in {facts.cache.path}")
        return ModelChoice(size, f"random-weight SD3.5-{size.title()}: {held}; {gpu}")
    return ModelChoice("tiny", f"random-weight tiny SD3.5: {gpu}, less than SD3.5-Medium needs")
