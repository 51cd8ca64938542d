"""The schema of result.json: the baseline and every variant, with size, metrics and latency."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import DataError


class Percentiles(BaseModel):
    """Latency percentiles in milliseconds for one runtime and batch size."""

    model_config = ConfigDict(extra="allow")

    p50: float
    p95: float
    p99: float
    mean: float | None = None
    runs: int | None = None
    calls_per_block: int | None = None  # timed back-to-back calls per round (after one untimed)
    p50_low: float | None = None        # bootstrap 95% interval of the p50 (rounds resampled)
    p50_high: float | None = None


class Speedup(BaseModel):
    """Baseline p50 / variant p50 in the same runtime and batch, with a paired-bootstrap 95%
    interval; ``verdict`` is "no measured difference" when the interval includes 1.0 (or the
    difference is under 3%)."""

    model_config = ConfigDict(extra="allow")

    x: float
    low: float
    high: float
    verdict: str


class Variant(BaseModel):
    """One model: the baseline or the output of a recipe."""

    model_config = ConfigDict(extra="allow")

    name: str
    recipe: str | None = None
    artifact: str
    format: str
    size_bytes: int = Field(ge=0)                           # model file + spec JSON of `artifact`
    size_bytes_served: dict[str, int] = {}                  # runtime -> bytes of the artifact it serves
    bundle_bytes: int | None = None                         # model + preprocessing files (tokenizer, vocabularies)
    served: dict[str, str] = {}                             # runtime -> folder of the artifact it serves
    served_parity: dict[str, dict[str, float]] = {}         # runtime -> max abs output diff vs the scored runtime
    metrics: dict[str, float]                               # on the test split
    val_metrics: dict[str, float] = {}                      # on the validation split (what selection uses)
    latency_ms: dict[str, dict[str, Percentiles]]           # runtime -> batch -> percentiles (interleaved)
    latency_deployed_ms: dict[str, dict[str, Percentiles]] = {}  # runtime alone, with its default options
    throughput: dict[str, dict[str, float]] = {}            # runtime -> batch -> samples/s, sustained load
    setup_s: dict[str, dict[str, float]] = {}               # runtime -> "build" / batch / "total" -> seconds:
    #   building the runner; its first call with that batch's shapes (torch.compile: compile + first
    #   run); build + first calls with every shape it saw (scoring too). Never part of latency_ms
    speedup_vs_baseline: dict[str, dict[str, float]]        # runtime -> batch -> x
    speedup: dict[str, dict[str, Speedup]] = {}             # runtime -> batch -> x with its interval
    compression_ratio: float
    agreement: dict[str, float] = {}
    peak_memory_mb: dict[str, float] = {}                   # runtime -> peak RSS in MB
    model_memory_mb: dict[str, float] = {}                  # runtime -> peak RSS above the runtime's own
    stages: list[dict[str, Any]] = []
    notes: list[str] = []
    gate: dict[str, Any] = {}   # the speedup gate (slimcart.gate): verdict, runtime, slower_in, reason


class Result(BaseModel):
    """Everything one run measured."""

    model_config = ConfigDict(extra="allow")

    task: str
    dataset: str
    threads: int
    primary_metric: str = ""
    baseline: Variant
    variants: list[Variant]
    environment: dict[str, Any] = {}
    created: str = ""
    runtimes: list[dict[str, Any]] = []        # each runtime's options, as used for timing
    model_source: str = ""                     # what the baseline was made from
    selection: str = ""                        # which split chose the variants
    gated: list[dict[str, Any]] = []           # variants dropped by `compress --gate`: name, reason

    def variant_rows(self) -> list[Variant]:
        """The baseline first, then the variants in run order."""
        return [self.baseline, *self.variants]


def validate_result(data: dict) -> Result:
    """Check a result dict; raises pydantic.ValidationError listing every problem."""
    return Result.model_validate(data)


def load_result(path: str | Path) -> Result:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"result file not found: {path}",
                        "Pass the result.json written by a compress run.") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    return validate_result(data)


def save_result(result: Result, path: str | Path) -> Path:
    """Write ``result`` as indented JSON."""
    path = Path(path)
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path
