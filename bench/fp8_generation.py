#!/usr/bin/env python3
"""Benchmark SD3.5 generation in bf16 and FP8 with `templates/workspace/inference.py`.

Runs the script as subprocesses, each a fresh process as a member would run it: `--fp8 off`
(the bf16 reference), `storage` (FP8 weights, bf16 compute) and `dq` (torchao float8 matmuls,
blocks compiled) twice, cold then warm, on one Inductor cache, because compilation dominates
the first dq run and the cache is what makes dq worth it. Same model, seed and size for all,
so random weights, noise and prompt embeddings are identical and the images comparable: each
image is compared with the bf16 one (PSNR, cosine of the pixel arrays centred on mid-grey).

Writes `run.json` (every run's metrics) and `results.md` (plus each run's PNG, metrics and log)
under `--out`, after every run, so a run cut short still leaves what it measured; at the end it
appends one summary record per mode (bf16, storage, dq with its cold and warm first step) to
`--records`, the history docs/reference.md's FP8 table is read from. Progress goes to stderr.

    python3 bench/fp8_generation.py --model large --height 1024 --width 1024 --steps 28 \
        --out "$OUT" --records bench/results/fp8-h200/results.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine runs this from a checkout, provision not installed
from provision.files import atomic_write  # noqa: E402  (stdlib only: nothing to install there)

INFERENCE = ROOT / "templates" / "workspace" / "inference.py"
FP8_MODES = ("off", "storage", "dq")
NEEDED = ("torch", "diffusers", "transformers", "numpy", "PIL", "requests")


@dataclass(frozen=True)
class Run:
    """One inference.py invocation."""

    label: str
    fp8: str
    compile: bool


def log(message: str) -> None:
    """Progress line on stderr, flushed at once so a remote tail shows it live."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="large", help="tiny|medium|large|HF id (default: large)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument(
        "--modes",
        default="off,storage,dq",
        help="comma list of off|storage|dq, each optionally +compile (dq always compiles and "
        "runs twice: cold, then warm cache); default: %(default)s",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--records",
        type=Path,
        help="JSON list the summary records are appended to (default: OUT/results.json)",
    )
    p.add_argument(
        "--inductor-cache",
        type=Path,
        help="TORCHINDUCTOR_CACHE_DIR shared by the runs (default: a fresh temporary directory, "
        "so the first compiled run is really cold)",
    )
    p.add_argument("--run-timeout", type=float, default=420.0, help="seconds per run")
    p.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole bench")
    return p.parse_args(argv)


def plan_runs(modes: str) -> list[Run]:
    """Expand `--modes` into runs in priority order, for when the deadline cuts the bench short.

    The bf16 reference first (the others are compared with it), then dq cold and warm (the
    measurement that matters), then the rest.
    """
    runs: list[Run] = []
    for item in (m.strip() for m in modes.split(",") if m.strip()):
        fp8, _, extra = item.partition("+")
        if fp8 not in FP8_MODES or extra not in ("", "compile"):
            raise SystemExit(f"error: bad mode {item!r}: use off|storage|dq, optionally +compile")
        if fp8 == "dq":
            runs += [Run("dq-cold", "dq", True), Run("dq-warm", "dq", True)]
        else:
            runs.append(Run(item.replace("+", "-"), fp8, extra == "compile"))
    runs.sort(key=lambda r: (r.label != "off", r.fp8 != "dq"))
    return runs


