"""Recipes: an ordered list of technique stages plus how to measure the result.

YAML and Python build the same object. Validation is strict and gathers every problem at
once (unknown keys, wrong types, impossible values, unknown techniques, impossible stage
order), each with its key path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import registry
from .errors import RecipeError, UsageError, closest

class MeasureConfig(BaseModel):
    """How variants are measured. Timings are interleaved across variants in rounds, in a fresh
    seeded order each round, with the same number of timed calls for every case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 32], min_length=1)
    runtimes: list[Any] = Field(default_factory=lambda: ["torch", "onnxruntime"], min_length=1, description=(
        "runtime names, or mappings {runtime: NAME, label: ..., options...} (see `slimcart runtimes`)"))
    rounds: int = Field(default=30, ge=30, description=(
        "timed rounds per variant, batch and runtime; each round times a block of back-to-back calls"))
    calls_per_block: int = Field(default=3, ge=1, le=50, description="timed calls per case per round")
    warmup: int = Field(default=3, ge=1)
    seed: int = Field(default=0, description="seed of the per-round order and of the bootstrap")
    threads: int | None = Field(default=None, ge=1, description="None: torch's default")
    eval_limit: int | None = Field(default=None, ge=1, description="rows scored per split; None: all")
    memory: bool = True
    deployed: bool = Field(default=True, description=(
        "also time each runtime alone with its default options (ONNX Runtime: its threads, spinning on)"))
    throughput_seconds: float = Field(default=1.0, ge=0.0, le=60.0, description=(
        "sustained back-to-back calls per case for throughput at the largest batch; 0: skip"))

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, value: list[Any]) -> list[Any]:
        from .measure.runtimes import parse_choice

        labels = [parse_choice(v).label for v in value]
        if len(set(labels)) != len(labels):
            raise ValueError(f"runtime labels must be distinct, got {labels}; give each a 'label'")
        return value

    def runtime_choices(self):
        from .measure.runtimes import parse_choice

        return [parse_choice(v) for v in self.runtimes]


@dataclass
class Recipe:
    stages: list[registry.TechniqueConfig]
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    name: str = "recipe"
    description: str = ""
    source: str = "<python>"
    input: str = registry.TORCH  # the model format the recipe starts from (onnx: for an ONNX file)

    # ---- building -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"Recipe file {path} does not exist.",
                             "List shipped recipes with `slimcart recipes`.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise RecipeError(str(path), [f"not UTF-8 text (byte {exc.start}); a recipe must be a "
                                          "UTF-8 YAML file; save it as UTF-8"]) from None
        except yaml.YAMLError as exc:
            raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
        return cls.from_dict(raw, source=str(path), default_name=path.stem)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>", default_name: str = "recipe") -> "Recipe":
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise RecipeError(source, ["the recipe must be a mapping with a 'stages' list"])
        allowed = {"version", "name", "description", "input", "stages", "measure"}
        for key in raw:
            if key not in allowed:
                problems.append(f"{key}: unknown key.{closest(str(key), sorted(allowed))}"
                                f" Allowed: {', '.join(sorted(allowed))}")
        if raw.get("version", 1) != 1:
            problems.append(f"version: only version 1 is known, got {raw.get('version')!r}")
        for key in ("name", "description"):
            if key in raw and not isinstance(raw[key], str):
                problems.append(f"{key}: must be a string")
        from .formats import formats

        start = raw.get("input", registry.TORCH)
        if start not in formats():
            problems.append(f"input: the model format the recipe starts from; one of {', '.join(formats())}, "
                            f"got {start!r}")
            start = registry.TORCH
        stages: list[registry.TechniqueConfig] = []
        raw_stages = raw.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            problems.append("stages: a non-empty list of stages is required")
            raw_stages = []
        for i, st in enumerate(raw_stages):
            cfg = _parse_stage(st, f"stages[{i}]", problems)
            if cfg is not None:
                stages.append(cfg)
        measure = MeasureConfig()
        if "measure" in raw:
            try:
                measure = MeasureConfig.model_validate(raw["measure"] or {})
            except ValidationError as exc:
                problems += _pydantic_problems(exc, "measure")
        if not problems:
            problems += check_order(stages, start)
        if problems:
            raise RecipeError(source, problems)
        return cls(stages=stages, measure=measure, name=raw.get("name", default_name),
                   description=raw.get("description", ""), source=source, input=start)

    def __post_init__(self) -> None:
        problems = check_order(self.stages, self.input)
        if problems:
            raise RecipeError(self.source, problems)

    # ---- output ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "name": self.name,
            "description": self.description,
            "input": self.input,
            "stages": [{"type": technique_name(s), **s.model_dump(mode="json")} for s in self.stages],
            "measure": self.measure.model_dump(mode="json"),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def final_format(self, start: str | None = None) -> str:
        fmt = start or self.input
        for s in self.stages:
            fmt = registry.get(technique_name(s)).produces or fmt
        return fmt


