"""A light load generator for ``slimcart serve``: N client threads, each with one keep-alive
HTTP connection, send request bodies in turn; reports throughput and latency percentiles.

Bodies come from a file: ``.jsonl`` (one JSON request body per line), ``.txt`` (one text per
line: ``{"text": line}``), CSV/parquet (one row per request: ``{"rows": [row]}``) or a folder of
images (each file as the body, with its image Content-Type)."""
from __future__ import annotations

import http.client
import itertools
import json
import mimetypes
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from ..errors import DataError, UsageError


@dataclass
class LoadResult:
    clients: int
    requests: int
    ok: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    status: dict[str, int]

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float | None:
        return float(np.percentile(self.latencies_ms, p)) if self.latencies_ms else None

    def summary(self) -> dict:
        return {"clients": self.clients, "requests": self.requests, "ok": self.ok, "errors": self.requests - self.ok,
                "seconds": round(self.seconds, 3), "throughput_rps": round(self.throughput, 2),
                "p50_ms": self.percentile(50), "p99_ms": self.percentile(99),
                "mean_ms": float(np.mean(self.latencies_ms)) if self.latencies_ms else None, "status": self.status}


def read_bodies(path: str | Path) -> list[tuple[bytes, str]]:
    """(body, content type) per request, from a .jsonl, .txt, CSV/parquet file or an image folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and (mimetypes.guess_type(f.name)[0] or "")
                       .startswith("image/"))
        bodies = [(f.read_bytes(), mimetypes.guess_type(f.name)[0]) for f in files]
    elif not path.is_file():
        raise UsageError(f"--input {path} does not exist.")
    elif path.suffix == ".jsonl":
        bodies = [(line.encode(), "application/json") for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".txt":
        bodies = [(json.dumps({"text": line}).encode(), "application/json")
                  for line in path.read_text().splitlines() if line.strip()]
    else:
        from ..data.tables import read_table

        df = read_table(path)
        df = df.astype(object).where(df.notna(), None)
        bodies = [(json.dumps({"rows": [row]}, default=str).encode(), "application/json")
                  for row in df.to_dict("records")]
    if not bodies:
        raise DataError(f"--input {path} holds no requests.")
    return bodies


def _connect(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"{url} is not an http://HOST:PORT address.")
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=60), parts.path.rstrip("/")


def get_json(url: str, path: str) -> dict:
    conn, base = _connect(url)
    try:
        conn.request("GET", base + path)
        return json.loads(conn.getresponse().read())
    except OSError as exc:
        raise UsageError(f"Cannot reach the server at {url}: {exc}.",
                         "Start it with `slimcart serve FOLDER`, and check the address.") from None
    finally:
        conn.close()


def run_load(url: str, bodies: list[tuple[bytes, str]], clients: int = 16, requests: int = 2000,
             warmup: int = 0) -> LoadResult:
    """Send ``requests`` bodies (cycling through ``bodies``) from ``clients`` threads, after
    ``warmup`` untimed ones; each thread keeps one connection open."""
    get_json(url, "/health")
    counter = itertools.count()
    lat: list[float] = []
    status: dict[str, int] = {}
    lock = threading.Lock()
    failures: list[str] = []

    def client(total: int, record: bool) -> None:
        conn, base = _connect(url)
        mine, codes = [], {}
        try:
            while (i := next(counter)) < total:
                body, ctype = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", base + "/predict", body, {"Content-Type": ctype})
                    resp = conn.getresponse()
                    resp.read()
                    code = str(resp.status)
                except (OSError, http.client.HTTPException) as exc:
                    code = type(exc).__name__
                    conn.close()
                    conn, base = _connect(url)
                if code == "200":
                    mine.append((time.perf_counter() - t0) * 1000.0)
                codes[code] = codes.get(code, 0) + 1
        except Exception as exc:  # noqa: BLE001 - reported after the run
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            if record:
                with lock:
                    lat.extend(mine)
                    for k, v in codes.items():
                        status[k] = status.get(k, 0) + v

    def wave(total: int, record: bool) -> float:
        nonlocal counter
        counter = itertools.count()
        threads = [threading.Thread(target=client, args=(total, record), daemon=True) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    if warmup:
        wave(warmup, False)
    seconds = wave(requests, True)
    if failures:
        raise RuntimeError(f"load test clients failed: {failures[0]}")
    return LoadResult(clients, requests, status.get("200", 0), seconds, lat, status)
