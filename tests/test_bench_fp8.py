"""bench/fp8_generation.py's summary records, on a run it recorded on the lent H200
(bench/results/fp8-h200/run-2026-11-21.json: its run.json, as written then)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "bench" / "results" / "fp8-h200" / "run-2026-11-21.json"


def bench_module() -> ModuleType:
    """The bench script as a module (registered first: its dataclasses look themselves up)."""
    path = ROOT / "bench" / "fp8_generation.py"
    spec = importlib.util.spec_from_file_location("fp8_generation", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def recorded_records() -> list[dict]:
    doc = json.loads(RECORDED.read_text())
    return bench_module().summary_records(doc["runs"], argparse.Namespace(**doc["args"]), "d")


def test_one_record_per_mode_with_dq_cold_and_warm_folded_into_one() -> None:
    records = {r["mode"]: r for r in recorded_records()}
    assert list(records) == ["off", "dq", "storage"]
    dq = records["dq"]
    assert (dq["first_step_s_cold"], dq["first_step_s_warm"]) == (167.133, 44.093)
    assert dq["step_ms"] == 104.68  # the warm run's: what every later "Run" gets
    assert dq["speedup_vs_bf16_eager"] == round(187.85 / 104.68, 3)
    assert (dq["cosine"], dq["psnr_db"], dq["weights_gib"]) == (0.984111, 29.78, 7.6833)
    assert records["off"]["speedup_vs_bf16_eager"] == 1.0
    assert records["storage"]["first_step_s_warm"] is None
    assert dq["step_ms_note"].startswith("mean over steps 2..N")  # how it was timed, kept


def test_records_carry_the_fields_the_readme_table_reads() -> None:
    fields = {"date", "gpu", "mode", "step_ms", "bf16_eager_step_ms", "speedup_vs_bf16_eager",
              "cosine", "psnr_db", "weights_gib",
              "first_step_s_cold", "first_step_s_warm"}  # fmt: skip
    for record in recorded_records():
        assert fields <= record.keys()


def test_records_are_appended_and_a_file_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    bench = bench_module()
    path = tmp_path / "results.json"
    bench.append_records(path, [{"mode": "off"}])
    bench.append_records(path, [{"mode": "dq"}])
    assert [r["mode"] for r in json.loads(path.read_text())] == ["off", "dq"]
    path.write_text('{"runs": []}')
    with pytest.raises(SystemExit, match="not a JSON list"):
        bench.append_records(path, [{"mode": "dq"}])
    assert json.loads(path.read_text()) == {"runs": []}


def test_committed_history_is_a_list_of_records_with_the_recorded_run_first() -> None:
    """The run of 2026-11-21 predates the metrics' attention kernel: its records have none."""
    history = json.loads((RECORDED.parent / "results.json").read_text())
    first = [r for r in history if r["date"] == "2026-11-21"]
    recorded = recorded_records()
    assert {(r["attention"], r["attention_note"]) for r in recorded} == {(None, None)}
    newer = ("attention", "attention_note")
    assert [{**r, "date": "d"} for r in first] == [
        {k: v for k, v in r.items() if k not in newer} for r in recorded]


def newest_run(history: list[dict]) -> list[dict]:
    """The last run's records: a run appends one record per mode, so it is the file's tail up
    to the first mode seen twice (records carry no run id; several runs may share a date)."""
    run: list[dict] = []
    for record in reversed(history):
        if record["mode"] in {r["mode"] for r in run}:
            break
        run.append(record)
    return run


def test_reference_fp8_table_shows_the_newest_run() -> None:
    """The FP8 table (docs/reference.md, "FP8 on a real GPU") is read from the history, newest
    first: the first row of the newest run's date for each mode must show that run's numbers."""
    history = json.loads((RECORDED.parent / "results.json").read_text())
    run = newest_run(history)
    assert {r["mode"] for r in run} == {"off", "storage", "dq"}
    lines = (ROOT / "docs" / "reference.md").read_text().splitlines()
    for record in run:
        row = next(line for line in lines if line.startswith(f"| {record['date']} |")
                   and line.split("|")[2].split()[0] == record["mode"])  # fmt: skip
        cells = [cell.strip().strip("*") for cell in row.split("|")[3:10]]
        expected = [f"{record['step_ms']:.1f}", f"{record['speedup_vs_bf16_eager']:.2f}"]
        if record["cosine"] is not None:
            expected += [f"{record['cosine']:.4f}", f"{record['psnr_db']:.2f}"]
        assert cells[: len(expected)] == expected
        kernel = {"sdpa": "cuDNN (SDPA)", "flash-attention-3 fp8": "FlashAttention-3 FP8",
                  "flash-attention-3 bf16": "FlashAttention-3 bf16"}[record["attention"]]
        assert cells[-1] == kernel  # the attention kernel the run recorded