def missing_modules() -> list[str]:
    """Modules inference.py needs that this interpreter cannot find (checked without importing)."""
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def image_similarity(reference: Path, image: Path) -> dict[str, Any]:
    """PSNR (dB, 8-bit) and cosine of centred pixels between two PNGs of the same size."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(reference).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(image).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        return {"psnr_db": None, "cosine": None, "note": f"sizes differ: {a.shape} vs {b.shape}"}
    mse = float(np.mean((a - b) ** 2))
    x, y = (a / 127.5 - 1).ravel(), (b / 127.5 - 1).ravel()
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    return {
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2),
        "identical": mse == 0,
        "cosine": round(float(x @ y) / norms, 6) if norms else None,
    }


def run_inference(run: Run, args: argparse.Namespace, cache: Path, timeout: float) -> dict:
    """Run inference.py once; return its record (metrics or the error and the log's tail)."""
    out: Path = args.out
    cmd = [
        sys.executable,
        str(INFERENCE),
        *("--model", args.model, "--prompt", args.prompt, "--fp8", run.fp8),
        *("--height", str(args.height), "--width", str(args.width)),
        *("--steps", str(args.steps), "--seed", str(args.seed), "--guidance", str(args.guidance)),
        *("--output", str(out / f"{run.label}.png"), "--metrics", str(out / f"{run.label}.json")),
        *(["--compile"] if run.compile else []),
        *(["--strict"] if run.fp8 == "dq" else []),  # a silent fallback would mislabel the row
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    env.pop("TRITON_CACHE_DIR", None)  # keep Triton's kernels in the Inductor cache: cold is cold
    record: dict[str, Any] = {"label": run.label, "fp8": run.fp8, "compile": run.compile}
    log_path = out / f"{run.label}.log"
    started = time.perf_counter()
    with log_path.open("w") as log_file:
        # Own session: on timeout the whole group (compile workers too) is killed.
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, start_new_session=True
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            record["error"] = f"timed out after {timeout:.0f} s"
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["rc"] = proc.returncode
    lines = [line for line in stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and len(lines) == 1:
        record["metrics"] = json.loads(lines[0])
    else:
        tail = log_path.read_text(errors="replace").splitlines()
        errors = [line for line in tail if line.startswith("error:")]
        record.setdefault("error", errors[-1] if errors else f"exit {proc.returncode}")
        record["log_tail"] = tail[-15:]
    return record


def fmt(value: Any, digits: int = 1) -> str:
    """Table cell: numbers rounded, missing as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(records: list[dict], args: argparse.Namespace) -> str:
    """Human summary: environment once, then one row per run."""
    first = next((r["metrics"] for r in records if "metrics" in r), {})
    ref = next((r["metrics"] for r in records if r["label"] == "off" and "metrics" in r), None)
    lines = [
        f"# SD3.5 FP8 generation benchmark — {args.model}, {args.height}x{args.width}, "
        f"{args.steps} steps, seed {args.seed}",
        "",
        f"- GPU: {first.get('gpu')} (compute capability {first.get('compute_capability')}), "
        f"CUDA {first.get('cuda')}",
        f"- torch {first.get('torch')}, diffusers {first.get('diffusers')}, "
        f"transformers {first.get('transformers')}, torchao {first.get('torchao')}",
        f"- weights: {first.get('weights')}; text encoders: {first.get('text_encoders')}",
        "- ms/step: mean over steps 2..N (step 1 holds compilation and warm-up: see first step)",
        f"- peak: {first.get('peak_mem_kind')}; similarity: vs the `off` (bf16) PNG",
        "",
        "| run | fp8 applied | compiled | attention | load s | first step s | ms/step | speed-up "
        "| total s | peak GiB | weights GiB | PSNR dB | cosine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r.get("metrics")
        if m is None:
            lines.append(f"| {r['label']} | failed: {r.get('error')} |" + " |" * 11)
            continue
        sim = r.get("similarity", {})
        speedup = (
            ref["step_ms_mean"] / m["step_ms_mean"]
            if ref and ref.get("step_ms_mean") and m.get("step_ms_mean")
            else None
        )
        psnr = "∞" if sim.get("identical") else fmt(sim.get("psnr_db"), 2)
        lines.append(
            f"| {r['label']} | {m['fp8_applied']} | {'yes' if m['compiled'] else 'no'} "
            f"| {m.get('attention') or '—'} | {fmt(m['load_s'])} | {fmt(m['first_step_s'], 2)} "
            f"| {fmt(m['step_ms_mean'])} | {fmt(speedup, 2)}x | {fmt(m['total_s'])} "
            f"| {fmt(m['peak_mem_gib'], 2)} "
            f"| {fmt(m['transformer_weights_gib'], 2)} | {psnr} | {fmt(sim.get('cosine'), 5)} |"
        )
    return "\n".join(lines) + "\n"


def summary_records(runs: list[dict], args: argparse.Namespace, date: str) -> list[dict]:
    """One record per mode that ran: its step time against bf16 eager's, its image against the
    bf16 one, and for dq the first step both cold (compiling) and warm (Inductor cache filled).

    The dq record's step time is the warm run's: the cold run's later steps are the same
    compiled code, and the warm run is what every later press of "Run" gets.
    """
    measured = {r["label"]: r for r in runs if "metrics" in r}
    bf16 = measured.get("off", {}).get("metrics", {}).get("step_ms_mean")
    records = []
    for label in dict.fromkeys("dq" if r["label"].startswith("dq-") else r["label"] for r in runs):
        if label == "dq":
            cold, warm = measured.get("dq-cold"), measured.get("dq-warm")
            main = warm or cold
        else:
            cold, warm, main = measured.get(label), None, measured.get(label)
        if main is None:
            continue
        m = main["metrics"]
        similarity = main.get("similarity", {})
        step = m.get("step_ms_mean")
        records.append(
            {
                "date": date,
                "gpu": m.get("gpu"),
                "mode": label,
                "fp8_applied": m.get("fp8_applied"),
                "compiled": m.get("compiled"),
                "attention": m.get("attention"),  # the joint attention's kernel
                "attention_note": m.get("attention_note"),
                "model": args.model,
                "size": f"{args.width}x{args.height}",
                "steps": args.steps,
                "step_ms": step,
                "step_ms_note": m.get("step_ms_note"),
                "bf16_eager_step_ms": bf16,
                "speedup_vs_bf16_eager": round(bf16 / step, 3) if bf16 and step else None,
                "cosine": similarity.get("cosine"),
                "psnr_db": similarity.get("psnr_db"),
                "weights_gib": m.get("transformer_weights_gib"),
                "peak_mem_gib": m.get("peak_mem_gib"),
                "first_step_s_cold": cold["metrics"].get("first_step_s") if cold else None,
                "first_step_s_warm": warm["metrics"].get("first_step_s") if warm else None,
                "versions": {
                    k: m.get(k) for k in ("torch", "diffusers", "transformers", "torchao")
                },
            }
        )
    return records


def read_records(path: Path) -> list[dict]:
    """The history at `path` (none yet: empty); read before the runs, so a file that is not a
    list of records stops the bench at once, not after minutes of GPU time."""
    try:
        history = json.loads(path.read_text()) if path.exists() else []
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: {path} is not JSON ({exc})") from None
    if not isinstance(history, list):
        raise SystemExit(f"error: {path} is not a JSON list of records")
    return history


def append_records(path: Path, records: list[dict]) -> None:
    """Append to the JSON list at `path` (created if absent), replacing it atomically."""
    atomic_write(path, json.dumps(read_records(path) + records, indent=2) + "\n")


def write_results(records: list[dict], args: argparse.Namespace, cache: Path) -> None:
    """Write run.json (every run, as measured) and results.md under --out."""
    doc = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "inductor_cache": str(cache),
        "runs": records,
    }
    atomic_write(args.out / "run.json", json.dumps(doc, indent=2) + "\n")
    atomic_write(args.out / "results.md", markdown(records, args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = plan_runs(args.modes)
    missing = missing_modules()
    if missing:
        print(
            f"error: cannot import {', '.join(missing)} with {sys.executable}: install the wheels "
            "(.whl/README.txt) and put them on PYTHONPATH",
            file=sys.stderr,
        )
        return 1
    if "dq" in args.modes and importlib.util.find_spec("torchao") is None:
        log("warning: torchao is not importable: the dq runs will fail (--strict)")
    records_path = args.records or args.out / "results.json"
    read_records(records_path)
    args.out.mkdir(parents=True, exist_ok=True)
    own_cache = args.inductor_cache is None
    cache = Path(tempfile.mkdtemp(prefix="inductor-")) if own_cache else args.inductor_cache
    deadline = time.monotonic() + args.deadline
    records: list[dict] = []
    log(f"{len(runs)} runs: {', '.join(r.label for r in runs)}; out {args.out}; cache {cache}")
    try:
        for i, run in enumerate(runs, 1):
            left = deadline - time.monotonic()
            if run.label == "dq-warm" and records[-1].get("rc") == 2:
                log("dq-warm: skipped, dq-cold was refused (see its error)")
                records.append({"label": run.label, "fp8": run.fp8, "error": "skipped: dq refused"})
                continue
            if left < 30:
                log(
                    f"{run.label}: skipped, {left:.0f} s left of the {args.deadline:.0f} s deadline"
                )
                records.append({"label": run.label, "fp8": run.fp8, "error": "skipped: deadline"})
                continue
            timeout = min(args.run_timeout, left)
            log(f"{i}/{len(runs)} {run.label}: running (timeout {timeout:.0f} s)")
            record = run_inference(run, args, cache, timeout)
            reference = args.out / "off.png"
            if "metrics" in record and run.label != "off" and reference.exists():
                record["similarity"] = image_similarity(reference, args.out / f"{run.label}.png")
            records.append(record)
            write_results(records, args, cache)
            if "metrics" in record:
                m = record["metrics"]
                log(
                    f"{run.label}: ok in {record['wall_s']} s: {m['fp8_applied']}, "
                    f"first step {m['first_step_s']} s, {m['step_ms_mean']} ms/step, "
                    f"peak {m['peak_mem_gib']} GiB, weights {m['transformer_weights_gib']} GiB, "
                    f"similarity {record.get('similarity')}"
                )
            else:
                log(f"{run.label}: FAILED ({record['error']}); log tail:")
                for line in record.get("log_tail", []):
                    print(f"    {line}", file=sys.stderr)
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    write_results(records, args, cache)
    append_records(records_path, summary_records(records, args, datetime.date.today().isoformat()))
    print((args.out / "results.md").read_text(), file=sys.stderr)
    log(f"wrote {args.out / 'run.json'} and {args.out / 'results.md'}; appended to {records_path}")
    return 0 if all("metrics" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
