"""The generation service's API in-process (FastAPI's TestClient), on the CPU with the tiny
random-weight SD3.5: real loading through inference.py, real PNGs, real refusals."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, require_modules

require_modules("fastapi", "httpx", "torch", "diffusers")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(REPO / "templates" / "workspace"))
sys.path.insert(0, str(REPO / "templates" / "service"))
import sd35_api  # noqa: E402

SMALL = {"prompt": "a red cube on a table", "steps": 2, "height": 64, "width": 96, "seed": 3}


def ready(client: TestClient, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get("/health")
        if answer.json()["status"] != "loading":
            return answer.json()
        time.sleep(0.2)
    raise AssertionError("the model did not load")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = sd35_api.create_app(sd35_api.Settings(model="tiny", fp8="storage", max_queue=0))
    with TestClient(app) as client:
        yield client


def test_health_says_loading_then_ready_with_what_was_applied(client: TestClient) -> None:
    report = ready(client)
    assert client.get("/health").status_code == 200
    assert report["status"] == "ready" and report["error"] is None
    assert (report["model"], report["device"], report["gpu"]) == ("tiny", "cpu", None)
    assert report["fp8_requested"] == report["fp8_applied"] == "storage"
    assert report["compiled"] is False
    assert report["limits"]["max_side"] == 1024  # tiny: a 64-patch grid, patch 2, VAE 8x
    assert report["queue"] == {"admitted": 0, "max_queue": 0}


def test_generate_returns_a_png_and_inference_metrics(client: TestClient) -> None:
    ready(client)
    answer = client.post("/generate", json={**SMALL, "negative_prompt": "blurry",
                                            "guidance": 4.0})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(answer.content)) as png:
        assert png.format == "PNG" and png.size == (96, 64)
        assert len([n for n in png.convert("L").histogram() if n]) > 10  # not a flat fill
    metrics = json.loads(answer.headers["x-metrics"])
    assert metrics["fp8_applied"] == "storage" and metrics["fp8_linear_layers"] > 0
    assert (metrics["height"], metrics["width"], metrics["steps"], metrics["seed"]) == (
        64, 96, 2, 3)
    assert metrics["latents_shape"] == [1, 16, 8, 12]
    for key in ("step_ms_mean", "denoise_s", "decode_s", "total_s", "peak_mem_gib", "load_s"):
        assert metrics[key] is not None, key
    again = client.post("/generate", json={**SMALL, "negative_prompt": "blurry",
                                           "guidance": 4.0})
    assert again.content == answer.content  # one seed, one image


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"prompt": "a cat", "steps": ', 400, "not valid JSON"),
    (b"[1, 2]", 422, "body:"),
    (b'{"steps": 4}', 422, "prompt: Field required"),
    (b'{"prompt": ""}', 422, "prompt: String should have at least 1 character"),
    (b'{"prompt": "a", "steps": -3}', 422, "steps: Input should be greater than or equal to 1"),
    (b'{"prompt": "a", "steps": 101}', 422, "steps: Input should be less than or equal to 100"),
    (b'{"prompt": "a", "height": 100}', 422, "height: Input should be a multiple of 16"),
    (b'{"prompt": "a", "width": 1000}', 422, "width: Input should be a multiple of 16"),
    (b'{"prompt": "a", "width": 10000}', 422, "at most 1024 for tiny (its position-embedding "
                                              "grid), not 1024x10000"),
    (b'{"prompt": "a", "width": 10000, "height": 10000}', 422, "not 10000x10000"),
    (b'{"prompt": "a", "guidance": NaN}', 422, "guidance:"),
    (b'{"prompt": "a", "sampler": "euler"}', 422, "sampler: Extra inputs are not permitted"),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_service_stays_up(
        client: TestClient, body: bytes, status: int, message: str) -> None:
    ready(client)
    answer = client.post("/generate", content=body,
                         headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert client.get("/health").json()["status"] == "ready"


def test_a_full_queue_is_429_with_retry_after(client: TestClient) -> None:
    """max_queue 0: one generation at a time, and nothing waits behind it."""
    ready(client)
    slow = {**SMALL, "steps": 60, "height": 256, "width": 256}
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(
        answer=client.post("/generate", json=slow)))
    thread.start()
    deadline = time.monotonic() + 30
    while client.get("/health").json()["queue"]["admitted"] == 0:
        assert time.monotonic() < deadline, "the first request never started"
        time.sleep(0.01)
    refused = client.post("/generate", json=SMALL)
    thread.join()
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == ("the queue is full (0 waiting behind the one "
                                       "generating); retry later")
    assert first["answer"].status_code == 200
    assert client.get("/health").json()["queue"]["admitted"] == 0  # the slot came back
    assert client.post("/generate", json=SMALL).status_code == 200


def test_a_failing_generation_answers_500_and_the_next_one_works(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    ready(client)
    real = sd35_api.inference.generate
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return real(*args, **kwargs)

    monkeypatch.setattr(sd35_api.inference, "generate", fail_once)
    failed = client.post("/generate", json=SMALL)
    assert failed.status_code == 500
    assert failed.json()["error"] == ("generation failed: RuntimeError: CUDA error: an illegal "
                                      "memory access was encountered")
    assert client.post("/generate", json=SMALL).status_code == 200


def test_a_model_that_cannot_load_is_reported_not_fatal(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    app = sd35_api.create_app(sd35_api.Settings(model="org/not-in-the-cache", fp8="off"))
    with TestClient(app) as client:
        report = ready(client)
        assert report["status"] == "failed" and "not-in-the-cache" in report["error"]
        assert client.get("/health").status_code == 503
        answer = client.post("/generate", json=SMALL)
        assert answer.status_code == 503 and "failed to load" in answer.json()["error"]


def test_an_image_larger_than_the_free_gpu_memory_is_refused_with_a_size_that_fits() -> None:
    """The estimate: pixels x the most a generation needed per pixel, with a margin."""
    per_pixel = sd35_api.PRIOR_BYTES_PER_PIXEL
    needed_1024 = 1024 * 1024 * per_pixel * sd35_api.MEMORY_MARGIN
    assert sd35_api.too_large_for(1024, 1024, per_pixel, int(needed_1024) + 1) is None
    refusal = sd35_api.too_large_for(2048, 2048, per_pixel, int(needed_1024) + 1)
    assert refusal and refusal.startswith(
        "2048x2048 needs about 13.0 GiB of GPU memory and 3.3 GiB is free on this GPU now")
    suggested = int(refusal.rsplit("about ", 1)[1].split("x")[0])
    assert suggested % 16 == 0 and 768 < suggested <= 1024
    assert sd35_api.too_large_for(suggested, suggested, per_pixel, int(needed_1024) + 1) is None


def test_a_gpu_generation_teaches_its_memory_per_pixel_and_a_cpu_one_does_not() -> None:
    """On the peak inference.py recorded on the lent H200 (dq, Large, 1024²): 2.74 GiB over
    what was allocated before (the transformer) is ~2.8 KiB per pixel, above the prior, so it
    is kept; a CPU run's peak (its RSS) says nothing about a GPU."""
    recorded = json.loads((REPO / "bench" / "results" / "fp8-h200" / "2026-11-22" / "run.json")
                          .read_text())
    metrics = next(r["metrics"] for r in recorded["runs"] if r["label"] == "dq-warm")
    service = sd35_api.Service(sd35_api.Settings(model="large", fp8="dq", max_queue=1))
    service.learn(metrics, allocated_before=int(metrics["transformer_weights_gib"] * 2**30))
    expected = (metrics["peak_mem_gib"] - metrics["transformer_weights_gib"]) * 2**30 / 1024**2
    assert service.bytes_per_pixel == pytest.approx(expected)
    assert service.bytes_per_pixel > sd35_api.PRIOR_BYTES_PER_PIXEL
    service.learn({**metrics, "peak_mem_gib": 100.0, "peak_mem_kind": "process_max_rss"}, 0)
    assert service.bytes_per_pixel == pytest.approx(expected)


def test_a_memory_refusal_is_a_422_with_its_message_and_the_service_stays_up(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU has no GPU memory to run out of: the GPU's answer is stood in for here."""
    ready(client)
    service = client.app.state.service
    monkeypatch.setattr(service, "memory_refusal",
                        lambda _loaded, h, w: f"{h}x{w} needs about 9.9 GiB of GPU memory")
    answer = client.post("/generate", json=SMALL)
    assert answer.status_code == 422 and "64x96 needs about 9.9 GiB" in answer.json()["error"]
    monkeypatch.undo()
    assert client.post("/generate", json=SMALL).status_code == 200
