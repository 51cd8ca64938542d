"""`slimcart serve`: real HTTP requests to a server in a subprocess give the answers of
load_bundle().predict (what `slimcart predict` prints), concurrent requests are batched, bad input
gets a 4xx with a message and the server goes on, SIGTERM answers what is in flight and exits 0.
The micro-batcher's ordering, waiting, batch limits and failures are tested on their own."""
import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import slimcart as sc
from slimcart.data.tables import read_table
from slimcart.models import build
from slimcart.serving import load_bundle
from slimcart.serving.batcher import BatcherClosed, MicroBatcher
from tests.test_bundle import _cnn, _image_folder, save_bundle

# ---- the micro-batcher -----------------------------------------------------------------------


def _recording(gate: threading.Event | None = None, fail_on=None):
    batches = []

    def fn(items):
        if gate is not None and "gate" in items:
            gate.wait(10)
        batches.append(list(items))
        if fail_on is not None and fail_on in items:
            raise ValueError(f"bad item in {items}")
        return [f"out:{i}" for i in items]
    return fn, batches


def test_batcher_keeps_order_and_limits_batches():
    gate = threading.Event()
    fn, batches = _recording(gate)
    b = MicroBatcher(fn, max_batch=3, max_wait_ms=200)
    first = b.submit("gate", rows=3)  # a full batch: runs at once, and holds the worker
    while not first.running():
        time.sleep(0.001)
    futs = [b.submit(i) for i in range(7)] + [b.submit("big", rows=5)] + [b.submit(i) for i in (7, 8)]
    gate.set()
    assert [f.result(5) for f in futs] == [f"out:{i}" for i in [*range(7), "big", 7, 8]]
    assert first.result(5) == "out:gate"
    assert batches == [["gate"], [0, 1, 2], [3, 4, 5], [6], ["big"], [7, 8]]  # arrival order, <= 3 rows
    assert b.stats.batches == 6 and b.stats.requests == 11 and b.stats.rows == 3 + 9 + 5
    b.close(5)


def test_batcher_waits_at_most_max_wait():
    fn, batches = _recording()
    b = MicroBatcher(fn, max_batch=100, max_wait_ms=150)
    t0 = time.perf_counter()
    assert b.submit("a").result(5) == "out:a"
    assert 0.14 <= time.perf_counter() - t0 < 3.0
    one = MicroBatcher(fn, max_batch=1, max_wait_ms=10_000)  # one at a time: no waiting
    t0 = time.perf_counter()
    assert one.submit("b").result(5) == "out:b" and time.perf_counter() - t0 < 2.0
    b.close(5), one.close(5)


def test_batcher_failure_fails_only_its_batch_and_close_drains():
    gate = threading.Event()
    fn, batches = _recording(gate, fail_on="bad")
    b = MicroBatcher(fn, max_batch=2, max_wait_ms=1000)
    held = b.submit("gate", rows=2)
    while not held.running():
        time.sleep(0.001)
    x, bad, y, z = (b.submit(i) for i in ("x", "bad", "y", "z"))
    cancelled = b.submit("cancelled")
    cancelled.cancel()
    last = b.submit("w")
    closer = threading.Thread(target=b.close, args=(10,))
    closer.start()  # closing while requests are queued: they are still answered
    time.sleep(0.05)
    with pytest.raises(BatcherClosed):
        b.submit("late")
    gate.set()
    closer.join(10)
    for f in (x, bad):
        with pytest.raises(ValueError, match="bad item"):
            f.result(5)
    assert (y.result(5), z.result(5), last.result(5)) == ("out:y", "out:z", "out:w")
    assert ["cancelled"] not in batches and ["w"] in batches
    assert b.stats.failed_batches == 1 and not b._thread.is_alive()


# ---- bundles and servers ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, *args: str):
        self.port = _free_port()
        self.log = folder.parent / f"{folder.name}-server.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "slimcart", "serve", str(folder), "--port", str(self.port),
                                      "--log-level", "warning", *args], stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=120.0):
        end = time.time() + timeout
        while time.time() < end:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.get("/health")[1]["ready"]:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start: {self.log.read_text()}")

    def request(self, method, path, body=b"", ctype="application/json", headers=None, **kw):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body, {"Content-Type": ctype, **(headers or {})}, **kw)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def post(self, doc=None, raw=None, ctype="application/json"):
        return self.request("POST", "/predict", json.dumps(doc).encode() if raw is None else raw, ctype)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def texts():
    task = sc.load_task("intent", "bitext")
    return task, read_table(task.info["source"])["instruction"].astype(str).tolist()[:2000:50]


