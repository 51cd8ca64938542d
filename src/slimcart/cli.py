"""The `slimcart` command: tasks, recipes, validate, train, compress, sensitivity, bench, demo."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SlimcartError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Make e-commerce models small and fast, and measure it honestly.\n\n"
                       "Example: slimcart compress --task ctr --dataset womens-reviews "
                       "--recipe ctr/onnx-int8 --out runs/ctr")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)

DataDir = typer.Option(None, "--data-dir", help="Folder holding the datasets (default: $SLIMCART_DATA_DIR, then shipped data).")
TextCol = typer.Option(None, "--text-column", help="intent, table data: the text column.")
LabelCol = typer.Option(None, "--label-column", help="intent/ctr, table data: the label column.")
Cat = typer.Option(None, "--categorical", help="ctr, table data: categorical columns, comma-separated.")
Dense = typer.Option(None, "--dense", help="ctr, table data: dense (numeric) columns, comma-separated.")
ImageSize = typer.Option(None, "--image-size", min=1, help=(
    "product_image, image folders: side length in pixels (default: 224 for efficientnet_lite0, else 32)."))
Baseline = typer.Option(None, "--baseline", help=(
    "product_image: the baseline to train, efficientnet_lite0 (ImageNet-pretrained) or resnet_small; "
    "it also fixes the normalisation (default: efficientnet_lite0 for image folders unless "
    "--image-size is under 64, resnet_small for fashion-mnist). ctr: deepfm (default) or dlrm."))
Seed = typer.Option(0, "--seed", help="Seed for splits and training.")
Overwrite = typer.Option(False, "--overwrite", help="Replace OUT if it exists.")
Quiet = typer.Option(False, "--quiet", help="No progress bars.")
CHECKPOINT_EVERY = 200  # optimizer steps between training checkpoints
GROUP_TIMEOUT_S = 1800.0  # how long a rank of `torchrun ... -m slimcart train` waits for the others


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _ints(value: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated whole numbers, got {value!r}.") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} needs batch sizes >= 1, got {value!r}.")
    return vals


def _image_options(image_size: Optional[int], baseline: Optional[str], fixed: Optional[dict] = None) -> dict:
    """--image-size/--baseline as task options, checked against those a given model fixes."""
    given = {k: v for k, v in (("image_size", image_size), ("baseline", baseline)) if v is not None}
    fixed = dict(fixed or {})
    flags = {"image_size": "--image-size", "baseline": "--baseline"}
    for key, value in given.items():
        if key in fixed and fixed[key] != value:
            raise UsageError(f"{flags[key]} {value} does not match the model, which takes {fixed[key]}.",
                             f"Leave out {flags[key]}: the model's own value is used.")
    return {**fixed, **given}


def _saved_image_options(folder: Path) -> dict:
    """The image size and normalisation a model folder from `slimcart train` was trained with."""
    from .sources import _bundle_options

    return {k: v for k, v in _bundle_options(Path(folder)).items() if k in ("image_size", "baseline")}


def _load_task(task, dataset, data_dir, seed, text_column=None, label_column=None, categorical=None, dense=None,
               **options):
    from .tasks import load_task

    return load_task(task, dataset, data_dir=data_dir, seed=seed, text_column=text_column,
                     label_column=label_column, categorical=_csv(categorical), dense=_csv(dense), **options)


@app.command()
def tasks() -> None:
    """List the tasks and their shipped datasets.

    Example: slimcart tasks
    """
    from . import tasks as t

    table = Table("task", "dataset", "what")
    for name in t.TASKS:
        table.add_row(name, "", t.SUMMARY[name])
        for ds, what in t.datasets(name).items():
            table.add_row("", ds + (" (default)" if ds == t.DEFAULT_DATASET[name] else ""), what)
    out.print(table)


@app.command()
def recipes() -> None:
    """List the shipped recipes and the techniques they can use.

    Example: slimcart recipes
    """
    from . import registry
    from .recipe import Recipe, shipped_recipes

    table = Table("recipe", "stages", "description")
    for key, path in shipped_recipes().items():
        r = Recipe.load(path)
        table.add_row(key, " -> ".join(s["type"] for s in r.to_dict()["stages"]), r.description)
    out.print(table)
    tech = Table("technique", "works on", "summary")
    for name, t in registry.techniques().items():
        tech.add_row(name, "/".join(t.accepts), t.summary)
    out.print(tech)


@app.command("runtimes")
def list_runtimes() -> None:
    """List the runtimes and model formats: which runtime serves which format, and their options.

    Example: slimcart runtimes
    """
    from . import formats
    from .measure import hardware
    from .measure.runtimes import runtimes as table_of

    table = Table("runtime", "serves formats", "options (recipe: measure.runtimes)", "here", "what")
    for name, rt in table_of().items():
        served = [f for f, fmt in formats.formats().items() if rt.family in fmt.serves]
        converted = [f"{f} (converted)" for f, fmt in formats.formats().items() if rt.family in fmt.convert]
        opts = ", ".join(f"{k}={v.default}" for k, v in rt.config_cls.model_fields.items() if k != "label")
        table.add_row(name, ", ".join(served + converted), opts or "-", rt.availability(), rt.summary)
    out.print(table)
    out.print(hardware.summary(), markup=False, highlight=False)


@app.command()
def validate(recipe: list[str] = typer.Argument(..., help="Recipe files or shipped names.")) -> None:
    """Check recipes without running them; every problem is listed with its key path.

    Example: slimcart validate recipes/intent/onnx-int8.yaml
    """
    from .errors import RecipeError
    from .recipe import resolve

    failed = []
    for r in recipe:
        try:
            rec = resolve(r)
            stages = " -> ".join(s["type"] for s in rec.to_dict()["stages"])
            out.print(f"[green]ok[/green] {r}: {stages} (ends as a {rec.final_format()} model)")
        except RecipeError as exc:
            failed.append(exc)
            err.print(str(exc), markup=False, highlight=False)
    if failed:
        raise typer.Exit(2)


@app.command()
def train(task: str = typer.Option(..., "--task", help="intent, product_image or ctr."),
          dataset: Optional[str] = typer.Option(None, "--dataset", help="A shipped dataset name or a path."),
          out_dir: Path = typer.Option(..., "--out", help="New folder for the trained model."),
          budget: str = typer.Option("full", "--budget", help="full (stated metric) or demo (quick)."),
          data_dir: Optional[Path] = DataDir, seed: int = Seed, text_column: Optional[str] = TextCol,
          label_column: Optional[str] = LabelCol, categorical: Optional[str] = Cat,
          dense: Optional[str] = Dense, image_size: Optional[int] = ImageSize,
          baseline: Optional[str] = Baseline, overwrite: bool = Overwrite, quiet: bool = Quiet) -> None:
    """Train a task's baseline (seeded) and save it as safetensors + a JSON spec. Started by
    torchrun, it trains data-parallel over the ranks (gloo on CPU; the global batch is split) and
    rank 0 saves the model.

    Example: slimcart train --task product_image --dataset fashion-mnist --out runs/cnn

    Example: slimcart train --task product_image --dataset photos/ --baseline efficientnet_lite0 --image-size 224 --out runs/lite0

    Example: torchrun --nproc-per-node 2 -m slimcart train --task ctr --dataset womens-reviews --out runs/ctr
    """
    from .training import save_trained
    from .output import check_output

    if budget not in ("full", "demo"):
        raise UsageError(f"--budget must be 'full' or 'demo', got {budget!r}.")
    import shutil

    check_output(out_dir, overwrite)
    t = _load_task(task, dataset, data_dir, seed, text_column, label_column, categorical, dense,
                   **_image_options(image_size, baseline))
    # an interrupted run resumes from here (same command); removed once the model is saved
    ckpt = out_dir.parent / f".{out_dir.name}.checkpoint"
    with _process_group() as rank:
        model = t.train_baseline(budget, seed=seed, progress=not quiet and rank == 0, checkpoint_dir=ckpt,
                                 checkpoint_every=CHECKPOINT_EVERY)
    if rank:
        return
    save_trained(model, t, out_dir, overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    rec = model.slimcart_training
    resumed = f", resumed at step {rec['resumed_from_step']}" if rec.get("resumed_from_step") else ""
    out.print(f"saved {out_dir}  test: " + ", ".join(f"{k}={v:.4f}" for k, v in rec["test"].items())
              + f"  ({rec['seconds']} s, {rec['epochs']} epochs{resumed})")


@contextmanager
def _process_group():
    """Under torchrun (WORLD_SIZE > 1), join the gloo group from the environment for the block and
    yield this rank; else yield 0."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        yield 0
        return
    import torch.distributed as dist

    from .parallel.launch import init_group
    from .parallel.train import peer_failure

    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        init_group("cpu", GROUP_TIMEOUT_S)
        yield dist.get_rank()
    except Exception as exc:
        failure = peer_failure(exc, rank, GROUP_TIMEOUT_S)
        if failure is None:
            raise
        raise failure from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@app.command()
