"""Output folders written atomically: work happens in a hidden sibling folder that is renamed
into place at the end, so a failed run leaves nothing half-written and nothing of the user's
is touched unless they asked for --overwrite."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UsageError


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output before any work starts."""
    if out.exists() and not overwrite:
        raise UsageError(f"Output {out} already exists.",
                         "Choose another --out, or pass --overwrite to replace it.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"Output {out} exists and is not a folder; remove it or choose another --out.")


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
