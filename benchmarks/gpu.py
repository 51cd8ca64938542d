"""The GPU paths on one CUDA device: the trained baselines in float32, float16 and bfloat16
(the `half` technique's artifacts), torch.compile (default, and CUDA graphs in float16), and
2:4 semi-structured sparsity on MiniLM's Linear layers; each timed interleaved against float32
eager PyTorch on the same GPU, and scored on the task's full test set.

Two steps, because a GPU machine may have neither the data nor this project's environment:

    python benchmarks/gpu.py prepare .gpu      # here: baselines + test sets packed (~45 MB)
    python benchmarks/gpu.py run .gpu          # on the GPU: writes benchmarks/results/gpu.md

`prepare` packs the cached benchmark baselines (benchmarks/common.py trains them when missing)
with their test split. MiniLM's word-embedding table is cut to the rows its test set uses, and
the ids are renumbered: the same function, exactly, on those inputs, in half the bytes. Latency
runs end to end: inputs copied to the GPU, outputs copied back (what a server pays).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from slimcart.measure import hardware
from slimcart.measure.latency import interleaved
from slimcart.measure.runners import CompiledRunner, TorchRunner
from slimcart.measure.stats import fmt_speedup, speedup
from slimcart.models import registry

TASKS = [("product_image", "fashion-mnist", [1, 256]), ("ctr", "womens-reviews", [1, 4096]),
         ("intent", "banking77", [1, 32, 256])]
WORDS = "encoder.embeddings.word_embeddings.weight"


# ---- prepare (on the machine that has the data and the trained baselines) -------------------

def prepare(out: Path) -> None:
    import slimcart as sc
    from common import baseline
    from safetensors.torch import save_file

    for name, dataset, _ in TASKS:
        task = sc.load_task(name, dataset)
        model = baseline(task)
        spec, state = json.loads(json.dumps(model.slimcart_spec)), dict(model.state_dict())
        data = task.splits["test"]
        inputs = {f"in{i}": t.contiguous() for i, t in enumerate(data.inputs)}
        meta = {"task": name, "dataset": dataset, "rows": len(data), "inputs": len(data.inputs)}
        if name == "product_image":  # uint8 pixels: 4x smaller, rebuilt bit-exactly there
            norm = task.info["normalise"]
            x = inputs["in0"]
            raw = torch.round((x * norm["std"] + norm["mean"]) * 255.0).clamp(0, 255).to(torch.uint8)
            if not torch.equal(((raw.float() / 255.0) - norm["mean"]) / norm["std"], x):
                raise SystemExit("product_image: the pixels do not round-trip through uint8")
            inputs["in0"], meta["normalise"] = raw, norm
        if name == "intent":
            ids = inputs["in0"]
            used = torch.unique(ids)
            remap = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
            remap[used] = torch.arange(len(used))
            inputs["in0"] = remap[ids]
            state[WORDS] = state[WORDS][used].clone()
            spec["config"]["encoder"]["vocab_size"] = len(used)
            meta["vocabulary"] = f"{len(used)} of {len(remap)} word-embedding rows (those in the test set)"
        cpu = task.evaluate(model)
        meta["cpu_float32_metric"] = cpu
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        save_file({**inputs, "labels": data.labels.contiguous()}, str(folder / "data.safetensors"))
        (folder / "spec.json").write_text(json.dumps(spec))
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"{name}: {len(data)} test rows, CPU float32 {cpu}")


# ---- run (on the GPU) -------------------------------------------------------------------------

def load(folder: Path):
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text())
    model = registry.build(json.loads((folder / "spec.json").read_text()))
    registry.load_strict(model, load_file(str(folder / "model.safetensors")), str(folder))
    data = load_file(str(folder / "data.safetensors"))
    inputs = [data[f"in{i}"] for i in range(meta["inputs"])]
    if "normalise" in meta:
        n = meta["normalise"]
        inputs[0] = ((inputs[0].float() / 255.0) - n["mean"]) / n["std"]
    return model.eval(), tuple(inputs), data["labels"].numpy(), meta


def collate(task: str, inputs: tuple) -> tuple:
    if task != "intent":
        return inputs
    ids, mask = inputs
    n = max(1, int(mask.sum(1).max()))
    return ids[:, :n].contiguous(), mask[:, :n].contiguous()


def metric(task: str, out: np.ndarray, labels: np.ndarray) -> str:
    if task == "ctr":
        from sklearn.metrics import roc_auc_score

        return f"AUC {roc_auc_score(labels, out.reshape(-1)):.4f}"
    return f"accuracy {100 * float((out.argmax(1) == labels).mean()):.2f}%"


def two_four(model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """MiniLM's encoder Linear layers 2:4-pruned by magnitude (no fine-tuning) and converted to
    PyTorch's semi-structured sparse float16 tensors on the GPU."""
    import copy

    from slimcart.prune.nm import convert_semi_structured, nm_mask

    m = copy.deepcopy(model)
    names = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and n.startswith("encoder.")]
    mods = dict(m.named_modules())
    with torch.no_grad():
        for n in names:
            mods[n].weight.mul_(nm_mask(mods[n].weight, 2, 4))
    m = m.to("cuda", torch.float16).eval()
    status = convert_semi_structured(m, names)
    return m, status


