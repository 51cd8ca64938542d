"""A self-contained HTML report: inline CSS, the plot embedded, no external references."""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from ..result import Result
from .markdown import Block, Bullets, Heading, Image, Para, Pre, Table, build_blocks

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f6f6; border: 1px solid #e2e2e2; padding: .5rem; font-size: .8rem;
      max-height: 24rem; overflow: auto; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; }
.scroll { overflow-x: auto; }
"""


def _img(block: Image, png: Path | None) -> str:
    if png is None or not Path(png).is_file():
        return "<p><em>plot not available</em></p>"
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<p><img alt="{escape(block.alt)}" src="data:image/png;base64,{data}"></p>'


def _html(block: Block, png: Path | None) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{escape(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        label = f"<strong>{escape(block.label)}</strong> " if block.label else ""
        return f"<p>{label}{escape(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{escape(h)}</th>" for h in block.headers)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                       for row in block.rows)
        return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table></div>")
    if isinstance(block, Pre):
        return "<pre>" + escape("\n".join(block.lines)) + "</pre>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in block.items) + "</ul>"
    return _img(block, png)


def to_html(result: Result, png_path: Path | None) -> str:
    title = escape(f"slimcart report: {result.task} on {result.dataset}")
    body = "\n".join(_html(b, png_path) for b in build_blocks(result))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")
