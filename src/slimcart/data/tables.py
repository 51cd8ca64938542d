"""Reading a user's table (CSV or parquet) and checking the columns they named."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import DataError, closest

TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet", ".pq", ".parquet.brotli")


def is_table(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in TABLE_SUFFIXES)


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    name = path.name.lower()
    try:
        if ".parquet" in name or name.endswith(".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
    except Exception as exc:  # pandas/pyarrow raise many types for a broken file
        raise DataError(f"Cannot read {path} as a table: {type(exc).__name__}: {exc}",
                        "Give a CSV (comma-separated, with a header row) or a parquet file.") from None
    if df.empty:
        raise DataError(f"{path} has no rows.")
    return df


def require_columns(df: pd.DataFrame, columns: dict[str, str | list[str] | None], path: str) -> None:
    """``columns`` maps a flag name (e.g. '--label-column') to the column(s) the user named."""
    problems = []
    have = [str(c) for c in df.columns]
    for flag, names in columns.items():
        if names is None:
            problems.append(f"{flag} is required for a table dataset")
            continue
        for n in [names] if isinstance(names, str) else names:
            if n not in df.columns:
                problems.append(f"{flag}: column {n!r} is not in the file.{closest(n, have)}")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems),
                        f"Its columns are: {', '.join(have[:40])}{' ...' if len(have) > 40 else ''}.")
