"""An HTTP server for a saved model folder: ``POST /predict``, ``GET /health``, ``GET /metrics``.

Each request body is parsed and preprocessed in a thread of its own (payload.parse, then the
bundle's read and encode), so a bad request fails alone with a 4xx; the encoded requests then
wait in a MicroBatcher, whose worker runs the model once per batch (Bundle.collate pads text to
the batch's longest) and hands each request its rows of the output. Answers have the columns
``slimcart predict`` prints. SIGTERM or SIGINT: stop accepting, answer what was accepted, exit 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import artifact
from ..errors import SlimcartError
from .batcher import BatcherClosed, MicroBatcher
from .grouping import measure_cost, plan_groups
from .bundle import load_bundle
from .payload import BadRequest, example, parse

log = logging.getLogger("slimcart.serve")


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32          # rows per model call; 1 serves requests one at a time
    max_wait_ms: float = 5.0     # how long the oldest queued request waits for others
    max_items: int = 256         # texts, rows or images in one request
    max_body_mb: float = 10.0
    length_groups: bool = True   # text: split a batch by length where the measured cost says it pays
    window: int = 2000           # recent requests behind the latency percentiles of /metrics


@dataclass
class Job:
    inputs: tuple[torch.Tensor, ...]
    names: list[str] | None
    index: Any
    rows: int


class ServedModel:
    """A bundle and the runner of one runtime, loaded (and run once) before the server starts."""

    def __init__(self, folder: str | Path, runtime: str | None = None, threads: int | None = None,
                 length_groups: bool = True):
        if threads:
            torch.set_num_threads(threads)
        self.folder = Path(folder)
        self.bundle = load_bundle(self.folder)
        self.runtime = runtime or self.bundle.default_runtime
        self.run = self.bundle.runner(self.runtime)
        examples = artifact.load_examples(self.folder) if (self.folder / artifact.EXAMPLES).is_file() else None
        if examples:  # warm up, and fail now if the model cannot run
            self.run(tuple(t[:1] for t in examples))
        # text batches are split by length where that is faster (grouping.py); the cost model is
        # measured here, on this runner
        self.cost = None
        if length_groups and examples and self.bundle.spec["kind"] == "text":
            self.cost = measure_cost(self.run, examples[0], examples[1])
        self.calls = 0
        self._encode_lock = threading.Lock()  # a Hugging Face tokenizer is not safe across threads

    def info(self) -> dict[str, Any]:
        return {"model": self.folder.name, "folder": str(self.folder), "task": self.bundle.task,
                "arch": self.bundle.meta.get("model", {}).get("arch"), "format": self.bundle.meta.get("format"),
                "runtime": self.runtime, "threads": torch.get_num_threads(),
                "length_groups": None if self.cost is None else {
                    "call_overhead_ms": round(self.cost.overhead_s * 1e3, 4),
                    "per_token_us": round(self.cost.per_token_s * 1e6, 4)}}

    def prepare(self, content_type: str, body: bytes, max_items: int) -> Job:
        payload = parse(self.bundle, content_type, body, max_items)
        with self._encode_lock:
            items, names = self.bundle.read(payload.raw)
            inputs = self.bundle.preprocessor.encode(items)
        index = items.index if isinstance(items, pd.DataFrame) else None
        return Job(inputs, payload.names or names, index, len(items))

    def run_batch(self, jobs: list[Job]) -> list[np.ndarray]:
        groups = [list(range(len(jobs)))]
        if self.cost is not None and len(jobs) > 1:
            groups = plan_groups([j.inputs[0].shape[1] for j in jobs], [j.rows for j in jobs], self.cost)
        outs: list[np.ndarray | None] = [None] * len(jobs)
        for group in groups:
            out = self.run(self.bundle.collate([jobs[i].inputs for i in group]))
            self.calls += 1
            ends = np.cumsum([jobs[i].rows for i in group])
            for i, part in zip(group, np.split(out, ends[:-1])):
                outs[i] = part
        return outs

    def answer(self, job: Job, logits: np.ndarray) -> list[dict]:
        """The rows ``slimcart predict`` prints: ``input`` (or ``row``), then the outputs."""
        cols = {"input": job.names} if job.names else {
            "row": list(range(job.rows)) if job.index is None else job.index.tolist()}
        cols.update({k: np.asarray(v).tolist() for k, v in self.bundle.outputs(logits).items()})
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


class Metrics:
    def __init__(self, window: int):
        self._lock = threading.Lock()
        self.requests, self.errors, self.status = 0, 0, Counter()
        self.latencies: deque[float] = deque(maxlen=window)
        self.started = time.time()

    def record(self, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests += 1
            self.errors += status >= 400
            self.status[status] += 1
            if status == 200 and seconds is not None:
                self.latencies.append(seconds)

    def snapshot(self, batcher: MicroBatcher) -> dict[str, Any]:
        with self._lock:
            lat = np.array(self.latencies) * 1000.0
            doc = {"requests": self.requests, "errors": self.errors,
                   "status": {str(k): v for k, v in sorted(self.status.items())}}
        q = {f"latency_ms_p{p}": float(np.percentile(lat, p)) if len(lat) else None for p in (50, 90, 99)}
        return {**doc, **batcher.stats.as_dict(), "queued": batcher.queued, **q, "latency_window": len(lat),
                "uptime_s": round(time.time() - self.started, 1)}


def prometheus(doc: dict[str, Any]) -> str:
    lines = []
    for key, name, kind in (("requests", "requests_total", "counter"), ("errors", "errors_total", "counter"),
                            ("batches", "batches_total", "counter"), ("mean_batch_size", "batch_size_mean", "gauge"),
                            ("queued", "queued_requests", "gauge")):
        lines += [f"# TYPE slimcart_{name} {kind}", f"slimcart_{name} {doc[key]}"]
    lines.append("# TYPE slimcart_latency_seconds summary")
    for p in (50, 90, 99):
        v = doc[f"latency_ms_p{p}"]
        lines.append(f'slimcart_latency_seconds{{quantile="{p / 100:g}"}} {"NaN" if v is None else v / 1000.0}')
    return "\n".join(lines) + "\n"


def _error(status: int, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, **({"hint": hint} if hint else {})}, status_code=status)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before it is read (by its Content-Length),
    or as soon as the bytes received pass the limit (a chunked body)."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:
            if scope["path"] == "/predict":
                self.metrics.record(413)
            return await self._too_large()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BadRequest(413, *self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> tuple[str, str]:
        return (f"The request body is over this server's limit of {self.max_bytes / 2**20:.3g} MB.",
                "Send fewer items per request, or start the server with a higher --max-body-mb.")

    def _too_large(self):
        return _error(413, *self._message())


def create_app(model: ServedModel, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    batcher = MicroBatcher(model.run_batch, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms)
    metrics = Metrics(cfg.window)
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["ready"] = True
        yield
        state["ready"] = False
        await run_in_threadpool(batcher.close)  # answers what is still queued

    app = FastAPI(title="slimcart", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_body_mb * 2**20), metrics=metrics)
    app.state.batcher, app.state.metrics = batcher, metrics

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        try:
            body = await request.body()
            job = await run_in_threadpool(model.prepare, request.headers.get("content-type", ""), body,
                                          cfg.max_items)
            logits = await asyncio.wrap_future(batcher.submit(job, job.rows))
            answer = {"predictions": model.answer(job, logits)}
        except BadRequest as exc:
            metrics.record(exc.status)
            return _error(exc.status, exc.message, exc.hint or f"Expected: {example(model.bundle)}")
        except SlimcartError as exc:  # the bundle's preprocessing refused the input
            metrics.record(422)
            return _error(422, exc.message, exc.hint)
        except BatcherClosed as exc:
            metrics.record(503)
            return _error(503, str(exc))
        except Exception as exc:  # noqa: BLE001 - the model failed: 500, and the server goes on
            log.exception("predict failed")
            metrics.record(500)
            return _error(500, f"The model failed on this request: {type(exc).__name__}: {str(exc)[:300]}")
        metrics.record(200, time.perf_counter() - t0)
        return JSONResponse(answer)

    @app.get("/health")
    async def health():
        return {**model.info(), "ready": state["ready"], "max_batch": cfg.max_batch,
                "max_wait_ms": cfg.max_wait_ms}

    @app.get("/metrics")
    async def get_metrics(request: Request, format: str = "json"):
        doc = {**metrics.snapshot(batcher), "model_calls": model.calls}
        if format == "prometheus" or "text/plain" in request.headers.get("accept", ""):
            return PlainTextResponse(prometheus(doc), media_type="text/plain; version=0.0.4")
        return JSONResponse(json.loads(json.dumps(doc)))

    return app


def run_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig = ServeConfig(),
               runtime: str | None = None, threads: int | None = None, log_level: str = "info") -> None:
    """Load the model, then serve it until SIGTERM/SIGINT (graceful: queued requests are answered)."""
    model = ServedModel(folder, runtime, threads, cfg.length_groups)
    app = create_app(model, cfg)
    info = model.info()
    print(f"serving {info['folder']} ({info['task']}, {info['runtime']}, {info['threads']} threads, "
          f"max batch {cfg.max_batch}, max wait {cfg.max_wait_ms:g} ms) on http://{host}:{port}", flush=True)
    if info["length_groups"]:
        print("text batches split by length; measured cost of a call: {call_overhead_ms} ms + "
              "{per_token_us} us per padded token".format(**info["length_groups"]), flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=30)
    _GracefulServer(config).run()


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a stop signal ends with exit code 0 after the graceful
    shutdown (uvicorn raises the signal again once it has shut down)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
