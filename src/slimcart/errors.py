"""Errors a user can act on. Each message says what went wrong, where, and what to do."""
from __future__ import annotations


class SlimcartError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n{hint}")


class UsageError(SlimcartError):
    """Bad command-line or API arguments: unknown task, dataset, technique, existing output."""


class DataError(SlimcartError):
    """Data that cannot be found or read: missing directory, missing column, broken image."""


class ModelError(SlimcartError):
    """A model or artifact that cannot be loaded, exported or transformed."""


class RecipeError(SlimcartError):
    """A recipe with one or more problems; every problem is listed with its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"Recipe {source} has {len(problems)} problem(s):\n{lines}",
            "Fix the keys above; `slimcart validate RECIPE` checks a recipe without running it.",
        )


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A 'did you mean' suffix for an unknown name, or an empty string."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(match)}?" if match else ""
