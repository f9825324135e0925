"""Whether the transformer is compiled, and the compiled blocks with their two kernel changes.

Under a debugger (VS Code's F5, `python -m debugpy`, any trace function or sys.monitoring
debugger) nothing is compiled, whatever `--fp8` or `--compile` say: breakpoints inside compiled
code never fire, and compiling under a tracing debugger takes many times longer. The
transformer then runs eager in the requested FP8 mode; stderr says so and the metrics carry
the reason.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from sd35.debugger import debugger_reason


def compile_skipped_reason(args: argparse.Namespace) -> str | None:
    """Why the transformer must run eager although compilation was asked for, or None."""
    reason = debugger_reason()
    if reason:
        return f"{reason}: breakpoints inside compiled code never fire"
    if args.attention_maps:
        return "--attention-maps records attention in eager blocks"
    return None


def compile_blocks(transformer: torch.nn.Module) -> str:
    """Compile each transformer block in place; return the Inductor cache directory.

    Compiling the repeated block (not the whole model) compiles one graph and reuses it for
    every layer, and keeps the pipeline's Python code (and its breakpoints) eager. The cache
    lives in TORCHINDUCTOR_CACHE_DIR (kept if already set) so only the first run pays. Compiled
    blocks compute GELU in its sigmoid form and reduce narrow rows in one pass: kernel speed.
    """
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchinductor"
    cache_dir = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default))
    use_sigmoid_gelu_(transformer)
    keep_rows_in_registers()
    for block in transformer.transformer_blocks:
        block.compile()
    return cache_dir


def sigmoid_form_gelu(gate: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written as x * sigmoid(2z), the same function: 0.5(1 + tanh z).

    Inductor lowers tanh to libdevice's exact tanh, dozens of instructions per element: the
    feed-forward's GELU + FP8 row-quantisation kernel, which computes GELU twice (row maximum,
    then scaling), was compute-bound on it. sigmoid lowers to the hardware exp. Computed in
    float32 so eager code (CPU, debugger) rounds once, as F.gelu does.
    """
    x = gate.float()
    z = x + 0.044715 * x * x * x
    return (x * torch.sigmoid(1.5957691216057308 * z)).to(gate.dtype)


def use_sigmoid_gelu_(transformer: torch.nn.Module) -> int:
    """Send every tanh-approximate GELU of the model through `sigmoid_form_gelu`; count them."""
    from diffusers.models.activations import GELU

    swapped = 0
    for module in transformer.modules():
        if isinstance(module, GELU) and module.approximate == "tanh":
            module.gelu = sigmoid_form_gelu
            swapped += 1
    return swapped


# Rows up to this many elements are reduced in one pass (Inductor's own limit is 1024): the
# LayerNorm + modulation + FP8 row-quantisation kernels of SD3.5-Large (2432-wide rows) then read
# each row once instead of three times. The MLP's 9728-wide rows stay looped: one pass was slower
# there (bench/results/fp8-h200/variants/).
PERSISTENT_ROW_LIMIT = 4096


def keep_rows_in_registers() -> bool:
    """Have Inductor reduce rows up to PERSISTENT_ROW_LIMIT wide in one pass; False if it cannot.

    Uses the hook Inductor documents for its heuristics (a subclass of InductorChoices given to
    V.set_choices_handler); a torch without it, or whose heuristic takes other arguments, keeps
    its defaults. The choice changes kernel speed only, never results. It is not in the compile
    cache's key (torch's keyed variant, config.inductor_choices_class, puts the factory in a
    pickled, hashed config, where a closure breaks both); caches from before it miss anyway,
    the sigmoid GELU changed the graph.
    """
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError:
        return False
    default = InductorChoices.should_use_persistent_reduction
    if len(inspect.signature(default).parameters) != 2:  # not (features, cooperative_reduction)
        return False

    class RowsInRegisters(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
            numel = features.reduction_numel
            if (
                inductor_config.triton.persistent_reductions
                and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and (isinstance(numel, int) or getattr(numel, "is_Integer", False))
                and int(numel) <= PERSISTENT_ROW_LIMIT
            ):
                return True
            return default(features, cooperative_reduction)

    V.set_choices_handler(RowsInRegisters())
    return True
