"""The speedup gate: a compressed model that runs slower than the model it replaces is a defect,
not a result.

A variant is judged in the runtime that serves its artifact as saved (the first timed runtime
whose family serves the variant's format: eager PyTorch for a PyTorch model, ONNX Runtime for an
ONNX graph), against the baseline timed in that same runtime, in the same run. Its verdict is

``slower``                 the paired 95% interval of the speedup lies below 1.0 at ANY measured
                           batch size (one slow batch size is enough: a user serves them all);
``faster``                 faster at every measured batch size;
``no measured difference`` otherwise (some batch sizes no faster, none slower);
``not timed``              the runtime that serves it was not timed (then the verdict is taken
                           over every runtime that was).

A "slower" variant is never chosen as the best one (``best_variant``), is flagged in the report,
and is dropped by ``slimcart compress --gate``. Every runtime and batch size where a variant is
slower is listed, the serving one or not, so a user who serves it elsewhere sees it too.
"""
from __future__ import annotations

from typing import Any

from .result import Result, Variant

LOWER_IS_BETTER = ("loss", "logloss", "log_loss", "mse", "rmse", "mae", "error", "perplexity")


def serving_runtime(fmt: str, timed: list[str], families: dict[str, str]) -> str | None:
    """The first of the ``timed`` runtime labels whose family serves ``fmt`` as it is."""
    from .formats import get

    try:
        serves = get(fmt).serves
    except Exception:  # an unknown format: judge on every runtime
        return None
    return next((label for label in timed if families.get(label) in serves), None)


def families_of(result: Result) -> dict[str, str]:
    """Runtime label -> family, from the runtimes recorded in the result."""
    from .measure.runtimes import runtimes

    known = runtimes()
    out = {}
    for rec in result.runtimes:
        rt = known.get(rec.get("runtime", ""))
        if rt is not None:
            out[rec.get("label", rt.name)] = rt.family
    return out


def assess(v: Variant | dict[str, Any], families: dict[str, str]) -> dict[str, Any]:
    """The gate record of one variant (a ``Variant`` or its dict in the making)."""
    get = (lambda k: v[k]) if isinstance(v, dict) else (lambda k: getattr(v, k))
    spd = get("speedup")
    verdicts = {rt: {b: (d["verdict"] if isinstance(d, dict) else d.verdict) for b, d in per.items()}
                for rt, per in spd.items()}
    slower_in = {rt: sorted((b for b, vd in per.items() if vd == "slower"), key=_bkey)
                 for rt, per in verdicts.items()}
    slower_in = {rt: bs for rt, bs in slower_in.items() if bs}
    rt = serving_runtime(get("format"), list(verdicts), families)
    judged = {rt: verdicts[rt]} if rt is not None else verdicts
    flat = [vd for per in judged.values() for vd in per.values()]
    if not flat:
        verdict = "not timed"
    elif "slower" in flat:
        verdict = "slower"
    elif all(vd == "faster" for vd in flat):
        verdict = "faster"
    else:
        verdict = "no measured difference"
    where = rt or "every timed runtime"
    if verdict == "slower":
        bs = ", ".join(f"b={b}" for b in (slower_in.get(rt, []) if rt else
                                         sorted({b for per in slower_in.values() for b in per}, key=_bkey)))
        reason = f"slower than the baseline in {where} at {bs} (95% interval of the speedup below 1.0)"
    elif verdict == "faster":
        reason = f"faster than the baseline in {where} at every measured batch size"
    elif verdict == "not timed":
        reason = "no runtime timed both this variant and the baseline"
    else:
        reason = f"not measurably faster than the baseline in {where} at some batch size"
    return {"verdict": verdict, "runtime": rt, "slower_in": slower_in, "reason": reason}


def _bkey(b: str) -> tuple:
    return (0, int(b), "") if str(b).isdigit() else (1, 0, str(b))


def gate_of(result: Result, v: Variant) -> dict[str, Any]:
    """The stored gate record, or one assessed now (results written before the gate existed)."""
    stored = getattr(v, "gate", None)
    return stored if isinstance(stored, dict) and stored else assess(v, families_of(result))


def metric_drop(result: Result, v: Variant) -> float | None:
    """How much worse than the baseline the variant's primary test metric is (>= 0 is worse)."""
    m = result.primary_metric or next(iter(result.baseline.metrics), "")
    if m not in v.metrics or m not in result.baseline.metrics:
        return None
    d = result.baseline.metrics[m] - v.metrics[m]
    return -d if any(k in m.lower() for k in LOWER_IS_BETTER) else d


def best_variant(result: Result, max_drop: float = 0.01) -> Variant | None:
    """The fastest variant in its serving runtime (geometric mean of its speedups over the batch
    sizes) whose primary metric is at most ``max_drop`` below the baseline's (0.01 = 1 point),
    among those the gate does not mark "slower"; ties go to the smaller file. None if none."""
    best, key = None, None
    for v in result.variants:
        g = gate_of(result, v)
        drop = metric_drop(result, v)
        if g["verdict"] in ("slower", "not timed") or drop is None or drop > max_drop:
            continue
        per = v.speedup_vs_baseline.get(g["runtime"] or "", {}) or \
            next(iter(v.speedup_vs_baseline.values()), {})
        if not per:
            continue
        gm = 1.0
        for x in per.values():
            gm *= max(x, 1e-9)
        gm **= 1 / len(per)
        k = (gm, -v.size_bytes)
        if key is None or k > key:
            best, key = v, k
    return best
