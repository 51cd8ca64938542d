"""The report's content as a list of blocks (shared by the Markdown and HTML writers),
the summary table, and the Markdown rendering."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from ..result import Result, Variant

DASH = "—"
MB = 1_000_000


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    label: str = ""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Pre:
    lines: list[str]


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    alt: str
    name: str


Block = Union[Heading, Para, Table, Pre, Bullets, Image]


# -- number formatting -------------------------------------------------------------------

def fmt_num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if v != 0 and abs(v) < 10 ** -(digits - 1):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def fmt_ms(v: float) -> str:
    return f"{v:.3g}" if 0 < v < 0.01 else f"{v:.2f}"


def fmt_mb(size_bytes: int) -> str:
    return f"{size_bytes / MB:.2f}"


def fmt_x(v: float) -> str:
    return f"{v:.2f}x"


def fmt_pts(delta: float) -> str:
    return f"{delta * 100:+.2f}"


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def fmt_value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return fmt_num(v)


def fmt_kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in d.items()) or DASH


# -- ordering helpers --------------------------------------------------------------------

def batch_key(b: str) -> tuple:
    return (0, int(b), "") if b.isdigit() else (1, 0, b)


def runtimes(result: Result) -> list[str]:
    """Runtimes in order of first appearance (baseline first)."""
    seen: list[str] = []
    for v in result.variant_rows():
        seen += [rt for rt in v.latency_ms if rt not in seen]
    return seen


def runtime_batches(result: Result) -> list[tuple[str, str]]:
    pairs = []
    for rt in runtimes(result):
        batches = {b for v in result.variant_rows() for b in v.latency_ms.get(rt, {})}
        pairs += [(rt, b) for b in sorted(batches, key=batch_key)]
    return pairs


def primary_metric(result: Result) -> str:
    if result.primary_metric:
        return result.primary_metric
    return next(iter(result.baseline.metrics), "")


def speedup_cell(result: Result, v: Variant, rt: str, b: str) -> str:
    """"2.31x [2.20, 2.41]", or the same with "(no measured difference)"."""
    d = v.speedup.get(rt, {}).get(b)
    if d is None:
        s = speedup(result, v, rt, b)
        return DASH if s is None else fmt_x(s)
    text = f"{fmt_x(d.x)} [{d.low:.2f}, {d.high:.2f}]"
    return text + (" (no measured difference)" if d.verdict == "no measured difference" else "")


def served_mb(v: Variant, rt: str) -> str:
    return fmt_mb(v.size_bytes_served.get(rt, v.size_bytes))


def speedup(result: Result, v: Variant, rt: str, b: str) -> float | None:
    """The stored speedup, or baseline p50 / variant p50 when it was not stored."""
    stored = v.speedup_vs_baseline.get(rt, {}).get(b)
    if stored is not None:
        return stored
    base = result.baseline.latency_ms.get(rt, {}).get(b)
    mine = v.latency_ms.get(rt, {}).get(b)
    if base is None or mine is None or mine.p50 <= 0:
        return None
    return base.p50 / mine.p50


# -- content -----------------------------------------------------------------------------

def summary_table(result: Result) -> list[dict[str, str]]:
    """One row per model with formatted cells; every row has the same keys."""
    metric = primary_metric(result)
    base_val = result.baseline.metrics.get(metric)
    rows = []
    for v in result.variant_rows():
        val = v.metrics.get(metric)
        row = {"Variant": v.name, "Format": v.format, "Size (MB)": fmt_mb(v.size_bytes),
               "Compression": fmt_x(v.compression_ratio)}
        if metric:
            row[metric] = DASH if val is None else fmt_num(val)
            delta = DASH if v is result.baseline or val is None or base_val is None \
                else fmt_pts(val - base_val)
            row[f"Δ {metric} (pts)"] = delta
        for rt, b in runtime_batches(result):
            p = v.latency_ms.get(rt, {}).get(b)
            cell = DASH
            if p is not None:
                cell = fmt_ms(p.p50)
                if v is not result.baseline:
                    d = v.speedup.get(rt, {}).get(b)
                    s = speedup(result, v, rt, b)
                    if d is not None and d.verdict == "no measured difference":
                        cell += " (=)"
                    elif s is not None:
                        cell += f" ({fmt_x(s)})"
            row[f"p50 ms {rt} b={b}"] = cell
        row["Speed gate"] = DASH if v is result.baseline else gate_cell(result, v)
        rows.append(row)
    return rows


def gate_cell(result: Result, v: Variant) -> str:
    """"faster", "=" or "SLOWER (onnxruntime b=1)": the speed gate in the runtime serving it."""
    from ..gate import gate_of

    g = gate_of(result, v)
    if g["verdict"] == "slower":
        where = [f"{rt} b={','.join(bs)}" for rt, bs in g["slower_in"].items()
                 if g["runtime"] is None or rt == g["runtime"]]
        return f"SLOWER ({'; '.join(where)})"
    return {"faster": "faster", "no measured difference": "=", "not timed": DASH}[g["verdict"]]


def _gate_blocks(result: Result) -> list[Block]:
    from ..gate import best_variant, gate_of

    lines = []
    best = best_variant(result)
    metric = primary_metric(result)
    if result.variants:
        lines.append(f"Best: {best.name} (the fastest in the runtime serving it, {metric} within 1 point "
                      "of the baseline, not slower)" if best is not None else
                      f"Best: none (no variant is faster with {metric or 'its metric'} within 1 point of the baseline)")
    for v in result.variants:
        g = gate_of(result, v)
        if g["verdict"] == "slower":
            lines.append(f"{v.name}: SLOWER: {g['reason']}.")
        elif any(g["slower_in"].values()):
            other = "; ".join(f"{rt} b={','.join(bs)}" for rt, bs in g["slower_in"].items())
            lines.append(f"{v.name}: {g['verdict']} in {g['runtime']}, but slower in {other}.")
    lines += [f"{g['name']}: dropped by --gate: {g['reason']}." for g in result.gated]
    return [Para("a variant slower than the baseline in the runtime that serves it, at any measured batch "
                 "size, is marked SLOWER, never chosen as best, and dropped by `compress --gate`.",
                 "Speed gate:"), Bullets(lines)] if lines else []


def _latency_table(result: Result) -> Table:
    headers = ["Variant", "Runtime", "Batch", "Served MB", "p50 ms [95% CI]", "p95 ms", "p99 ms", "runs",
               "samples/s (sustained)", "Speedup [95% CI]", "p50 ms as deployed"]
    rows = []
    for v in result.variant_rows():
        for rt in v.latency_ms:
            for b in sorted(v.latency_ms[rt], key=batch_key):
                p = v.latency_ms[rt][b]
                tp = v.throughput.get(rt, {}).get(b)
                dep = v.latency_deployed_ms.get(rt, {}).get(b)
                ci = f" [{fmt_ms(p.p50_low)}, {fmt_ms(p.p50_high)}]" if p.p50_low is not None else ""
                rows.append([v.name, rt, b, served_mb(v, rt), fmt_ms(p.p50) + ci, fmt_ms(p.p95), fmt_ms(p.p99),
                             DASH if p.runs is None else str(p.runs),
                             DASH if tp is None else fmt_rate(tp),
                             DASH if v is result.baseline else speedup_cell(result, v, rt, b),
                             DASH if dep is None else fmt_ms(dep.p50)])
    return Table(headers, rows)


def _setup_table(result: Result) -> Table | None:
    """Seconds to build each runner and of its first call per batch size; None if not recorded."""
    batches = sorted({b for v in result.variant_rows() for per in v.setup_s.values() for b in per
                      if b not in ("build", "total")}, key=batch_key)
    cell = lambda per, k: f"{per[k]:.3f}" if k in per else DASH  # noqa: E731
    rows = [[v.name, rt, cell(per, "build")] + [cell(per, b) for b in batches] + [cell(per, "total")]
            for v in result.variant_rows() for rt, per in v.setup_s.items()]
    return Table(["Variant", "Runtime", "build s"] + [f"first call s b={b}" for b in batches] + ["total s"],
                 rows) if rows else None


def _keyed_table(result: Result, attr: str, fmt, first: str = "Variant") -> Table | None:
    """A variant x key table of a dict attribute; None when no variant has any value."""
    keys: list[str] = []
    for v in result.variant_rows():
        keys += [k for k in getattr(v, attr) if k not in keys]
    if not keys:
        return None
    rows = [[v.name] + [fmt(getattr(v, attr)[k]) if k in getattr(v, attr) else DASH
                        for k in keys] for v in result.variant_rows()]
    return Table([first] + keys, rows)


def _metrics_table(result: Result) -> Table:
    base = result.baseline.metrics
    keys = list(dict.fromkeys(k for v in result.variant_rows() for k in v.metrics))
    headers = ["Variant"] + [h for k in keys for h in (k, f"Δ {k} (pts)")]
    rows = []
    for v in result.variant_rows():
        row = [v.name]
        for k in keys:
            val = v.metrics.get(k)
            row.append(DASH if val is None else fmt_num(val))
            same = v is result.baseline or val is None or k not in base
            row.append(DASH if same else fmt_pts(val - base[k]))
        rows.append(row)
    return Table(headers, rows)


def _layer_lines(layers: Any) -> list[str]:
    if isinstance(layers, dict):
        return [f"{name}: {why}" for name, why in layers.items()]
    return [str(x) for x in (layers or [])]


def _variant_blocks(v: Variant, is_baseline: bool) -> list[Block]:
    title = f"{v.name} (baseline)" if is_baseline and v.name != "baseline" else v.name
    blocks: list[Block] = [Heading(3, title),
                           Para(f"{v.recipe or DASH}; format {v.format}; artifact {v.artifact}",
                                "Recipe:")]
    if not v.stages and not is_baseline:
        blocks.append(Para("none recorded", "Stages:"))
    for i, st in enumerate(v.stages, 1):
        secs = st.get("seconds")
        when = f" ({secs:.2f} s)" if isinstance(secs, (int, float)) else ""
        blocks.append(Heading(4, f"Stage {i}: {st.get('technique', '?')}{when}"))
        blocks.append(Para(fmt_kv(st.get("config") or {}), "Config:"))
        blocks.append(Para(fmt_kv(st.get("stats") or {}), "Stats:"))
        for key, label in (("changed", "Changed"), ("skipped", "Skipped")):
            lines = _layer_lines(st.get(key))
            blocks.append(Para("" if lines else "none", f"{label} layers ({len(lines)}):"))
            if lines:
                blocks.append(Pre(lines))
    if v.served:
        blocks.append(Para("; ".join(
            f"{rt}: {path} ({fmt_mb(v.size_bytes_served.get(rt, 0))} MB"
            + (f", max output diff {v.served_parity[rt]['max_abs_diff']:.2e} vs the scored runtime"
               if rt in v.served_parity else "") + ")" for rt, path in v.served.items()), "Served:"))
    if v.notes:
        blocks += [Para("", "Notes:"), Bullets(list(v.notes))]
    return blocks


def build_blocks(result: Result) -> list[Block]:
    metric = primary_metric(result)
    summary = summary_table(result)
    blocks: list[Block] = [
        Heading(1, f"slimcart report: {result.task} on {result.dataset}"),
        Para(f"task {result.task}; dataset {result.dataset}; threads {result.threads}; "
             f"primary metric {metric or DASH}" + (f"; created {result.created}"
                                                   if result.created else ""), "Run:"),
        Heading(2, "Summary"),
        Para("MB = 10^6 bytes on disk. Deltas are in points (x100) against the baseline, on the test "
             "split. Latency cells show p50 in ms and the speedup over the baseline in the same "
             "runtime and batch size; (=) marks no measured difference (the speedup's 95% interval "
             "includes 1.0, or the difference is under 3%).", "Note:"),
        Table(list(summary[0]), [list(r.values()) for r in summary]),
        *_gate_blocks(result),
        Image("Metric vs latency (Pareto front)", "pareto.png"),
        Heading(2, "Metrics"), Para("On the test split, scored once for the report.", "Test:"),
        _metrics_table(result),
        *([Para("the split that selection (search) uses; the test split is not looked at before "
                "variants are chosen.", "Validation:"), val] if (val := _keyed_table(result, "val_metrics", fmt_num))
          else []),
        Heading(2, "Latency and throughput"),
        Para("Interleaved: all variants timed in one process, in a fresh random order each round, "
             "the same number of timed calls per case per round, ONNX Runtime without spinning. "
             "As deployed: each runtime alone with its default options. Throughput: samples per "
             "second over sustained back-to-back calls. Served MB: the artifact that runtime serves.",
             "How:"),
        _latency_table(result),
    ]
    setup = _setup_table(result)
    if setup is not None:
        blocks += [Heading(3, "Setup time"),
                   Para("Building each runner (a session, a compiled graph), its first call with each "
                        "batch size's input shapes (torch.compile compiles there), and the total with every "
                        "shape it saw (scoring included); made before any timed call and never part of the "
                        "latencies above. A graph compiled earlier in the same process for a model of the "
                        "same architecture and shapes is reused, so it can be short.", "Setup:"),
                   setup]
    blocks.append(Heading(2, "Agreement with baseline"))
    agreement = _keyed_table(result, "agreement", fmt_num)
    blocks.append(agreement or Para("not measured"))
    memory = _keyed_table(result, "peak_memory_mb", lambda x: f"{x:.1f}")
    if memory is not None:
        blocks += [Heading(2, "Peak memory (MB, serving process RSS)"),
                   Para("Peak resident memory of a fresh process that loads the saved model and "
                        "serves the largest batch; the second table is the part above the "
                        "process's RSS after importing the runtimes (model + activations)."), memory]
        model_mem = _keyed_table(result, "model_memory_mb", lambda x: f"{x:.1f}")
        if model_mem is not None:
            blocks.append(model_mem)
    blocks.append(Heading(2, "Variants"))
    for v in result.variant_rows():
        blocks += _variant_blocks(v, v is result.baseline)
    blocks.append(Heading(2, "Environment"))
    env = [[str(k), fmt_value(val)] for k, val in result.environment.items()]
    blocks.append(Table(["Key", "Value"], env) if env else Para("not recorded"))
    return blocks


# -- Markdown ----------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Para):
        return f"**{block.label}** {block.text}".rstrip() if block.label else block.text
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_cell(h) for h in block.headers) + " |",
                 "|" + "|".join("---" for _ in block.headers) + "|"]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Pre):
        return "```text\n" + "\n".join(block.lines) + "\n```"
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    return f"![{block.alt}]({block.name})"


def to_markdown(result: Result) -> str:
    return "\n\n".join(_md(b) for b in build_blocks(result)) + "\n"