def compress(task: str = typer.Option(..., "--task", help="intent, product_image or ctr."),
             dataset: Optional[str] = typer.Option(None, "--dataset", help="A shipped dataset name or a path."),
             recipe: list[str] = typer.Option(..., "--recipe", help="Recipe file or shipped name; repeat for more variants."),
             out_dir: Path = typer.Option(..., "--out", help="New folder for artifacts and the report."),
             model: Optional[str] = typer.Option(None, "--model", help=(
                 "The model to compress (default: train one now): a folder from `slimcart train`, a "
                 "Hugging Face sequence-classification folder, an ONNX file, or torchvision:NAME / "
                 "timm:NAME with --weights.")),
             weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors state dict for torchvision:NAME / timm:NAME."),
             budget: str = typer.Option("demo", "--budget", help="Training budget when no --model: full or demo."),
             batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="e.g. 1,32 (overrides the recipe)."),
             data_dir: Optional[Path] = DataDir, seed: int = Seed, text_column: Optional[str] = TextCol,
             label_column: Optional[str] = LabelCol, categorical: Optional[str] = Cat,
             dense: Optional[str] = Dense, image_size: Optional[int] = ImageSize,
             baseline: Optional[str] = Baseline, overwrite: bool = Overwrite, quiet: bool = Quiet,
             gate: bool = typer.Option(False, "--gate", help=(
                 "Drop every variant that is slower than the baseline, in the runtime that serves it, "
                 "at any measured batch size (listed in result.json under `gated`).")),
             resume: bool = typer.Option(False, "--resume", help=(
                 "Continue an interrupted run of this command from the checkpoints its training "
                 "stages left beside --out (.OUT.checkpoint)."))) -> None:
    """Apply recipes to a model, measure every variant against it, write the report.

    Training stages (distill, fine-tuning) checkpoint each epoch into .OUT.checkpoint beside --out;
    an interrupted run continues from there with --resume, and the folder goes once the report is
    written. Started by torchrun, training runs data-parallel over the ranks (gloo on CPU) and
    rank 0 measures and writes the report.

    Example: slimcart compress --task intent --dataset bitext --recipe intent/onnx-int8 --out runs/intent

    Example: slimcart compress --task intent --dataset bitext --model my-hf-classifier/ --recipe intent/heads50-ft --out runs/hf

    Example: torchrun --nproc-per-node 2 -m slimcart compress --task intent --dataset bitext --recipe intent/distill2-heads-int8 --out runs/kd
    """
    from .output import check_output
    from .recipe import resolve
    from .sources import resolve_source
    from . import pipeline

    check_output(out_dir, overwrite)
    recs = [resolve(r) for r in recipe]
    measure = recs[0].measure
    if batch_sizes:
        measure = measure.model_copy(update={"batch_sizes": _ints(batch_sizes, "--batch-sizes")})
    src = resolve_source(model, weights=weights) if model else None
    options = _image_options(image_size, baseline, src.task_options if src is not None else None)
    t = _load_task(task, dataset, data_dir, seed, text_column, label_column, categorical, dense, **options)
    ckpt = out_dir.parent / f".{out_dir.name}.checkpoint"
    if ckpt.exists() and not resume:
        raise UsageError(f"{ckpt} holds the checkpoints of an interrupted run into {out_dir}.",
                         "Add --resume to continue it, or delete that folder to start over.")
    if resume and not ckpt.is_dir():
        raise UsageError(f"--resume: there is no checkpoint folder {ckpt} to continue from.",
                         "Run the same command without --resume to start.")
    with _process_group() as rank:
        base = model if model else t.train_baseline(budget, seed=seed, progress=not quiet and rank == 0,
                                                    checkpoint_dir=ckpt / "baseline",
                                                    checkpoint_every=CHECKPOINT_EVERY)
        res = pipeline.compress(base, t, recs, measure=measure, progress=not quiet and rank == 0,
                                weights=weights, baseline_info=getattr(base, "slimcart_training", None),
                                drop_slower=gate, checkpoints=ckpt)
    if res is None:  # another rank than 0: rank 0 writes the report
        return
    for g in res.result.gated:
        out.print(f"gate: dropped {g['name']}: {g['reason']}")
    try:
        res.save(out_dir, overwrite)
    finally:
        res.cleanup()
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    _print_summary(res.result)
    out.print(f"report: {out_dir / 'report.html'}")


