"""CPU tests of `templates/workspace/inference.py` and its `sd35/` machinery with the tiny
random-weight SD3.5 model.

Why: every member runs this script and `provision verify` parses its output, so these pin its
contract without a GPU or a download: one JSON line on stdout, a PNG of the requested size,
the loud dq -> storage fallback, the one-line `--strict` refusal, the breakpoint line that
shows SD3's 16-channel latents, no compilation under a debugger, the model built from
uninitialised memory and loaded from a saved pipeline, and the attention maps (the helper
against the processor's own queries and keys, one PNG per prompt token). Tiny model, 64x96
(non-square, to catch a swapped H/W), 2 steps.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import require_modules

require_modules("torch", "diffusers", "transformers", "PIL.Image")
from PIL import Image  # noqa: E402  (after the check: a clear message instead of an ImportError)

SCRIPT = Path(__file__).resolve().parents[1] / "templates" / "workspace" / "inference.py"
HEIGHT, WIDTH = 64, 96
TINY = ["--model", "tiny", "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", "2"]
METRIC_FIELDS = {
    "device", "gpu", "compute_capability", "torch", "diffusers", "transformers", "torchao",
    "model", "weights", "text_encoders", "fp8_requested", "fp8_applied", "load_s",
    "first_step_s", "step_ms_mean", "step_ms_note", "total_s", "peak_mem_gib",
    "compiled", "compile_skipped_reason", "load_phases_s", "attention_maps", "attention",
    "attention_note",
    "transformer_weights_gib", "height", "width", "steps", "output", "latents_shape",
}  # fmt: skip
MARKER = "# BREAKPOINT: latents before VAE decode"

# Runs inference.py under a line tracer that records `latents.shape` each time the marked
# line is about to run: what a debugger stopped on that line would show.
TRACE_DRIVER = """
import json, os, runpy, sys
script, line, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, os.path.dirname(script))  # as `python script` does: sd35/ is beside it
seen = []
def on_line(frame, event, arg):
    if event == "line" and frame.f_lineno == line:
        seen.append(list(frame.f_locals["latents"].shape))
    return on_line
sys.argv = [script, *sys.argv[4:]]
sys.settrace(lambda frame, event, arg: on_line if frame.f_code.co_filename == script else None)
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    pass
finally:
    sys.settrace(None)
with open(out, "w") as f:
    json.dump(seen, f)
"""

# Runs inference.py with torch's compile entry points replaced by a recorder (so nothing is
# really compiled), optionally under a trace function as a debugger sets one; writes the
# names of the compile calls it saw.
COMPILE_DRIVER = """
import json, os, runpy, sys, torch
script, out, traced = sys.argv[1], sys.argv[2], sys.argv[3] == "traced"
sys.path.insert(0, os.path.dirname(script))  # as `python script` does: sd35/ is beside it
calls = []
torch.nn.Module.compile = lambda self, *a, **k: calls.append(type(self).__name__)
torch.compile = lambda *a, **k: calls.append("torch.compile")
def tracer(frame, event, arg):
    return None  # a debugger with no breakpoint in this frame
sys.argv = [script, *sys.argv[4:]]
if traced:
    sys.settrace(tracer)
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
finally:
    sys.settrace(None)
with open(out, "w") as f:
    json.dump(calls, f)
