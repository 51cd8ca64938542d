"""Where data lives: a directory the user names (flag or SLIMCART_DATA_DIR), the datasets
shipped inside the package, and system locations (Debian's dataset packages)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError

ENV_VAR = "SLIMCART_DATA_DIR"
BUNDLED = Path(__file__).resolve().parent.parent / "bundled" / "data"
SYSTEM = {"images/fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


def user_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The data directory the user set, checked to exist."""
    value = explicit if explicit is not None else os.environ.get(ENV_VAR) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    source = "--data-dir" if explicit is not None else f"${ENV_VAR}"
    if not path.is_dir():
        raise DataError(f"Data directory {path} (from {source}) does not exist.",
                        f"Create it, or point {source} at the folder that holds the datasets "
                        "(e.g. intent/, images/, recsys/).")
    return path


def find(candidates: list[str], what: str, data_dir: str | Path | None = None) -> Path:
    """The first existing path among ``candidates`` (relative paths) in the user's data
    directory, then the shipped data, then system locations."""
    roots = [r for r in (user_data_dir(data_dir), BUNDLED) if r is not None]
    looked: list[Path] = []
    for root in roots:
        for rel in candidates:
            p = root / rel
            looked.append(p)
            if p.exists():
                return p
    for rel in candidates:
        if rel in SYSTEM:
            looked.append(SYSTEM[rel])
            if SYSTEM[rel].exists():
                return SYSTEM[rel]
    where = "\n".join(f"  {p}" for p in looked)
    raise DataError(f"Dataset {what} was not found. Looked in:\n{where}",
                    f"Set --data-dir or ${ENV_VAR} to the folder that holds it.")