def technique_name(cfg: registry.TechniqueConfig) -> str:
    for name, tech in registry.techniques().items():
        if type(cfg) is tech.config_cls:
            return name
    raise UsageError(f"{type(cfg).__name__} is not the config of a registered technique.")


def check_order(stages: list[registry.TechniqueConfig], start: str = registry.TORCH,
                start_name: str = "the baseline") -> list[str]:
    """Each stage must accept the model format that the stages before it produce (``start``:
    the format of the model the recipe is applied to)."""
    problems: list[str] = []
    fmt, made_by = start, start_name
    for i, cfg in enumerate(stages):
        name = technique_name(cfg)
        tech = registry.get(name)
        if fmt not in tech.accepts:
            fix = "reorder the stages" if i else ("use a recipe for this kind of model (e.g. one "
                                                   "with `input: onnx` for an ONNX file)")
            problems.append(
                f"stages[{i}] ({name}): needs a {' or '.join(tech.accepts)} model but gets a {fmt}"
                f" model from {made_by}; {fix}")
        fmt = tech.produces or fmt
        made_by = f"stages[{i}] ({name})"
    return problems


def _parse_stage(st: Any, path: str, problems: list[str]) -> registry.TechniqueConfig | None:
    if not isinstance(st, dict) or "type" not in st:
        problems.append(f"{path}: each stage is a mapping with a 'type' key naming a technique")
        return None
    name = st["type"]
    table = registry.techniques()
    if not isinstance(name, str):
        problems.append(f"{path}.type: must be a technique name (a string), got {name!r}."
                        f" Known: {', '.join(table)}")
        return None
    if name not in table:
        problems.append(f"{path}.type: unknown technique {name!r}.{closest(str(name), list(table))}"
                        f" Known: {', '.join(table)}")
        return None
    body = {k: v for k, v in st.items() if k != "type"}
    try:
        return table[name].config_cls.model_validate(body)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, path)
        return None


def _pydantic_problems(exc: ValidationError, prefix: str) -> list[str]:
    out = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else f".{part}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        out.append(f"{loc}: {msg}")
    return out


def resolve(recipe: "str | Path | Recipe | dict") -> Recipe:
    """A Recipe from a path, a shipped recipe name (``intent/onnx-int8``), a dict or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    path = Path(recipe)
    if not path.exists():
        shipped = shipped_recipes()
        key = str(recipe).removesuffix(".yaml")
        if key in shipped:
            rec = Recipe.load(shipped[key])
            rec.source = key
            return rec
        else:
            raise UsageError(f"Recipe {recipe} is neither a file nor a shipped recipe."
                             f"{closest(key, list(shipped))}",
                             f"Shipped recipes: {', '.join(shipped)}.")
    return Recipe.load(path)


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped with slimcart, by ``task/name``."""
    root = Path(__file__).parent / "bundled" / "recipes"
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(root.glob("*/*.yaml"))}