"""


def cpu_env(tmp: Path) -> dict[str, str]:
    """CPU only, offline, private compile cache: the test must not depend on the machine."""
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
    }


def run_python(tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        env=cpu_env(tmp),
        cwd=tmp,
        timeout=300,
    )


def run_script(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """inference.py with the tiny model at the test size."""
    return run_python(tmp, str(SCRIPT), *TINY, *args)


def run_driver(tmp: Path, driver: str, *args: str) -> subprocess.CompletedProcess[str]:
    """inference.py run by `driver` (which gets the script's path, then `args`)."""
    return run_python(tmp, "-c", driver, str(SCRIPT), *args)


def metrics_of(proc: subprocess.CompletedProcess[str]) -> dict:
    """The single stdout line, parsed; fails with stderr shown when the run failed."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be exactly one JSON line, got: {proc.stdout!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def storage_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("storage")
    png, metrics_file = tmp / "out" / "storage.png", tmp / "metrics.json"
    proc = run_script(tmp, "--fp8", "storage", "--output", str(png), "--metrics", str(metrics_file))
    return metrics_of(proc), png, metrics_file


def test_storage_writes_png_of_requested_size(storage_run: tuple[dict, Path, Path]) -> None:
    _, png, _ = storage_run
    with Image.open(png) as im:
        assert im.size == (WIDTH, HEIGHT)
        extrema = im.convert("L").getextrema()
    assert extrema[0] != extrema[1], "image is a single flat colour"


def test_metrics_line_has_the_reported_fields(storage_run: tuple[dict, Path, Path]) -> None:
    metrics, png, metrics_file = storage_run
    assert not METRIC_FIELDS - metrics.keys(), "missing metrics fields"
    assert metrics["device"] == "cpu"
    assert metrics["fp8_requested"] == metrics["fp8_applied"] == "storage"
    assert metrics["latents_shape"] == [1, 16, HEIGHT // 8, WIDTH // 8]
    assert (metrics["height"], metrics["width"], metrics["steps"]) == (HEIGHT, WIDTH, 2)
    assert metrics["fp8_linear_layers"] > 0
    assert metrics["step_ms_mean"] > 0 and metrics["peak_mem_gib"] > 0
    assert metrics["step_ms_note"].endswith("timed by the host's clock")
    assert Path(metrics["output"]) == png
    assert json.loads(metrics_file.read_text()) == metrics
    assert metrics["attention_maps"] is None, "nothing recorded without --attention-maps"
    assert {"imports", "build", "fp8", "ready"} <= metrics["load_phases_s"].keys()


def test_dq_without_gpu_falls_back_to_storage_loudly(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "--fp8", "dq", "--output", str(tmp_path / "dq.png"))
    metrics = metrics_of(proc)
    assert metrics["fp8_requested"] == "dq"
    assert metrics["fp8_applied"] == "storage"
    assert metrics["fp8_fallback_reason"]
    assert "WARNING" in proc.stderr and "FALLING BACK to --fp8 storage" in proc.stderr


def test_dq_strict_without_gpu_exits_with_one_error_line(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "--fp8", "dq", "--strict", "--output", str(tmp_path / "x.png"))
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --fp8 dq cannot run")
    assert not (tmp_path / "x.png").exists()


def test_breakpoint_line_shows_sd3_latents(tmp_path: Path) -> None:
    source = SCRIPT.read_text().splitlines()
    marked = [n for n, text in enumerate(source, 1) if text.rstrip().endswith(MARKER)]
    assert len(marked) == 1, f"expected one line ending with {MARKER!r}"
    seen_file = tmp_path / "seen.json"
    args = [*TINY, "--fp8", "off", "--output", str(tmp_path / "bp.png")]
    proc = run_driver(tmp_path, TRACE_DRIVER, str(marked[0]), str(seen_file), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(seen_file.read_text()) == [[1, 16, HEIGHT // 8, WIDTH // 8]]


@pytest.mark.parametrize("traced", [True, False], ids=["under-a-debugger", "without"])
def test_a_run_with_a_trace_function_set_never_compiles(tmp_path: Path, traced: bool) -> None:
    """Breakpoints inside compiled code never fire, so under a debugger `--compile` is ignored,
    loudly; without one the same command compiles every transformer block."""
    calls_file = tmp_path / "calls.json"
    mode = "traced" if traced else "plain"
    args = [*TINY, "--fp8", "storage", "--compile", "--output", str(tmp_path / "c.png")]
    proc = run_driver(tmp_path, COMPILE_DRIVER, str(calls_file), mode, *args)
    metrics = metrics_of(proc)
    calls = json.loads(calls_file.read_text())
    if traced:
        assert calls == []
        assert metrics["compiled"] is False
        assert "trace function" in metrics["compile_skipped_reason"]
        assert "NOT COMPILING" in proc.stderr
    else:
        assert calls == ["JointTransformerBlock"] * 2  # the tiny model's two blocks
        assert metrics["compiled"] is True and metrics["compile_skipped_reason"] is None


class DebugpyStandIn:
    """Stands in for the debugpy module (hand-written, not debugpy): records what the script
    asks of it. The real debugpy under a DAP client is the sandbox test's and the bench's."""

    def __init__(self, connected: bool) -> None:
        self.connected = connected
        self.calls: list[bool] = []

    def is_client_connected(self) -> bool:
        return self.connected

    def trace_this_thread(self, should_trace: bool) -> None:
        self.calls.append(should_trace)


@pytest.mark.parametrize("connected", [True, False], ids=["client-connected", "no-client"])
def test_library_imports_run_untraced_only_under_a_connected_debugpy_and_tracing_comes_back(
    monkeypatch: pytest.MonkeyPatch, connected: bool
) -> None:
    """Under F5 the libraries import untraced (seconds off the first breakpoint), and tracing
    is back on after the block, even when it raised: the model code must stay debuggable."""
    debugger = workspace_module("sd35.debugger")
    debugpy = DebugpyStandIn(connected)
    monkeypatch.setitem(sys.modules, "debugpy", debugpy)
    with debugger.untraced_by_debugpy():
        assert debugpy.calls == ([False] if connected else [])
    with pytest.raises(ImportError), debugger.untraced_by_debugpy():
        raise ImportError("a library that does not import")
    assert debugpy.calls == ([False, True] * 2 if connected else [])


def workspace_module(name: str) -> ModuleType:
    """A workspace module (`sd35.fp8`, `attention_maps`) imported as inference.py and the debug
    console import it: the workspace's folder on sys.path."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def tiny_transformer_inputs(config: Any, dtype: Any, *, batch: int = 1, tokens: int = 7,
                            height: int = 64, width: int = 64) -> dict[str, Any]:
    """Seeded inputs of one transformer call: latents of a height x width image, `tokens`
    prompt tokens, pooled projections and a mid-schedule timestep, `batch` of each."""
    import torch

    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 16, height // 8, width // 8, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, tokens, config.joint_attention_dim,
                                             generator=g).to(dtype),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim,
                                          generator=g).to(dtype),
        "timestep": torch.full((batch,), 500.0),
    }


