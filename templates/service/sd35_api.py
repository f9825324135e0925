#!/usr/bin/env python3
"""The team's SD3.5 FP8 generation service: one model, loaded once, shared over HTTP.

Runs in the team image under systemd (provision's `service` step): members reach it through
their SSH connection (the port is published on the host's loopback unless the inventory says
otherwise) and try prompts from a browser or a script instead of each loading 16 GB.

  GET  /health    200 when ready, 503 while loading (or when loading failed): device, GPU,
                  model, FP8 mode requested and applied, compiled, the queue.
  POST /generate  JSON {prompt, negative_prompt, steps, height, width, seed, guidance} ->
                  image/png, with inference.py's metrics as JSON in the X-Metrics header.

Why it is built this way:
- The pipeline code is inference.py's (`load_pipeline`, `generate`), imported from beside this
  file, not a second copy: the service generates what F5 and `provision verify` generate.
- One GPU, one generation at a time: a single worker thread runs loading and every request,
  so two requests never compete for GPU memory. Requests waiting for it are bounded
  (SD35_MAX_QUEUE): one more is refused at once with 429 and a Retry-After of the expected
  wait, instead of piling up until clients time out.
- Requests are checked before they reach the GPU: sizes positive multiples of 16 (VAE 8x,
  patch 2) no larger than the model's position-embedding grid (a larger latent cannot be
  embedded at all), at most MAX_PIXELS pixels, and on a GPU, when its turn comes, no more
  than the free memory holds (`memory_refusal`: 422), steps 1..MAX_STEPS, bounded prompts,
  finite guidance. A failure a request still causes (CUDA out of memory, a diffusers error)
  answers that request (503 / 500, one line) and the process goes on serving: no request can
  take it down.

Settings, from the environment (the service's env file): SD35_MODEL (tiny|medium|large or an
HF id in the shared cache), SD35_FP8 (off|storage|dq), SD35_MAX_QUEUE, SD35_PORT.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))  # inference.py and sd35/ lie beside
import inference

MAX_STEPS = 100
MAX_PROMPT = 2000  # characters; the text encoders read 77 CLIP / 256 T5 tokens of it anyway
MAX_PIXELS = 2048 * 2048  # beyond SD3.5's trained sizes; larger is memory, not quality
# GPU memory a generation needs beyond what the loaded model holds grows with its pixels
# (flash attention is linear in tokens, the VAE decoder's activations in pixels). Until this
# process has measured its own (each generation's peak, the warm-up's first): 2.6 KiB per pixel,
# SD3.5 Large on an H200 at 1024², bf16 and dq alike (bench/results/fp8-h200: peak minus the
# transformer's weights, 2.7-2.9 GiB).
PRIOR_BYTES_PER_PIXEL = 2.6 * 1024
MEMORY_MARGIN = 1.25  # what the linear estimate misses: fragmentation, the PNG's encoding
WARM_UP = {"prompt": "warm-up", "steps": 2}


@dataclass(frozen=True)
class Settings:
    model: str = "large"
    fp8: str = "dq"
    max_queue: int = 4

    @classmethod
    def from_env(cls) -> Settings:
        return cls(model=os.environ.get("SD35_MODEL", cls.model),
                   fp8=os.environ.get("SD35_FP8", cls.fp8),
                   max_queue=int(os.environ.get("SD35_MAX_QUEUE", cls.max_queue)))


class GenerateRequest(BaseModel):
    """POST /generate's body: every field bounded, unknown fields refused (a typo is not
    silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT)
    steps: int = Field(default=28, ge=1, le=MAX_STEPS)
    height: int = Field(default=1024, ge=16, multiple_of=16)
    width: int = Field(default=1024, ge=16, multiple_of=16)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    guidance: float = Field(default=3.5, ge=0.0, le=30.0, allow_inf_nan=False)


