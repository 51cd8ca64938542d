"""The `slimcart serve` and `slimcart loadtest` commands (registered onto cli.app by cli.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UsageError

out = Console(width=None if sys.stdout.isatty() else 200)


def serve(model_dir: Path = typer.Argument(..., help="A model folder saved by slimcart (with preprocess.json)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: all interfaces)."),
          port: int = typer.Option(8000, "--port", min=1, max=65535),
          max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most rows in one model call; 1 serves "
                                        "requests one at a time."),
          max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="How long the oldest queued "
                                            "request waits for others to fill a batch."),
          runtime: Optional[str] = typer.Option(None, "--runtime", help="A runtime that serves the folder "
                                                "(`slimcart runtimes`; default: onnxruntime when the folder "
                                                "holds an ONNX model, else torch)."),
          threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads of the model "
                                                "(default: the runtime's default)."),
          max_items: int = typer.Option(256, "--max-items", min=1, help="Most texts, rows or images per request."),
          max_body_mb: float = typer.Option(10.0, "--max-body-mb", min=0.001, help="Largest request body."),
          length_groups: bool = typer.Option(True, "--length-groups/--no-length-groups", help=(
              "Text: split a collected batch into length groups (one model call each) where the cost "
              "measured at start-up says it is faster than padding all to the longest.")),
          log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug.")
          ) -> None:
    """Serve a saved model over HTTP, batching concurrent requests into one model call.

    POST /predict (intent: {"text": ...} or {"texts": [...]}; ctr: {"rows": [{column: value}]};
    product_image: {"image": BASE64}, a multipart file or the image as the body), GET /health,
    GET /metrics (JSON; ?format=prometheus for Prometheus text). SIGTERM/SIGINT: graceful stop.

    Example: slimcart serve runs/intent/variants/onnx-int8 --port 8000 --max-batch 32 --max-wait-ms 5
    """
    from .serving.server import ServeConfig, run_server

    if not (model_dir / "slimcart.json").is_file():
        raise UsageError(f"{model_dir} is not a model folder saved by slimcart (no slimcart.json).")
    cfg = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_items=max_items, max_body_mb=max_body_mb,
                      length_groups=length_groups)
    run_server(model_dir, host, port, cfg, runtime=runtime, threads=threads, log_level=log_level)


def loadtest(url: str = typer.Argument(..., help="The server, e.g. http://127.0.0.1:8000"),
             input_path: Path = typer.Option(..., "--input", help=".jsonl (one request body per line), .txt "
                                             "(one text per line), CSV/parquet (one row per request) or a "
                                             "folder of images."),
             clients: int = typer.Option(16, "--clients", min=1, help="Concurrent clients (threads)."),
             requests: int = typer.Option(2000, "--requests", min=1, help="Timed requests, all clients together."),
             warmup: int = typer.Option(50, "--warmup", min=0, help="Untimed requests sent first."),
             as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Drive a running `slimcart serve` with concurrent clients; report throughput and latency.

    Example: slimcart loadtest http://127.0.0.1:8000 --clients 16 --requests 2000 --input texts.txt
    """
    from .serving.loadtest import get_json, read_bodies, run_load

    res = run_load(url, read_bodies(input_path), clients=clients, requests=requests, warmup=warmup)
    doc = {**res.summary(), "server": get_json(url, "/metrics")}
    if as_json:
        out.print_json(json.dumps(doc))
        return
    s, m = res.summary(), doc["server"]
    table = Table("clients", "requests", "errors", "req/s", "p50 ms", "p99 ms", "server mean batch")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    table.add_row(str(s["clients"]), str(s["requests"]), str(s["errors"]), f"{s['throughput_rps']:.1f}",
                  fmt(s["p50_ms"]), fmt(s["p99_ms"]), f"{m.get('recent_mean_batch_size', 0):.2f}")
    out.print(table)
    if s["errors"]:
        out.print(f"status counts: {s['status']}")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(loadtest)