@app.command()
def sensitivity(task: str = typer.Option(..., "--task", help="intent, product_image or ctr."),
                dataset: Optional[str] = typer.Option(None, "--dataset", help="A shipped dataset name or a path."),
                model: Path = typer.Option(..., "--model", help="A folder from `slimcart train`."),
                out_dir: Path = typer.Option(..., "--out", help="New folder for the scan, plot and proposed recipe."),
                sparsities: str = typer.Option("0.25,0.5,0.75,0.9", "--sparsities", help="Fractions in (0, 1), comma-separated."),
                max_drop: float = typer.Option(0.005, "--max-drop", min=0.0, help="Metric drop allowed per layer (0.005 = half a point)."),
                limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Validation rows scored per point (default: all)."),
                layer_types: str = typer.Option("Linear,Conv2d", "--layer-types", help="Layer types to scan."),
                include: Optional[str] = typer.Option(None, "--include", help="Layer-name patterns to scan, comma-separated."),
                exclude: Optional[str] = typer.Option(None, "--exclude", help="Layer-name patterns to leave out."),
                data_dir: Optional[Path] = DataDir, seed: int = Seed, text_column: Optional[str] = TextCol,
                label_column: Optional[str] = LabelCol, categorical: Optional[str] = Cat,
                dense: Optional[str] = Dense, image_size: Optional[int] = ImageSize,
                baseline: Optional[str] = Baseline, overwrite: bool = Overwrite) -> None:
    """Scan each layer's sensitivity to magnitude pruning on the validation split and propose
    per-layer sparsities; writes sensitivity.json/.md/.png and a runnable recipe.yaml.

    Example: slimcart sensitivity --task product_image --dataset fashion-mnist --model runs/cnn --out runs/cnn-sens
    """
    from .output import check_output, staged_output
    from .prune.magnitude import LAYER_TYPES
    from .prune.sensitivity import propose_sparsities, sensitivity_scan
    from .report.sensitivity import write_sensitivity
    from .training import load_trained

    check_output(out_dir, overwrite)
    try:
        fracs = [float(v) for v in sparsities.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--sparsities takes comma-separated fractions, got {sparsities!r}.") from None
    if not fracs or any(not 0.0 < f < 1.0 for f in fracs):
        raise UsageError(f"--sparsities must be fractions in (0, 1), got {sparsities!r}.")
    types = _csv(layer_types) or []
    unknown = [t for t in types if t not in LAYER_TYPES]
    if not types or unknown:
        raise UsageError(f"--layer-types: unknown {', '.join(unknown) or '(none given)'}.",
                         f"Known layer types: {', '.join(LAYER_TYPES)}.")
    t = _load_task(task, dataset, data_dir, seed, text_column, label_column, categorical, dense,
                   **_image_options(image_size, baseline, _saved_image_options(model)))
    net = load_trained(model, t)
    scan = sensitivity_scan(net, t, fracs, types, _csv(include) or ["*"], _csv(exclude) or [], "val", limit)
    if not scan["layers"]:
        raise UsageError("sensitivity: no layer matches --layer-types/--include/--exclude.")
    proposal = propose_sparsities(scan, max_drop)
    with staged_output(out_dir, overwrite) as stage:
        files = write_sensitivity(scan, proposal, max_drop, types, stage)
    table = Table("layer", *(f"{f:.0%}" for f in sorted(set(fracs))), "proposed",
                  title=f"{scan['metric']} per layer (unpruned {scan['baseline']:.4f})")
    for name, curve in scan["layers"].items():
        table.add_row(name, *(f"{p['metric']:.4f}" for p in curve), f"{proposal[name]:.0%}")
    out.print(table)
    if "recipe" in files:
        out.print(f"proposed recipe: {out_dir / 'recipe.yaml'}  (slimcart compress ... --recipe {out_dir / 'recipe.yaml'})")
    else:
        out.print(f"no layer stays within --max-drop {max_drop} at any scanned sparsity; no recipe written.")


@app.command()
def bench(artifact_dir: Path = typer.Argument(..., help="A model folder written by slimcart."),
          batch_sizes: str = typer.Option("1,32", "--batch-sizes"),
          rounds: int = typer.Option(30, "--rounds", min=5), threads: Optional[int] = typer.Option(None, "--threads"),
          runtime: Optional[list[str]] = typer.Option(None, "--runtime", help=(
              "Runtime name, or NAME:key=value,... (e.g. torch_compile:freezing=true); see `slimcart runtimes`; "
              "repeat for more. Default: torch and onnxruntime."))) -> None:
    """Measure one saved model alone: size on disk and latency per runtime and batch size.

    Example: slimcart bench runs/ctr/variants/onnx-int8 --batch-sizes 1,64
    """
    from .bench import bench_artifact
    from .measure.runtimes import parse_choice

    for r in runtime or []:
        try:
            parse_choice(r)
        except ValueError as exc:
            raise UsageError(f"--runtime: {exc}") from None
    rows = bench_artifact(artifact_dir, _ints(batch_sizes, "--batch-sizes"), rounds, threads, runtime or None)
    table = Table(*rows[0].keys())
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    out.print(table)


@app.command()
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the three reports."),
         data_dir: Optional[Path] = DataDir, overwrite: bool = Overwrite, quiet: bool = Quiet) -> None:
    """The main job: on each task's shipped default dataset, train a baseline (small budget),
    apply the default recipes and write the reports; prints one summary table.

    Example: slimcart demo --out runs/demo
    """
    from .demo import run_demo

    from .demo import combined_table

    results = run_demo(out_dir, data_dir=data_dir, overwrite=overwrite, progress=not quiet)
    rows = combined_table(results)
    table = Table(*rows[0].keys(), title="slimcart demo: baseline vs compressed, measured here "
                  "(speedup vs the baseline in the same runtime)")
    for r in rows:
        table.add_row(*r.values())
    out.print(table)
    out.print(f"reports: {', '.join(str(out_dir / r.task / 'report.html') for r in results)}")