class Prebuilt(TorchRunner):
    """A model already on the GPU in float16 (the 2:4 one: deepcopy cannot copy sparse weights)."""

    def __init__(self, model):
        super().__init__(torch.nn.Identity(), device="cuda")
        self.model, self.dtype = model, torch.float16


def cases(task: str, model) -> dict:
    c = {"eager float32": TorchRunner(model, device="cuda"),
         "eager float16": TorchRunner(model, device="cuda", dtype="float16"),
         "eager bfloat16": TorchRunner(model, device="cuda", dtype="bfloat16"),
         "compile float32": CompiledRunner(model, device="cuda"),
         "compile float16 + CUDA graphs": CompiledRunner(model, device="cuda", dtype="float16",
                                                         mode="reduce-overhead")}
    if task == "intent":
        sparse, status = two_four(model)
        kept = sum(s == "semi-structured" for s in status.values())
        c[f"2:4 sparse float16 ({kept}/{len(status)} layers; no fine-tuning)"] = Prebuilt(sparse)
    return c


def sparse_kernels() -> list[str]:
    """One Linear layer alone, dense float16 vs 2:4 semi-structured, at MiniLM's shapes and one
    large square: where PyTorch's sparse kernels start to pay."""
    from torch.sparse import to_sparse_semi_structured
    from torch.utils.benchmark import Timer

    from slimcart.prune.nm import nm_mask

    rows = ["| Linear | rows | dense us | 2:4 us | speedup |", "|---|---|---|---|---|"]
    for k, n in [(384, 1536), (1536, 384), (4096, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w = w * nm_mask(w, 2, 4).to(w.dtype)
        ws = to_sparse_semi_structured(w)
        for m in (32, 2048, 16384):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t = [Timer("torch.nn.functional.linear(x, w)", globals={"torch": torch, "x": x, "w": v})
                 .blocked_autorange(min_run_time=0.3).median for v in (w, ws)]
            rows.append(f"| {k}->{n} | {m} | {t[0] * 1e6:.1f} | {t[1] * 1e6:.1f} | {t[0] / t[1]:.2f}x |")
    return rows


def run(folder: Path, out: Path, rounds: int, quick: bool) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("run needs a CUDA device (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    lines = ["## GPU: half precision, torch.compile and 2:4 sparsity", "",
             f"{hardware.summary()}; torch {torch.__version__}, CUDA {torch.version.cuda}.",
             "Latency is end to end (inputs to the GPU, outputs back); speedups are against float32 eager "
             "PyTorch on the same GPU, timed interleaved, with a paired 95% bootstrap interval. "
             f"{rounds} rounds of 3 calls each. Metric: the full test set through the same runner.", ""]
    for name, _, batches in TASKS:
        t0 = time.time()
        model, inputs, labels, meta = load(folder / name)
        limit = 512 if quick else len(labels)
        runners = cases(name, model)
        lines += [f"### {name} ({meta['dataset']}, {meta['rows']} test rows)", "",
                  f"CPU float32 metric (prepare): {meta['cpu_float32_metric']}. "
                  + (f"Vocabulary: {meta['vocabulary']}." if "vocabulary" in meta else ""), ""]
        scores = {}
        for label, r in runners.items():
            try:
                outs = [r(collate(name, tuple(t[i:i + 256] for t in inputs))) for i in range(0, limit, 256)]
                scores[label] = metric(name, np.concatenate(outs), labels[:limit])
            except Exception as exc:  # a path that fails on this GPU/stack is reported, not hidden
                scores[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        ok = {k: r for k, r in runners.items() if not scores[k].startswith("failed")}
        rows = []
        for b in batches:
            x = collate(name, tuple(t[:b] for t in inputs))
            tm = interleaved({k: (r, x, b) for k, r in ok.items()}, rounds=rounds, warmup=5, progress=False)
            base = tm["eager float32"]
            for k in ok:
                s = tm[k].summary()
                sp = "1.00x (baseline)" if k == "eager float32" else fmt_speedup(speedup(base, tm[k]))
                rows.append(f"| {b} | {k} | {s['p50']:.3f} | {b / s['p50'] * 1000:,.0f} | {sp} |")
        lines += ["| variant | metric | slowest first call (compile) s | notes |", "|---|---|---|---|"]
        lines += [f"| {k} | {v} | {max(runners[k].setup_s.values(), default=0):.1f} | {'; '.join(runners[k].notes)} |"
                  for k, v in scores.items()]
        lines += ["", "| batch | variant | p50 ms | rows/s | speedup vs eager float32 |", "|---|---|---|---|---|"]
        lines += rows + ["", f"({time.time() - t0:.0f} s)", ""]
        out.write_text("\n".join(lines))
        print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
    lines += ["### 2:4 semi-structured kernels alone (torch.utils.benchmark, median)", ""] + sparse_kernels()
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.md")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="512 test rows, to check the script")
    a = ap.parse_args()
    if a.step == "prepare":
        prepare(a.folder)
    else:
        run(a.folder, a.out, a.rounds, a.quick)


if __name__ == "__main__":
    main()