@pytest.fixture(scope="module")
def servers(texts, ctr_task, tmp_path_factory):
    """Three tiny bundles, each served by its own process (started together: startup is the slow part)."""
    root = tmp_path_factory.mktemp("serve")
    task = texts[0]
    torch.manual_seed(0)
    spec = {"arch": "text_classifier", "config": {"num_labels": task.info["num_classes"], "encoder": {
        "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 64}}}
    intent = save_bundle(build(spec).eval(), spec, task, root / "intent")
    model, spec = ctr_task.build_baseline(0)
    ctr = save_bundle(model.eval(), spec, ctr_task, root / "ctr")
    shop = _image_folder(root / "shop")
    itask = sc.load_task("product_image", str(shop), image_size=16)
    image = save_bundle(*_cnn(itask), itask, root / "image")
    started = {"intent": Server(intent, "--max-batch", "32", "--max-wait-ms", "30", "--max-items", "50",
                                "--max-body-mb", "0.05"),
               "ctr": Server(ctr, "--max-batch", "64", "--max-wait-ms", "1000"),
               "image": Server(image, "--max-batch", "8")}
    try:
        yield {k: (s.wait_ready(), f) for (k, s), f in zip(started.items(), (intent, ctr, image))} | {"shop": shop}
    finally:
        for s in started.values():
            s.stop()


def _concurrently(fn, jobs, threads=16):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, jobs))


def test_collate_gives_the_tensors_of_one_encode(servers, texts):
    bundle = load_bundle(servers["intent"][1])
    parts = [bundle.encode(texts[1][i:i + 3]) for i in range(0, 12, 3)]
    for got, want in zip(bundle.collate(parts), bundle.encode(texts[1][:12])):
        assert torch.equal(got, want) and got.is_contiguous()
    assert len({p[0].shape[1] for p in parts}) > 1  # the parts had different lengths


def test_intent_answers_match_predict_and_requests_are_batched(servers, texts):
    server, folder = servers["intent"]
    health = server.get("/health")[1]
    assert health["task"] == "intent" and health["runtime"] == "torch" and health["max_batch"] == 32
    got = _concurrently(lambda t: server.post({"text": t}), texts[1])
    assert all(status == 200 for status, _ in got)
    want = load_bundle(folder).predict(texts[1])  # what `slimcart predict` prints for these texts
    answers = [doc["predictions"][0] for _, doc in got]
    assert [a["input"] for a in answers] == want["input"].tolist()
    assert [a["label"] for a in answers] == want["label"].tolist()
    np.testing.assert_allclose([a["score"] for a in answers], want["score"], rtol=0, atol=1e-5)
    status, doc = server.post({"texts": texts[1][:5]})
    assert status == 200 and [p["label"] for p in doc["predictions"]] == want["label"][:5].tolist()
    m = server.get("/metrics")[1]
    assert m["max_batch_size_seen"] > 1 and m["batches"] < m["requests"]  # requests shared model calls
    assert m["latency_ms_p50"] > 0 and m["latency_ms_p99"] >= m["latency_ms_p50"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/metrics?format=prometheus")
    text = conn.getresponse().read().decode()
    assert "slimcart_batches_total" in text and 'slimcart_latency_seconds{quantile="0.99"}' in text


@pytest.mark.parametrize("body, status, needle", [
    (b'{"text": ', 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b'["a"]', 422, "JSON object"),
    (b"{}", 422, "exactly one of"),
    (b'{"text": 3}', 422, "must be a string"),
    (b'{"texts": "abc"}', 422, "non-empty list"),
    (b'{"texts": ["a", 1]}', 422, "texts[1]"),
    (b'{"text": "a", "lang": "en"}', 422, "Unknown field"),
    (json.dumps({"texts": ["a"] * 51}).encode(), 413, "at most 50"),
    (json.dumps({"text": "x" * 60_000}).encode(), 413, "limit of 0.05 MB"),
])
def test_intent_bad_input_gets_4xx_and_the_server_goes_on(servers, body, status, needle):
    server, _ = servers["intent"]
    got, doc = server.post(raw=body)
    assert got == status and needle in doc["error"], doc
    assert server.post({"text": "cancel my order"})[0] == 200


def test_other_bad_requests(servers):
    server, _ = servers["intent"]
    chunks = (b"x" * 20_000 for _ in range(10))  # chunked, no Content-Length: counted as it arrives
    status, doc = server.request("POST", "/predict", chunks, encode_chunked=True)
    assert status == 413 and "limit" in doc["error"]
    assert server.get("/nowhere") == (404, {"error": "Not Found"})
    assert server.get("/predict")[0] == 405
    assert server.post(raw=b"\x89PNG", ctype="image/png")[0] == 415
    m = server.get("/metrics")[1]
    assert m["errors"] >= 12 and m["status"]["413"] >= 3
    assert server.post({"text": "hello"})[0] == 200


def test_ctr_rows_unseen_values_and_bad_rows(servers, ctr_task, tmp_path):
    server, folder = servers["ctr"]
    bundle = load_bundle(folder)
    cols = bundle.preprocessor.columns
    df = read_table(ctr_task.info["source"])[cols].head(24).reset_index(drop=True)
    df.loc[0, "Clothing ID"], df.loc[1, "Class Name"], df.loc[2, "Division Name"] = 987654321, "Spacesuits", None
    df.to_csv(tmp_path / "rows.csv", index=False)
    want = bundle.predict(tmp_path / "rows.csv")  # `slimcart predict --input rows.csv`
    rows = json.loads(df.astype(object).where(df.notna(), None).to_json(orient="records"))
    got = _concurrently(lambda r: server.post({"rows": [r]}), rows, threads=8)
    np.testing.assert_allclose([d["predictions"][0]["probability"] for _, d in got], want["probability"],
                               rtol=0, atol=1e-6)
    status, doc = server.post({"rows": rows[:3]})
    assert status == 200 and [p["row"] for p in doc["predictions"]] == [0, 1, 2]
    dense = bundle.spec["dense"][0]["column"]
    for bad, needle in [({"rows": [{**rows[0], "Colour": "red"}]}, "unknown column(s) 'Colour'"),
                        ({"rows": [{k: v for k, v in rows[0].items() if k != "Clothing ID"}]}, "missing column"),
                        ({"rows": [{**rows[0], "Clothing ID": [1, 2]}]}, "string, number, boolean or null"),
                        ({"rows": [{**rows[0], dense: "many"}]}, "not numeric"),
                        ({"rows": [1]}, "must be an object"),
                        ({"rows": []}, "non-empty list"),
                        ({"row": rows[0]}, "Unknown field(s) 'row'")]:
        status, doc = server.post(bad)
        assert status == 422 and needle in doc["error"], (needle, doc)
    assert server.post({"rows": rows[:1]})[0] == 200


def _multipart(files):
    parts = [b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%s\"\r\n"
             b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (name.encode(), data) for name, data in files]
    return b"".join(parts) + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"


def test_image_upload_base64_and_not_an_image(servers):
    server, folder = servers["image"]
    files = sorted((servers["shop"] / "test").rglob("*.*"))
    want = load_bundle(folder).predict(files)
    status, doc = server.post(raw=_multipart([(f.name, f.read_bytes()) for f in files])[0],
                              ctype=_multipart([])[1])
    assert status == 200 and [p["input"] for p in doc["predictions"]] == [f.name for f in files]
    assert [p["label"] for p in doc["predictions"]] == want["label"].tolist()
    np.testing.assert_allclose([p["score"] for p in doc["predictions"]], want["score"], rtol=0, atol=1e-6)
    status, doc = server.post({"images": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    assert status == 200 and [p["label"] for p in doc["predictions"]] == want["label"].tolist()
    status, doc = server.post(raw=files[0].read_bytes(), ctype="image/png")
    assert status == 200 and doc["predictions"][0]["label"] == want["label"][0]
    for raw, ctype, needle in [(b"not an image", "image/png", "not a readable image"),
                               (_multipart([("x.png", b"nope")])[0], _multipart([])[1], "x.png is not a readable"),
                               (b'{"image": "%%%"}', "application/json", "not valid base64")]:
        status, doc = server.post(raw=raw, ctype=ctype)
        assert status == 422 and needle in doc["error"], doc
    assert server.post(raw=files[0].read_bytes(), ctype="image/png")[0] == 200


def test_model_error_is_a_500_and_the_server_goes_on(servers):
    """In process: a model call that raises answers 500 with its message; the next one works."""
    from slimcart.serving.server import ServeConfig, ServedModel, create_app

    model = ServedModel(servers["intent"][1])
    real, calls = model.run, []

    def flaky(x):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom in the model")
        return real(x)
    model.run = flaky
    app = create_app(model, ServeConfig(max_batch=4))
    first = asyncio.run(_asgi(app, b'{"text": "hello"}'))
    assert first[0] == 500 and "boom in the model" in first[1]["error"]
    assert asyncio.run(_asgi(app, b'{"text": "hello"}'))[0] == 200
    app.state.batcher.close(5)


async def _asgi(app, body: bytes):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("test", 1), "server": ("test", 80)}
    sent, out = [], []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        out.append(message)
    await app(scope, receive, send)
    return out[0]["status"], json.loads(b"".join(m.get("body", b"") for m in out[1:]))


def test_loadtest_command_and_serve_errors(servers, texts, tmp_path):
    from typer.testing import CliRunner

    from slimcart.cli import app
    from slimcart.errors import UsageError

    server, _ = servers["intent"]
    (tmp_path / "texts.txt").write_text("\n".join(texts[1][:10]) + "\n")
    res = CliRunner().invoke(app, ["loadtest", f"http://127.0.0.1:{server.port}", "--input", str(tmp_path / "texts.txt"),
                                   "--clients", "4", "--requests", "40", "--warmup", "4", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] == 40 and doc["throughput_rps"] > 0 and doc["p99_ms"] >= doc["p50_ms"] > 0
    assert doc["server"]["batched_requests"] >= 44
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing")])
    assert isinstance(res.exception, UsageError) and "not a model folder" in res.exception.message
    res = CliRunner().invoke(app, ["loadtest", f"http://127.0.0.1:{_free_port()}", "--input", str(tmp_path / "texts.txt")])
    assert isinstance(res.exception, UsageError) and "Cannot reach the server" in res.exception.message


def test_sigterm_answers_in_flight_requests_and_exits_0(servers, ctr_task):
    server, folder = servers["ctr"]  # --max-wait-ms 1000: requests wait in the queue when the signal comes
    df = read_table(ctr_task.info["source"])[load_bundle(folder).preprocessor.columns].head(6)
    rows = json.loads(df.to_json(orient="records"))
    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(server.post, {"rows": [r]}) for r in rows]
        end = time.time() + 20
        while (queued := server.get("/metrics")[1]["queued"]) < len(rows) and time.time() < end:
            time.sleep(0.01)
        assert queued == len(rows)
        os.kill(server.proc.pid, signal.SIGTERM)
        answers = [f.result(30) for f in futs]
    assert [status for status, _ in answers] == [200] * len(rows)
    assert server.proc.wait(30) == 0
    with pytest.raises(OSError):
        server.get("/health")


def test_length_groups_are_the_cheapest_split_and_answers_do_not_change(servers, texts):
    """plan_groups is exact for its cost model (checked against every split of a small case), and
    a batch split into length groups answers exactly as one padded call."""
    import itertools

    from slimcart.serving.grouping import CallCost, plan_groups
    from slimcart.serving.server import ServedModel

    lengths, rows = [5, 50, 6, 52, 20], [1, 2, 1, 1, 3]
    cheap_calls = CallCost(overhead_s=1.0, per_token_s=0.1)
    groups = plan_groups(lengths, rows, cheap_calls)
    assert sorted(i for g in groups for i in g) == list(range(5))

    def total(gs):
        return sum(cheap_calls.of(sum(rows[i] for i in g), max(lengths[i] for i in g)) for g in gs)

    order = sorted(range(5), key=lengths.__getitem__)
    every = [[order[a:b] for a, b in zip((0, *cuts), (*cuts, 5))]
             for k in range(5) for cuts in itertools.combinations(range(1, 5), k)]
    assert total(groups) == pytest.approx(min(map(total, every)))
    assert groups == [[0, 2], [4], [1, 3]]
    assert len(plan_groups(lengths, rows, CallCost(overhead_s=100.0, per_token_s=0.1))) == 1  # calls dear: one

    model = ServedModel(servers["intent"][1])
    # measured at start-up; its values are timings (a benchmark's business), so only their form is checked
    assert model.cost is not None and model.cost.per_token_s >= 0 and model.cost.overhead_s >= 0
    model.cost = CallCost(overhead_s=0.0, per_token_s=1.0)  # every length its own call
    some = texts[1]
    jobs = [model.prepare("application/json", json.dumps({"texts": t}).encode(), 10)
            for t in ([some[0]], some[1:4], [" ".join(some[5:8])], [some[8]])]
    assert len({j.inputs[0].shape[1] for j in jobs}) > 1
    split = model.run_batch(jobs)
    assert model.calls > 1
    whole = model.run(model.bundle.collate([j.inputs for j in jobs]))
    np.testing.assert_allclose(np.concatenate(split), whole, atol=1e-5)
    assert ServedModel(servers["ctr"][1]).cost is None
