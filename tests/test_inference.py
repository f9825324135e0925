"""CPU tests of `templates/workspace/inference.py` with the tiny random-weight SD3.5 model.

Why: every member runs this script and `provision verify` parses its output, so these pin its
contract without a GPU or a download: one JSON line on stdout, a PNG of the requested size,
the loud dq -> storage fallback, the one-line `--strict` refusal, and the breakpoint line that
shows SD3's 16-channel latents. Tiny model, 64x96 (non-square, to catch a swapped H/W), 2 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    "transformer_weights_gib", "height", "width", "steps", "output", "latents_shape",
}  # fmt: skip
MARKER = "# BREAKPOINT: latents before VAE decode"

# Runs inference.py under a line tracer that records `latents.shape` each time the marked
# line is about to run: what a debugger stopped on that line would show.
TRACE_DRIVER = """
import json, runpy, sys
script, line, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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


def cpu_env(tmp: Path) -> dict[str, str]:
    """CPU only, offline, private compile cache: the test must not depend on the machine."""
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
    }


def run_script(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args],
        capture_output=True,
        text=True,
        env=cpu_env(tmp),
        cwd=tmp,
        timeout=300,
    )


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
    assert Path(metrics["output"]) == png
    assert json.loads(metrics_file.read_text()) == metrics


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
    proc = subprocess.run(
        [sys.executable, "-c", TRACE_DRIVER, str(SCRIPT), str(marked[0]), str(seen_file), *args],
        capture_output=True,
        text=True,
        env=cpu_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(seen_file.read_text()) == [[1, 16, HEIGHT // 8, WIDTH // 8]]