def test_attention_helper_is_the_processors_own_attention_and_rows_sum_to_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """text_to_image recomputes what JointAttnProcessor2_0 hands to SDPA: its rows must be the
    softmax of those very queries (text) and keys (image), for the prompt half of the batch."""
    import torch

    pipelines, maps = workspace_module("sd35.pipelines"), workspace_module("attention_maps")
    transformer = pipelines.random_pipeline("tiny", torch.device("cpu"), seed=0).transformer
    seen: dict[str, object] = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy_sdpa(query: torch.Tensor, key: torch.Tensor, *args: object, **kwargs: object):
        seen.setdefault("qk", (query, key))
        return sdpa(query, key, *args, **kwargs)

    def spy_processor(attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        seen.setdefault("inputs", (attn, hidden_states, encoder_hidden_states))
        return processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    attn = transformer.transformer_blocks[0].attn
    processor = attn.processor
    attn.processor = spy_processor
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    config = transformer.config
    with torch.inference_mode():
        transformer(**tiny_transformer_inputs(config, torch.bfloat16, batch=2, tokens=9,
                                              height=HEIGHT, width=WIDTH))
        m = maps.text_to_image(*seen["inputs"])
        heads = maps.text_to_image(*seen["inputs"], per_head=True)
    image_tokens = (HEIGHT // 16) * (WIDTH // 16)
    query, key = seen["qk"]
    scores = query[-1, :, image_tokens:].float() @ key[-1, :, :image_tokens].float().mT
    expected = (scores / query.shape[-1] ** 0.5).softmax(-1)
    assert m.shape == (9, image_tokens) and heads.shape == (config.num_attention_heads, 9,
                                                             image_tokens)
    torch.testing.assert_close(heads, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m, expected.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.sum(-1), torch.ones(9), atol=1e-5, rtol=0)


def test_attention_maps_writes_one_png_per_prompt_token_and_an_overlay(tmp_path: Path) -> None:
    prompt = "a red cube"
    out = tmp_path / "maps"
    proc = run_script(tmp_path, "--fp8", "storage", "--compile", "--prompt", prompt,
                      "--output", str(tmp_path / "a.png"), "--attention-maps", str(out),
                      "--attention-blocks", "1", "--attention-step", "2")
    metrics = metrics_of(proc)
    recorded = metrics["attention_maps"]
    pngs = sorted(out.glob("token-*.png"))
    assert len(pngs) == len(prompt) == len(recorded["tokens"])  # character-level tokenizer
    assert [p.name for p in pngs] == recorded["files"]
    assert (recorded["blocks"], recorded["step"]) == ([1], 2)
    assert metrics["compiled"] is False and "--attention-maps" in metrics["compile_skipped_reason"]
    for png in pngs:
        with Image.open(png) as im:
            assert im.size == (WIDTH, HEIGHT)
    assert (out / "overlay.png").is_file()


def test_a_saved_pipeline_loads_through_the_device_map(tmp_path: Path) -> None:
    """The real-weights path (`--model PATH`, device_map onto the device), on a saved tiny
    pipeline: the same image as the random-weight run that saved it."""
    import torch

    pipelines = workspace_module("sd35.pipelines")
    saved = tmp_path / "tiny-pipeline"
    pipelines.random_pipeline("tiny", torch.device("cpu"), seed=0).save_pretrained(saved)
    args = ["--fp8", "off", "--steps", "2", "--height", str(HEIGHT), "--width", str(WIDTH)]
    loaded = metrics_of(run_python(tmp_path, str(SCRIPT), *args, "--model", str(saved),
                                   "--output", str(tmp_path / "loaded.png")))
    built = metrics_of(run_script(tmp_path, "--fp8", "off", "--output", str(tmp_path / "b.png")))
    assert loaded["weights"] == "pretrained" and built["weights"].startswith("random")
    with Image.open(tmp_path / "loaded.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.tobytes() == b.tobytes()


def test_gpu_steps_are_timed_by_events_without_stalling_between_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A synchronize at every step idled the H200 while the host launched the next step, a cost
    of measuring that `--fp8 dq`'s short steps felt most. CI has no GPU, so this checks the
    decision with stand-ins for torch.cuda's Event, stream and synchronize (written here, not
    recorded): marks are events on the device's stream, nothing waits until the durations are
    read, and they come from the events' own clock. The real events ran on the lent H200
    (bench/results/fp8-h200/)."""
    import torch

    waits: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.at: float | None = None

        def record(self, stream: str) -> None:
            assert stream == "stream of cuda:1"
            self.at = float(len(timer.marks))  # the GPU reaches mark n at n/4 seconds

        def synchronize(self) -> None:
            waits.append("last event")

        def elapsed_time(self, end: Event) -> float:
            return (end.at - self.at) * 250.0  # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append("device"))
    metrics = workspace_module("sd35.metrics")
    timer = metrics.StepTimer(torch.device("cuda:1"))
    timer.on_transformer_call(None, ())
    timer.on_transformer_call(None, ())  # a second transformer call in step 1 marks nothing
    for step in range(3):
        assert timer.on_step_end(None, step, None, {"latents": step}) == {"latents": step}
    assert waits == [], "a step waited for the GPU"
    assert timer.durations() == [0.25, 0.25, 0.25]
    assert waits == ["last event"]
    assert "CUDA events" in timer.clock


def test_dq_quantizes_without_torchaos_inductor_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao's recommended Inductor settings (coordinate-descent tuning of every kernel, in
    every new process) made an H200's first compiled step 231 s cold and 83 s warm for steps 2%
    faster (bench/results/fp8-h200/variants/): dq asks torchao to leave them alone. torchao
    refuses float8 quantization without such a GPU, so its quantize_ records the config here."""
    require_modules("torchao")
    import torchao.quantization
    from diffusers import SD3Transformer2DModel

    given: list[object] = []
    monkeypatch.setattr(torchao.quantization, "quantize_", lambda _model, cfg: given.append(cfg))
    fp8, configs = workspace_module("sd35.fp8"), workspace_module("sd35.configs")
    fp8.apply_fp8(SD3Transformer2DModel(**configs.SD35_TINY), "dq", compiled=True)
    [config] = given
    assert isinstance(config, torchao.quantization.Float8DynamicActivationFloat8WeightConfig)
    assert config.set_inductor_config is False
    assert all(isinstance(g, torchao.quantization.PerRow) for g in config.granularity)


def test_eager_dq_linears_skip_torchaos_dispatch_and_keep_its_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eager dq (under a debugger nothing compiles) ran every Linear through torchao's tensor
    subclass dispatch, host-bound: twice bf16's step time on an H200 and past the decode
    breakpoint's 20 s. Eager, dq now sends each rowwise FP8 Linear through plain torch ops that
    never enter that dispatch, and the transformer's output keeps torchao's bits. torchao
    refuses float8 quantization without a GPU of compute capability >= 8.9: its hardware check
    is lifted here (only that; torch._scaled_mm runs on the CPU)."""
    require_modules("torchao")
    import torch
    import torchao.quantization.quant_api as quant_api
    from diffusers import SD3Transformer2DModel
    from torchao.quantization import Float8Tensor

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *_a, **_k: None)
    fp8, configs = workspace_module("sd35.fp8"), workspace_module("sd35.configs")
    torch.manual_seed(0)
    reference = SD3Transformer2DModel(**configs.SD35_TINY).to(torch.bfloat16).eval()
    eager = SD3Transformer2DModel(**configs.SD35_TINY).to(torch.bfloat16).eval()
    eager.load_state_dict(reference.state_dict())
    fp8.apply_fp8(reference, "dq", compiled=True)  # torchao's own path, as compiled blocks trace
    fp8.apply_fp8(eager, "dq", compiled=False)
    linears = [m for m in eager.modules() if isinstance(getattr(m, "weight", None), Float8Tensor)]
    assert linears and all(m.forward.__func__ is fp8._rowwise_fp8_forward for m in linears)

    dispatched: list[object] = []
    torchaos = Float8Tensor.__torch_function__.__func__
    monkeypatch.setattr(Float8Tensor, "__torch_function__", classmethod(
        lambda cls, *a, **k: dispatched.append(a[0]) or torchaos(cls, *a, **k)))
    inputs = tiny_transformer_inputs(eager.config, torch.bfloat16, batch=2)
    with torch.inference_mode():
        expected = reference(**inputs, return_dict=False)[0]
        assert dispatched, "the reference did not go through torchao's dispatch"
        dispatched.clear()
        got = eager(**inputs, return_dict=False)[0]
    assert dispatched == []
    assert torch.equal(got, expected)


def test_sigmoid_form_gelu_leaves_the_transformers_output_unchanged() -> None:
    """Compiled blocks compute GELU as x·sigmoid(2z) (Inductor's tanh is libdevice's exact one,
    which made the H200's MLP quantisation kernel compute-bound); it is the same function, so
    the transformer's output on the CPU, where nothing is compiled, stays the same."""
    import torch
    from diffusers import SD3Transformer2DModel

    compiling, configs = workspace_module("sd35.compiling"), workspace_module("sd35.configs")
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**configs.SD35_TINY).eval()
    inputs = tiny_transformer_inputs(model.config, torch.float32)
    with torch.no_grad():
        before = model(**inputs, return_dict=False)[0]
        swapped = compiling.use_sigmoid_gelu_(model)
        after = model(**inputs, return_dict=False)[0]
    assert swapped == 2 * model.config.num_layers - 1  # the last block has no context MLP
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.fixture
def inductor_choices() -> Iterator[ModuleType]:
    """Inductor's choices handler is process-wide: restored to its default after the test."""
    require_modules("torch")
    from torch._inductor import choices
    from torch._inductor.virtualized import V

    yield choices
    V.set_choices_handler(choices.InductorChoices())


def test_rows_up_to_the_limit_are_reduced_in_one_pass(
    inductor_choices: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LayerNorm + FP8 row-quantisation rows (2432 wide in SD3.5-Large) are reduced in one pass
    (2.3 ms of an H200 step's GPU time saved); wider rows, other reductions and cooperative ones
    keep Inductor's own decision, whatever it is."""
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    compiling = workspace_module("sd35.compiling")
    default = "Inductor's own decision"
    monkeypatch.setattr(inductor_choices.InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda features, cooperative: default))
    assert compiling.keep_rows_in_registers() is True

    class Reduction:
        def __init__(self, numel: int, hint: ReductionHint = ReductionHint.INNER) -> None:
            self.reduction_numel = numel
            self.hint = hint

        def get_reduction_hint(self) -> ReductionHint:
            return self.hint

    decide = V.choices.should_use_persistent_reduction
    assert decide(Reduction(2432), False) is True
    assert decide(Reduction(compiling.PERSISTENT_ROW_LIMIT), False) is True
    assert decide(Reduction(9728), False) == default
    assert decide(Reduction(2432, ReductionHint.OUTER), False) == default
    assert decide(Reduction(2432), True) == default


def test_a_torch_whose_heuristic_takes_other_arguments_keeps_its_defaults(
    inductor_choices: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heuristic is Inductor's internals: if its arguments change, our override would break
    compilation, so it is not installed."""
    from torch._inductor.virtualized import V

    compiling = workspace_module("sd35.compiling")
    monkeypatch.setattr(inductor_choices.InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda features, cooperative, hints: False))  # fmt: skip
    before = V.choices
    assert compiling.keep_rows_in_registers() is False
    assert V.choices is before


def test_compiling_the_blocks_brings_both_kernel_changes(
    inductor_choices: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`compile_blocks` is the one place the compiled path is set up: the GELU form and the
    one-pass rows come with it (recorded compile calls: nothing is really compiled here)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.models.activations import GELU
    from torch._inductor.virtualized import V

    compiling, configs = workspace_module("sd35.compiling"), workspace_module("sd35.configs")
    compiled: list[str] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self: compiled.append(type(self).__name__)
    )
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = SD3Transformer2DModel(**configs.SD35_TINY)
    assert compiling.compile_blocks(model) == str(tmp_path)
    assert compiled == ["JointTransformerBlock"] * model.config.num_layers
    gelus = [m for m in model.modules() if isinstance(m, GELU)]
    assert gelus and all(m.gelu is compiling.sigmoid_form_gelu for m in gelus)
    assert type(V.choices).__name__ == "RowsInRegisters"


def sdpa_in_fa3_layout(query: Any, key: Any, value: Any, normalised: bool = True) -> Any:
    """A stand-in for FA3's attention, written by hand: SDPA taking and giving FA3's layout,
    [batch, tokens, heads, head_dim] (SDPA's is [batch, heads, tokens, head_dim])."""
    import torch.nn.functional as F

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def dequantising_fa3_kernel(q: Any, k: Any, v: Any, *, q_descale: Any = None,
                            k_descale: Any = None, v_descale: Any = None) -> Any:
    """A stand-in for FA3's FP8 kernel, written by hand: e4m3 inputs times their [B, H]
    descales (None: 1), then SDPA in bf16, as FA3 computes (and outputs) it."""
    import torch

    def back(x: Any, descale: Any) -> Any:
        x = x.float()
        return (x if descale is None else x * descale[:, None, :, None]).to(torch.bfloat16)

    return sdpa_in_fa3_layout(back(q, q_descale), back(k, k_descale), back(v, v_descale))


def test_flash_attention_processor_is_diffusers_joint_attention_in_fa3s_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Hopper the compiled blocks' joint attention goes through FA3 in its own layout (no
    transposes), by a processor written after diffusers' JointAttnProcessor2_0. The decision is
    the GPU's (sm90, the kernel loads, one call agrees with SDPA): here the hardware check is
    lifted and the kernel is the SDPA stand-in above, so the processor's own work (projections,
    per-head norms, the joint concatenation and split, the last block's context_pre_only) must
    give the transformer's output to float32 rounding."""
    import torch
    from diffusers import SD3Transformer2DModel

    attention, configs = workspace_module("sd35.flash_attention"), workspace_module("sd35.configs")
    monkeypatch.setattr(attention, "hardware_reason", lambda *_: None)
    monkeypatch.setattr(attention, "load_fa3", lambda: sdpa_in_fa3_layout)
    torch.manual_seed(0)
    reference = SD3Transformer2DModel(**configs.SD35_TINY).eval()
    flash = SD3Transformer2DModel(**configs.SD35_TINY).eval()
    flash.load_state_dict(reference.state_dict())
    cpu = torch.device("cpu")

    assert attention.choose_attention_(flash, cpu, compiled=True) == (attention.FA3, None)
    processors = {type(p).__name__ for p in flash.attn_processors.values()}
    assert processors == {"JointFlashAttention"}
    assert flash.transformer_blocks[-1].context_pre_only  # the last block's path is taken too
    inputs = tiny_transformer_inputs(flash.config, torch.float32, batch=2)
    with torch.inference_mode():
        expected = reference(**inputs, return_dict=False)[0]
        got = flash(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sdpa_stays_where_fa3_cannot_run_and_the_metrics_say_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SDPA stays, with the reason in `attention_note`: eager blocks (a breakpoint in diffusers'
    processor must fire), no CUDA GPU, a GPU other than sm90 (FA3's kernels are Hopper's), a
    kernel that does not import, and one whose probe call disagrees with SDPA."""
    import torch
    from diffusers import SD3Transformer2DModel

    attention, configs = workspace_module("sd35.flash_attention"), workspace_module("sd35.configs")
    model = SD3Transformer2DModel(**configs.SD35_TINY).eval()
    cpu = torch.device("cpu")

    def kept(*, compiled: bool = True) -> str:
        kernel, note = attention.choose_attention_(model, cpu, compiled=compiled)
        assert kernel == attention.SDPA and note
        assert {type(p).__name__ for p in model.attn_processors.values()} == {
            "JointAttnProcessor2_0"}
        return note

    assert "eager" in kept(compiled=False)
    assert "no CUDA GPU" in kept()
    assert attention.hardware_reason((9, 0), "NVIDIA H200") is None
    assert "sm89" in attention.hardware_reason((8, 9), "NVIDIA L40S")
    assert "sm100" in attention.hardware_reason((10, 0), "NVIDIA B200")

    monkeypatch.setattr(attention, "hardware_reason", lambda *_: None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import raises ImportError
    assert "does not load" in kept() and "flash_attn_3 wheel" in kept()

    monkeypatch.setattr(attention, "load_fa3", lambda: lambda q, k, v, _: torch.zeros_like(q))
    assert "differs from SDPA" in kept()

    def unbuilt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _: bool) -> torch.Tensor:
        raise RuntimeError("This flash attention build does not support headdim 8")

    monkeypatch.setattr(attention, "load_fa3", lambda: unbuilt)
    assert "headdim" in kept()


@pytest.mark.parametrize("normalised", [True, False], ids=["rms-normalised-qk", "raw-qk"])
def test_fp8_attention_quantises_into_e4m3s_range_and_keeps_sdpas_result(
    normalised: bool,
) -> None:
    """FA3's FP8 kernel takes e4m3 inputs and per-(batch, head) descales. q and k that SD3.5's
    per-head RMS norm bounds are cast as they are (clamped: never NaN), anything else is scaled
    into the range; the result must stay SDPA's in bf16 to FP8's precision (the same cosine
    gate the GPU's probe applies). The kernel is the dequantising stand-in above."""
    import torch
    import torch.nn.functional as F

    attention = workspace_module("sd35.flash_attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, 3, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    if not normalised:  # magnitudes a cast alone would lose to e4m3's range
        q, k, v = q * 900, k * 0.003, v * 700
    out = attention.fp8_attention(dequantising_fa3_kernel)(q, k, v, normalised)
    ref = sdpa_in_fa3_layout(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert F.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0) > 0.99

    huge = torch.full((1, 4, 1, 64), 1e4, dtype=torch.bfloat16)
    cast, descale = attention.e4m3(huge, scaled=False)
    assert descale is None and cast.float().max() == attention.FP8_MAX
    scaled, descale = attention.e4m3(v, scaled=True)
    assert descale.shape == (2, 3)
    # e4m3: 3 mantissa bits (relative step 1/16), and below its normal range steps of 2^-9
    torch.testing.assert_close(scaled.float() * descale[:, None, :, None], v.float(),
                               rtol=1 / 16, atol=float(descale.max()) * 2**-9)
