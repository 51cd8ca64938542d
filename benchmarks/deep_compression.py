"""Deep Compression (Han, Mao & Dally 2015) on product_image (Fashion-MNIST): pruning, then
k-means weight sharing, then Huffman coding (the .scz archive); bytes and test top-1 at each stage.

Two models: the task's ResNet-small CNN baseline (cached in runs/bench/models; stages: the shipped
recipe product_image/deep-compression) and LeNet-300-100, an MLP 784-300-100-10 trained here
(cached beside it; stages: MLP_STAGES below, the paper's LeNet-300-100 settings).

    python benchmarks/deep_compression.py              # writes benchmarks/results/deep_compression.md
    python benchmarks/deep_compression.py --only mlp --out /tmp/dc.md
    python benchmarks/deep_compression.py --train-scale 0.3    # 30% of every fine-tuning: ~3x faster
    python benchmarks/deep_compression.py --quick --out /tmp/dc.md   # a smoke run: 5% of the fine-tuning

The CNN's recipe fine-tunes about 4 epochs in all (~15 minutes on 2 idle cores); --train-scale
trades accuracy for time (0.3 cost about one more point of top-1 in our runs).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import torch

import slimcart as sc
from slimcart import artifact, registry
from slimcart.models import build
from slimcart.recipe import Recipe, shipped_recipes, technique_name
from slimcart.stage import ModelState, StageContext
from slimcart.storage.archive import read_archive, write_archive
from slimcart.tasks.base import TrainConfig
from slimcart.training import load_trained, save_trained

from common import CACHE, baseline, markdown_table

MLP_SPEC = {"arch": "mlp", "config": {"in_shape": [1, 28, 28], "hidden": [300, 100], "num_classes": 10}}
MLP_TRAIN = TrainConfig(epochs=8, batch_size=128, lr=1e-3, weight_decay=1e-4)
MLP_STAGES = [
    {"type": "gradual_prune", "final_sparsity": 0.92, "steps": 4, "epochs_per_step": 0.75, "final_epochs": 1.0,
     "scope": "global", "lr": 1e-3},
    {"type": "weight_sharing", "bits": 5, "layer_bits": {"hidden.0": 4}, "train": {"epochs": 0.5, "lr": 1e-4}},
]
WHAT = {"fold_bn": "BatchNorm folded into the convolutions", "gradual_prune": "pruned: sparse, relative indices",
        "magnitude_prune": "pruned: sparse, relative indices", "weight_sharing": "+ shared: codebook + packed indices"}


def mlp_baseline(task, quick: bool):
    folder = CACHE / f"{task.name}-{task.dataset}-lenet-300-100{'-quick' if quick else ''}"
    if (folder / "slimcart.json").is_file():
        return load_trained(folder, task)
    torch.manual_seed(0)
    model = build(MLP_SPEC)
    cfg = MLP_TRAIN.model_copy(update={"epochs": 0.3}) if quick else MLP_TRAIN
    record = task.train_model(model, cfg, desc="train LeNet-300-100")
    record["test"], record["config"] = task.evaluate(model, "test"), cfg.model_dump()
    model.slimcart_spec, model.slimcart_training = MLP_SPEC, record
    save_trained(model, task, folder, overwrite=True)
    return model


def _shrink(cfg, factor: float):
    """The stage with its training cut to ``factor`` (for --quick)."""
    update = {k: getattr(cfg, k) * factor for k in ("epochs_per_step", "final_epochs") if hasattr(cfg, k)}
    if hasattr(cfg, "train") and cfg.train.epochs > 0:
        update["train"] = cfg.train.model_copy(update={"epochs": cfg.train.epochs * factor})
    return cfg.model_copy(update=update)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    bits = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(bits(sa[k]), bits(sb[k]))
                                          for k in sa)


def run_model(label: str, model, task, stages, tmp: Path, limit: int | None) -> list[str]:
    t_start = time.time()
    spec = model.slimcart_spec
    save = lambda st, name: artifact.save(st, tmp / f"{label}-{name}", task={"name": task.name},  # noqa: E731
                                          examples=task.example_inputs(1), input_names=task.input_names)
    acc = lambda m: task.evaluate(m, "test", limit=limit)["accuracy"]  # noqa: E731
    base = save(ModelState.from_module(model, spec), "fp32")
    fp32, acc0 = (base / "model.safetensors").stat().st_size, acc(model)
    rows = [("fp32 baseline", "dense float32", fp32, acc0, 0.0)]
    state = ModelState.from_module(copy.deepcopy(model), spec)
    reports = []
    for i, cfg in enumerate(stages):
        name, t0 = technique_name(cfg), time.time()
        rep = registry.get(name).apply(state, cfg, StageContext(task, tmp / f"{label}-work", i, progress=False))
        reports.append((name, rep))
        folder = save(state, f"stage{i}")
        what = WHAT.get(name, name) + (f" (sparsity {rep.stats['sparsity']:.3f})" if "sparsity" in rep.stats else "")
        rows.append((f"+ {name}", what, (folder / "model.safetensors").stat().st_size, acc(state.torch_model),
                     time.time() - t0))
    t0 = time.time()
    info = write_archive(folder, tmp / f"{label}.scz")
    decoded = artifact.load(read_archive(tmp / f"{label}.scz", tmp / f"{label}-decoded")).torch_model
    identical = _same_weights(state.torch_model, decoded)
    rows.append(("+ Huffman", ".scz archive (whole file), decoded to run", info["bytes"], acc(decoded),
                 time.time() - t0))
    table = [{"stage": s, "what is stored": w, "bytes": f"{b:,}", "vs fp32 file": f"{fp32 / b:.1f}x",
              "top-1": f"{a:.4f}", "Δ top-1 (pts)": "—" if i == 0 else f"{100 * (a - acc0):+.2f}",
              "stage s": "—" if i == 0 else f"{sec:.0f}"} for i, (s, w, b, a, sec) in enumerate(rows)]
    shared = dict(reports).get("weight_sharing")
    per = shared.stats["per_layer"] if shared else {}
    layers = []
    for n, m in state.torch_model.named_modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        w = m.weight.detach()
        s = per.get(n, {})
        key = f"{n}.weight"
        layers.append({"layer": n, "weights": f"{w.numel():,}", "kept": f"{100 * float((w != 0).float().mean()):.1f}%",
                       "bits": s.get("bits", "—"), "distinct non-zero": int(torch.unique(w[w != 0]).numel()),
                       "SQNR dB": f"{s['sqnr_db']:.1f}" if s else "—",
                       "archive coding": info["kinds"].get(key, "—"),
                       "archive bytes": f"{info['tensor_bytes'].get(key, 0):,}"})
    inside = [{"stage": r["stage"], "bytes": f"{r['bytes']:,}", "vs dense": f"{r['ratio']:.1f}x"} for r in info["stages"]]
    train = model.slimcart_training
    lines = [f"### {label}", "",
             f"Baseline: {train.get('epochs')} epochs ({train.get('seconds')} s); fp32 model file "
             f"{fp32:,} bytes. Stages: " + "; ".join(f"`{registry_line(c)}`" for c in stages) + ".", "",
             markdown_table(table), "",
             f"Decoded archive: weights {'bit-identical to' if identical else 'DIFFERENT FROM'} the shared "
             f"model's. Archive parts: weights {info['weights_bytes']:,} bytes, header {info['header_bytes']:,}, "
             f"example row {info['examples_bytes']:,}, serving files {info['files_bytes']:,}.", "",
             "The final model's weights at each storage stage (`slimcart archive` prints this table):", "",
             markdown_table(inside), "", "Per layer (final model):", "", markdown_table(layers), "",
             f"_Section run time: {time.time() - t_start:.0f} s._", ""]
    print("\n".join(lines), flush=True)
    return lines


def registry_line(cfg) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
        return str(v)

    return f"{technique_name(cfg)} " + ", ".join(f"{k}={fmt(v)}" for k, v in cfg.model_dump(exclude_defaults=True).items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "deep_compression.md"))
    ap.add_argument("--only", choices=["cnn", "mlp"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-scale", type=float, default=1.0, help="scale every fine-tuning length by this")
    ap.add_argument("--quick", action="store_true", help="5%% of the fine-tuning, 1000 test rows: checks the script")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    task = sc.load_task("product_image", "fashion-mnist")
    factor, limit = (0.05, 1000) if args.quick else (args.train_scale, None)
    lines = ["## Deep Compression: pruning, weight sharing, Huffman coding", "",
             f"{dt.date.today()}, torch {torch.__version__}, {args.threads} threads, {platform.machine()}"
             + (" — QUICK smoke run (5% of the fine-tuning, 1000 test rows): not the numbers to quote" if args.quick
                else f", fine-tuning scaled by {factor}" if factor != 1.0 else "")
             + ". Top-1 on the test split (10,000 rows). Bytes are files: the model.safetensors each stage saves "
             "(sparse and codebook encodings are exact, see slimcart/storage) and the whole .scz archive "
             "(header with slimcart.json, weights, one example row; the stage folders are saved without the serving "
             "files, which an archive of a `slimcart compress` variant adds zlib-compressed, about 0.5 KB here). **An archive is for storage and transfer: it is "
             "decoded (`slimcart unarchive`) back into a model folder to run.** None of these stages makes "
             "inference faster: PyTorch runs the decoded weights as dense tensors.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "cnn"):
            recipe = Recipe.load(shipped_recipes()["product_image/deep-compression"])
            cnn = baseline(task, "full")
            lines += run_model("ResNet-small CNN (recipe product_image/deep-compression)", cnn, task,
                               [_shrink(c, factor) for c in recipe.stages], Path(tmp), limit)
        if args.only in (None, "mlp"):
            stages = Recipe.from_dict({"stages": MLP_STAGES}).stages
            lines += run_model("LeNet-300-100 MLP", mlp_baseline(task, args.quick), task,
                               [_shrink(c, factor) for c in stages], Path(tmp), limit)
    lines.append(f"_Total run time: {time.time() - t0:.0f} s._")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
