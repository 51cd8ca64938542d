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


class Variant(BaseModel):
    """One model: the baseline or the output of a recipe."""

    model_config = ConfigDict(extra="allow")

    name: str
    recipe: str | None = None
    artifact: str
    format: str
    size_bytes: int = Field(ge=0)
    metrics: dict[str, float]
    latency_ms: dict[str, dict[str, Percentiles]]           # runtime -> batch -> percentiles
    throughput: dict[str, dict[str, float]] = {}            # runtime -> batch -> samples/s
    speedup_vs_baseline: dict[str, dict[str, float]]        # runtime -> batch -> x
    compression_ratio: float
    agreement: dict[str, float] = {}
    peak_memory_mb: dict[str, float] = {}                   # runtime -> peak RSS in MB
    model_memory_mb: dict[str, float] = {}                  # runtime -> peak RSS above the runtime's own
    stages: list[dict[str, Any]] = []
    notes: list[str] = []


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
