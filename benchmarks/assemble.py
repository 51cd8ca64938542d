"""Join benchmarks/results/*.md into BENCHMARKS.md with a header on how to read them."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from slimcart.pipeline import environment

ORDER = ["main.md", "pruning-product_image.md", "pruning-intent.md", "pruning-ctr.md", "embedding_rows.md"]
HEADINGS = {"pruning-": "## Pruning: structured, gradual, N:M\n"}  # before the first file of a group


def main() -> None:
    res = Path(__file__).parent / "results"
    env = environment()
    parts = [
        "# Benchmarks\n",
        f"Assembled on {dt.date.today()} from `benchmarks/results/` ({env['cpu']}, {env['machine']}, "
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}). Rerun: `python benchmarks/run.py`, "
        "`python benchmarks/pruning.py`, `python benchmarks/embedding_rows.py`, then "
        "`python benchmarks/assemble.py` (or `make bench`).\n",
        "How to read: every cell is measured, never estimated. Size is the bytes of the saved artifact "
        "(weights file + JSON spec). Latency is p50 per batch in ms; the number in brackets is the "
        "speedup against the baseline in the same runtime, timed in the same process with all variants "
        "interleaved in rounds, each round a block of back-to-back calls per variant (this machine "
        "drifts 20-30% between runs, so compare ratios within "
        "a section, not absolute ms across sections). Metric deltas are in points (x100) against the "
        "baseline on the same test rows. `—` means the runtime cannot serve that artifact (each "
        "report's notes say why).\n",
    ]
    names = sorted(p.name for p in res.glob("*.md"))
    for name in sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        for prefix, heading in HEADINGS.items():
            if name.startswith(prefix) and heading not in parts:
                parts.append(heading)
        parts.append((res / name).read_text())
    Path("BENCHMARKS.md").write_text("\n".join(parts))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