@dataclass
class Service:
    """The loaded model and the one worker that uses it; every field read under `lock`."""

    settings: Settings
    worker: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sd35-gpu"))
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: str = "loading"  # loading | ready | failed
    error: str | None = None
    loaded: inference.Loaded | None = None
    admitted: int = 0  # the request being generated plus those waiting for it
    generated: int = 0
    seconds_per_request: float = 0.0  # the last generation's time, for Retry-After
    bytes_per_pixel: float = PRIOR_BYTES_PER_PIXEL  # the most a generation has needed

    def load(self) -> None:
        """On the worker thread: build the pipeline, and compile it with one small generation
        when it compiles (the first compiled step takes minutes; no member should wait it)."""
        try:
            args = inference.parse_args(["--model", self.settings.model,
                                         "--fp8", self.settings.fp8])
            loaded = inference.load_pipeline(args)
            if loaded.compiled:
                side = min(1024, self.max_side(loaded))
                self.generate(loaded, height=side, width=side, seed=0, guidance=3.5, **WARM_UP)
        except BaseException as exc:  # reported on /health; the process stays up
            traceback.print_exc()
            with self.lock:
                self.status, self.error = "failed", one_line(exc)
            return
        with self.lock:
            self.loaded, self.status = loaded, "ready"
        print(f"sd35-api: ready in {time.perf_counter() - loaded.started:.1f} s "
              f"({loaded.model}, --fp8 {loaded.fp8_applied}, compiled {loaded.compiled})",
              file=sys.stderr, flush=True)

    @staticmethod
    def max_side(loaded: inference.Loaded) -> int:
        """The largest height or width the transformer can embed (its position grid)."""
        config = loaded.pipe.transformer.config
        return config.pos_embed_max_size * config.patch_size * loaded.pipe.vae_scale_factor

    def admit(self) -> bool:
        with self.lock:
            if self.admitted > self.settings.max_queue:
                return False
            self.admitted += 1
            return True

    def release(self, _future: concurrent.futures.Future[Any]) -> None:
        """The request's slot is free: it was generated, failed, or cancelled before it ran
        (its client went away): a done-callback, so no way out of the queue leaks a slot."""
        with self.lock:
            self.admitted -= 1

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times the last generation."""
        with self.lock:
            return max(1, math.ceil(self.admitted * self.seconds_per_request))

    def run(self, request: GenerateRequest) -> tuple[bytes, dict[str, Any]]:
        """On the worker thread: one image, as PNG bytes, and its metrics."""
        assert self.loaded is not None
        # Here, not when the request arrives: while another generation runs, its activations
        # hold memory this one will find free when its turn comes.
        if refusal := self.memory_refusal(self.loaded, request.height, request.width):
            raise TooLarge(refusal)
        started = time.perf_counter()
        image, metrics = self.generate(self.loaded, **request.model_dump())
        png = io.BytesIO()
        image.save(png, format="PNG")
        with self.lock:
            self.generated += 1
            self.seconds_per_request = time.perf_counter() - started
        return png.getvalue(), metrics

    def generate(self, loaded: inference.Loaded, **request: Any) -> tuple[Any, dict[str, Any]]:
        """`inference.generate`, learning from its peak memory what a pixel needs."""
        before = allocated(loaded)
        image, metrics = inference.generate(loaded, **request)
        self.learn(metrics, before)
        return image, metrics

    def learn(self, metrics: dict[str, Any], allocated_before: int) -> None:
        """A GPU generation's peak memory over what was allocated when it started, per pixel:
        kept if larger than what earlier ones needed."""
        if not str(metrics.get("peak_mem_kind")).startswith("cuda_max_memory_allocated"):
            return  # a CPU run's peak is the process's RSS: nothing about a GPU
        used = metrics["peak_mem_gib"] * 2**30 - allocated_before
        with self.lock:
            self.bytes_per_pixel = max(self.bytes_per_pixel,
                                       used / (metrics["height"] * metrics["width"]))

    def memory_refusal(self, loaded: inference.Loaded, height: int, width: int) -> str | None:
        """Why a height x width image would not fit in the GPU's memory now (None: it fits,
        or the model runs on the CPU). Free memory is read at each request: members' own
        containers share the GPU."""
        if loaded.device.type != "cuda":
            return None
        import torch

        free, _total = torch.cuda.mem_get_info(loaded.device)
        # Memory this process's allocator holds but no tensor uses is free for it too.
        free += torch.cuda.memory_reserved(loaded.device) - allocated(loaded)
        with self.lock:
            per_pixel = self.bytes_per_pixel
        return too_large_for(height, width, per_pixel, free)

    def health(self) -> dict[str, Any]:
        with self.lock:
            loaded = self.loaded
            report: dict[str, Any] = {
                "status": self.status, "error": self.error, "model": self.settings.model,
                "fp8_requested": self.settings.fp8,
                "queue": {"admitted": self.admitted, "max_queue": self.settings.max_queue},
                "generated": self.generated,
            }
        if loaded is not None:
            import torch

            report.update({
                "device": str(loaded.device),
                "gpu": torch.cuda.get_device_name(loaded.device)
                if loaded.device.type == "cuda" else None,
                "weights": loaded.weights,
                "fp8_applied": loaded.fp8_applied,
                "fp8_fallback_reason": loaded.fp8_fallback_reason,
                "compiled": loaded.compiled,
                "load_s": loaded.load_s,
                "limits": {"max_side": self.max_side(loaded), "max_pixels": MAX_PIXELS,
                           "max_steps": MAX_STEPS, "size_multiple": 16},
            })
        return report


class TooLarge(Exception):
    """A request the GPU's free memory cannot hold: refused before it runs (a 422)."""


