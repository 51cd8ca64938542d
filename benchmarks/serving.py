"""Serving throughput: `slimcart serve` one request at a time (--max-batch 1) vs micro-batching
(--max-batch 32 --max-wait-ms 5), for the intent bundle (the cached banking77 baseline and its
ONNX int8 variant), with 16 concurrent clients sending real banking77 test texts, one per request.
Server and clients run on the same machine; modes alternate per round, each server in a fresh process.

    python benchmarks/serving.py                                   # several minutes on 2 cores
    python benchmarks/serving.py --requests 60 --clients 4 --rounds 1 --out /tmp/serving.md  # smoke run

Writes benchmarks/results/serving.md; benchmarks/assemble.py joins it into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import slimcart as sc
from common import CACHE, baseline, markdown_table
from slimcart.data import paths
from slimcart.data.tables import read_table
from slimcart.serving.loadtest import get_json, run_load

BAR = 3.0  # the bar: micro-batching throughput >= 3x one-at-a-time at 16 clients


def models(runs: Path, int8: bool) -> list[tuple[str, Path]]:
    """The cached banking77 baseline (trained once, as benchmarks/run.py does) and its onnx-int8
    variant (run.py's, else compressed here with a quick measurement)."""
    task = sc.load_task("intent", "banking77")
    model = baseline(task)
    found = [("baseline fp32", CACHE / "intent-banking77-full")]
    if not int8:
        return found
    variant = runs / "intent-banking77" / "variants" / "onnx-int8"
    if not (variant / "slimcart.json").is_file():
        variant = runs / "serving" / "intent-banking77" / "variants" / "onnx-int8"
    if not (variant / "slimcart.json").is_file():
        quick = sc.MeasureConfig(batch_sizes=[1], memory=False, deployed=False, throughput_seconds=0.0)
        res = sc.compress(model, task, ["intent/onnx-int8"], baseline_info=model.slimcart_training, measure=quick)
        res.save(variant.parent.parent, overwrite=True)
        res.cleanup()
    return found + [("onnx-int8", variant)]


def test_texts(seed: int = 0) -> list[tuple[bytes, str]]:
    import json

    path = paths.find(["intent/banking77/test.csv", "intent/banking77/test.csv.gz"], "banking77")
    texts = read_table(path)["text"].astype(str).tolist()
    np.random.default_rng(seed).shuffle(texts)
    return [(json.dumps({"text": t}).encode(), "application/json") for t in texts]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(folder: Path, max_batch: int, max_wait_ms: float, bodies, args) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "slimcart", "serve", str(folder), "--port", str(port), "--max-batch",
           str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()}")
            try:
                health = get_json(url, "/health")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        res = run_load(url, bodies, clients=args.clients, requests=args.requests, warmup=args.warmup)
        metrics = get_json(url, "/metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    return {"result": res, "metrics": metrics, "runtime": health["runtime"], "threads": health["threads"],
            "exit": code, "cost": health.get("length_groups")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/serving.md")
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000, help="timed requests per server")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (one-at-a-time, micro-batched)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="model threads (default: the runtime's)")
    ap.add_argument("--no-int8", action="store_true", help="serve the fp32 baseline only")
    args = ap.parse_args()
    t0 = time.time()
    bodies = test_texts()
    modes = [("one at a time", 1, 0.0), ("micro-batching", args.max_batch, args.max_wait_ms)]
    rows, ratios, costs = [], [], []
    for label, folder in models(args.runs, not args.no_int8):
        runs = {m[0]: [] for m in modes}
        for r in range(args.rounds):
            for name, mb, wait in (modes if r % 2 == 0 else modes[::-1]):
                runs[name].append(serve_and_load(folder, mb, wait, bodies, args))
                s = runs[name][-1]["result"].summary()
                print(f"{label} / {name} round {r + 1}: {s['throughput_rps']:.1f} req/s, p50 {s['p50_ms']:.1f} ms, "
                      f"p99 {s['p99_ms']:.1f} ms", flush=True)
        best = {}
        for name, mb, wait in modes:
            pick = sorted(runs[name], key=lambda x: x["result"].throughput)[len(runs[name]) // 2]  # median round
            res, m = pick["result"], pick["metrics"]
            best[name] = res.throughput
            rows.append({"Model": label, "Runtime": pick["runtime"], "Threads": pick["threads"],
                         "Serving": name, "--max-batch / --max-wait-ms": f"{mb} / {wait:g}",
                         "req/s": f"{res.throughput:.1f}", "p50 ms": f"{res.percentile(50):.1f}",
                         "p99 ms": f"{res.percentile(99):.1f}", "mean batch": f"{m['mean_batch_size']:.1f}",
                         "model calls per batch": f"{m.get('model_calls', m['batches']) / max(m['batches'], 1):.2f}",
                         "errors": res.requests - res.ok,
                         "all rounds req/s": ", ".join(f"{x['result'].throughput:.1f}" for x in runs[name]),
                         "exit codes": ", ".join(str(x["exit"]) for x in runs[name])})
        ratios.append((label, folder, best["micro-batching"] / best["one at a time"]))
        cost = runs["micro-batching"][0]["cost"]
        if cost:
            costs.append(f"- {label}: a model call measured at start-up costs {cost['call_overhead_ms']:.2f} ms "
                         f"+ {cost['per_token_us']:.1f} us per padded token")
    lines = [f"- {label} (`{folder}`): micro-batching gives **{x:.2f}x** the throughput of one-at-a-time "
             f"serving ({'meets' if x >= BAR else 'below'} the {BAR:g}x bar)" for label, folder, x in ratios]
    text = ("## Serving: one request at a time vs micro-batching\n\n"
            f"`slimcart serve` on the intent bundle (banking77, MiniLM-L6 fine-tuned), {args.clients} concurrent "
            f"clients (threads, one keep-alive connection each) sending one real banking77 test text per "
            f"request, {args.requests} timed requests after {args.warmup} untimed, per server; the median of "
            f"{args.rounds} round(s), modes alternating. Server and clients share this machine's "
            f"{os.cpu_count()} cores. "
            "Latency is per request, as the client sees it (queueing, batching wait and HTTP included); "
            "mean batch is requests per collected batch as the server counted them; a batch is split into "
            "length groups, one model call each, where the cost model the server measures at start-up "
            "says that is faster than padding every text to the longest (grouping.py):\n\n"
            + "\n".join(costs) + "\n\n"
            + markdown_table(rows) + "\n\n" + "\n".join(lines) + "\n\n"
            + f"Rerun: `python benchmarks/serving.py`. _Run time: {time.time() - t0:.0f} s._\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