def _print_summary(result) -> None:
    from .report import summary_table

    rows = summary_table(result)
    table = Table(*rows[0].keys(), title=f"{result.task} / {result.dataset} ({result.threads} threads)")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    out.print(table)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    show = warnings.showwarning

    def one_line(message, category, *args, **kwargs):  # a runtime fallback is a notice, not a traceback
        if category.__name__ == "RuntimeFallbackWarning":
            err.print(f"notice: {message}", markup=False, highlight=False)
        else:
            show(message, category, *args, **kwargs)
    warnings.showwarning = one_line
    try:
        app()
    except SlimcartError as exc:
        tag = f"[rank {os.environ.get('RANK', 0)}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        err.print(f"{tag}error: {exc.message}", markup=False, highlight=False)
        if exc.hint:
            err.print(exc.hint, markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


@app.command()
def predict(model_dir: Path = typer.Argument(..., help="A model folder saved by slimcart (with preprocess.json)."),
            input_path: Path = typer.Option(..., "--input", help="CSV/parquet rows, a .txt file (one text per "
                                            "line), an image file or a folder of images."),
            runtime: Optional[str] = typer.Option(None, "--runtime", help="A runtime that serves the model (see `slimcart runtimes`; default: the first the model has)."),
            out_csv: Optional[Path] = typer.Option(None, "--out", help="Write the predictions to this CSV instead of printing them."),
            limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Predict the first N inputs only.")) -> None:
    """Run a saved model on raw inputs, with the preprocessing saved next to it.

    Example: slimcart predict runs/ctr/artifacts/baseline --input rows.csv --out preds.csv
    """
    from .serving import load_bundle

    if not input_path.exists():
        raise UsageError(f"--input {input_path} does not exist.")
    preds = load_bundle(model_dir).predict(input_path, runtime, limit=limit)
    has_input = "input" in preds.columns
    preds.index.name = None if has_input else "row"
    if out_csv is not None:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        preds.to_csv(out_csv, index=not has_input)
        out.print(f"wrote {len(preds)} predictions to {out_csv}")
        return
    shown = preds.head(50)
    table = Table(*([] if has_input else ["row"]), *preds.columns)
    for idx, r in shown.iterrows():
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.tolist()]
        table.add_row(*([] if has_input else [str(idx)]), *cells)
    out.print(table)
    if len(preds) > len(shown):
        out.print(f"... {len(preds) - len(shown)} more rows; write them all with --out FILE.csv")


from .cli_serve import register as _register_serving  # noqa: E402  (serve, loadtest)

_register_serving(app)
from .cli_archive import register as _register_archive  # noqa: E402
_register_archive(app)