def allocated(loaded: inference.Loaded) -> int:
    """GPU memory this process's tensors hold now (0 on the CPU)."""
    if loaded.device.type != "cuda":
        return 0
    import torch

    return torch.cuda.memory_allocated(loaded.device)


def too_large_for(height: int, width: int, bytes_per_pixel: float, free_bytes: int) -> str | None:
    """The refusal of an image whose estimated generation memory exceeds what is free."""
    needed = height * width * bytes_per_pixel * MEMORY_MARGIN
    if needed <= free_bytes:
        return None
    side = int(math.sqrt(free_bytes / (bytes_per_pixel * MEMORY_MARGIN))) // 16 * 16
    return (f"{height}x{width} needs about {needed / 2**30:.1f} GiB of GPU memory and "
            f"{free_bytes / 2**30:.1f} GiB is free on this GPU now: ask for fewer pixels "
            f"(about {side}x{side} fits)")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's list of problems as one sentence; a body that is not JSON at all is a 400."""
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return 400, "the body is not valid JSON: " + "; ".join(
            str(p.get("ctx", {}).get("error", p.get("msg"))) for p in problems)
    parts = []
    for problem in problems:
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {problem.get('msg')}")
    return 422, "; ".join(parts)


def create_app(settings: Settings) -> FastAPI:
    """The API around one Service; loading starts with the app (its lifespan)."""
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.worker.submit(service.load)
        yield
        service.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="SD3.5 FP8 generation service", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(*validation_message(exc))

    @app.get("/health")
    async def health() -> JSONResponse:
        report = service.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ready" else 503)

    @app.post("/generate", response_model=None)
    async def generate(request: GenerateRequest) -> Response:
        loaded = service.loaded
        if loaded is None:
            if service.status == "failed":
                return error(503, f"the model failed to load: {service.error}")
            return error(503, "the model is still loading; see /health", **{"Retry-After": "30"})
        side = service.max_side(loaded)
        if max(request.height, request.width) > side:
            return error(422, f"height and width must be at most {side} for {loaded.model} "
                              f"(its position-embedding grid), not {request.height}x"
                              f"{request.width}")
        if request.height * request.width > MAX_PIXELS:
            return error(422, f"height x width must be at most {MAX_PIXELS} pixels, not "
                              f"{request.height * request.width}")
        if not service.admit():
            return error(429, f"the queue is full ({settings.max_queue} waiting behind the one "
                              "generating); retry later",
                         **{"Retry-After": str(service.retry_after())})
        future = service.worker.submit(service.run, request)
        future.add_done_callback(service.release)
        try:
            png, metrics = await asyncio.wrap_future(future)
        except TooLarge as exc:
            return error(422, str(exc))
        except Exception as exc:  # one request's failure, never the process's
            traceback.print_exc()
            if type(exc).__name__ == "OutOfMemoryError":
                import torch

                torch.cuda.empty_cache()
                return error(503, f"not enough GPU memory for {request.height}x{request.width}"
                                  f": try a smaller image ({one_line(exc)})")
            return error(500, f"generation failed: {one_line(exc)}")
        return Response(png, media_type="image/png",
                        headers={"X-Metrics": json.dumps(metrics, separators=(",", ":"))})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SD3.5 FP8 generation service")
    parser.add_argument("--host", default="0.0.0.0", help="inside its container: all of it")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SD35_PORT", "8000")))
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(Settings.from_env()), host=args.host, port=args.port,
                log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
