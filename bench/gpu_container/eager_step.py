"""An eager dq transformer call on the GPU, torchao's Float8Tensor path against
`sd35.fp8.rowwise_fp8_linear` (issue 22: the decode breakpoint under a debugger, where nothing
compiles).

Builds random SD3.5-Large once, FP8 dq; per variant times transformer calls at 1024² with CFG
(batch 2, 333 prompt tokens): wall ms of a synchronised call, and how long the host took to
queue it (a call whose queueing time is its wall time is host-bound); then the frames an
exception left during one call (pydevd's "uncaught" filter walks the stack at each one:
sys.monitoring's PY_UNWIND from Python 3.12, sys.settrace's exception events before), and
whether the two variants' outputs are the same bits. Native: run with the machine's Python and
the workspace on sys.path. Writes JSON to --out and prints it.

  python3 bench/gpu_container/eager_step.py --workspace templates/workspace --out eager.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def timed_calls(transformer: Any, inputs: dict[str, Any], calls: int) -> dict[str, float]:
    """Median wall and queueing ms of `calls` transformer calls after one warm-up call."""
    import torch

    def synchronize() -> None:
        if transformer.device.type == "cuda":
            torch.cuda.synchronize(transformer.device)

    walls, queued = [], []
    for i in range(calls + 1):
        synchronize()
        start = time.perf_counter()
        transformer(**inputs, return_dict=False)
        queued_at = time.perf_counter()
        synchronize()
        if i:
            walls.append((time.perf_counter() - start) * 1000)
            queued.append((queued_at - start) * 1000)
    return {"wall_ms": round(statistics.median(walls), 2),
            "queued_ms": round(statistics.median(queued), 2)}


def unwinds_of_one_call(transformer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """How many times an exception left a Python frame during one call, and where most did."""
    where: collections.Counter[str] = collections.Counter()

    def note(code: Any) -> None:
        where[f"{Path(code.co_filename).name}:{code.co_name}"] += 1

    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None:
        tool = monitoring.PROFILER_ID
        monitoring.use_tool_id(tool, "eager_step")
        monitoring.register_callback(tool, monitoring.events.PY_UNWIND,
                                     lambda code, offset, exc: note(code))
        monitoring.set_events(tool, monitoring.events.PY_UNWIND)
        try:
            transformer(**inputs, return_dict=False)
        finally:
            monitoring.set_events(tool, 0)
            monitoring.free_tool_id(tool)
        how = "sys.monitoring PY_UNWIND"
    else:
        def trace(frame: Any, event: str, _arg: Any) -> Any:
            if event == "exception":
                note(frame.f_code)
            return trace

        sys.settrace(trace)
        try:
            transformer(**inputs, return_dict=False)
        finally:
            sys.settrace(None)
        how = "sys.settrace exception events"
    return {"count": sum(where.values()), "how": how, "top": where.most_common(8)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--model", default="large", help="tiny|medium|large (default: %(default)s)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (torchao refuses dq there)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    sys.path.insert(0, str(args.workspace.resolve()))
    import torch
    from sd35.fp8 import apply_fp8, eager_fp8_linears
    from sd35.pipelines import import_diffusers, random_pipeline, random_step_inputs

    import_diffusers()
    device = torch.device(args.device)
    pipe = random_pipeline(args.model, device, 0)
    transformer = pipe.transformer
    apply_fp8(transformer, "dq", compiled=True)  # torchao's path first; eager all the same
    inputs = random_step_inputs(transformer, device, 0, 2)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    record: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__,
                              "python": sys.version.split()[0]}
    with torch.inference_mode():
        reference = transformer(**inputs, return_dict=False)[0]
        record["torchao"] = {**timed_calls(transformer, inputs, args.calls),
                             "unwinds": unwinds_of_one_call(transformer, inputs)}
        record["linears_sent"] = eager_fp8_linears(transformer)
        lean = transformer(**inputs, return_dict=False)[0]
        record["rowwise_fp8_linear"] = {**timed_calls(transformer, inputs, args.calls),
                                        "unwinds": unwinds_of_one_call(transformer, inputs)}
    record["same_bits"] = bool(torch.equal(lean, reference))
    record["max_abs_diff"] = float((lean.float() - reference.float()).abs().max())
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
