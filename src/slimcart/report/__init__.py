"""Report writers: report.md, a self-contained report.html and pareto.png."""
from __future__ import annotations

from pathlib import Path

from ..result import Result
from .html import to_html
from .markdown import summary_table, to_markdown
from .plots import pareto_plot

__all__ = ["write_report", "summary_table", "to_markdown", "to_html", "pareto_plot"]


def write_report(result: Result, out_dir: Path) -> dict[str, Path]:
    """Write the plot, Markdown and HTML reports into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = pareto_plot(result, out_dir / "pareto.png")
    md = out_dir / "report.md"
    md.write_text(to_markdown(result), encoding="utf-8")
    html = out_dir / "report.html"
    html.write_text(to_html(result, png), encoding="utf-8")
    return {"markdown": md, "html": html, "pareto": png}
