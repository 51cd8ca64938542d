"""The `slimcart archive` and `slimcart unarchive` commands (registered onto cli.app by cli.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

out = Console(width=None if sys.stdout.isatty() else 200)


def archive(model_dir: Path = typer.Argument(..., help="A model folder saved by slimcart (torch or torch_int8)."),
            out_path: Path = typer.Argument(..., metavar="OUT.scz", help="The archive to write."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT.scz if it exists."),
            all_examples: bool = typer.Option(False, "--all-examples", help=(
                "Keep the whole example batch (default: its first row, enough to benchmark the "
                "unarchived folder)."))) -> None:
    """Pack a model folder into a .scz Deep Compression archive (Huffman-coded relative indices
    and codebook indices, checksummed) and print the bytes at each stage.

    An archive is for storage and transfer: `slimcart unarchive` decodes it back into a model
    folder (the same weights, bit for bit) to run.

    Example: slimcart archive runs/product_image/artifacts/deep-compression model.scz
    """
    from .storage.archive import write_archive

    info = write_archive(model_dir, out_path, overwrite=overwrite, all_examples=all_examples)
    table = Table("stage", "bytes", "vs dense", title=f"{model_dir} -> {out_path}")
    for row in info["stages"]:
        table.add_row(row["stage"], f"{row['bytes']:,}", f"{row['ratio']:.1f}x")
    out.print(table)
    kinds: dict[str, int] = {}
    for kind in info["kinds"].values():
        kinds[kind] = kinds.get(kind, 0) + 1
    out.print(f"archive {info['bytes']:,} bytes: weights {info['weights_bytes']:,}, header "
              f"{info['header_bytes']:,}, examples {info['examples_bytes']:,}, other files "
              f"{info['files_bytes']:,}; tensors by coding: "
              + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    out.print("The archive is for storage and transfer; `slimcart unarchive` rebuilds the model folder to run.")


def unarchive(archive_path: Path = typer.Argument(..., metavar="ARCHIVE.scz", help="An archive written by "
                                                  "`slimcart archive`."),
              out_dir: Path = typer.Argument(..., help="The model folder to create."),
              overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists.")) -> None:
    """Decode a .scz archive back into a slimcart model folder (checksums verified, weights
    restored bit for bit).

    Example: slimcart unarchive model.scz runs/restored
    """
    from . import artifact
    from .storage.archive import read_archive

    folder = read_archive(archive_path, out_dir, overwrite=overwrite)
    meta = artifact.read_meta(folder)
    out.print(f"rebuilt {folder} ({meta['format']} model {meta['model'].get('arch')}, "
              f"{artifact.size_bytes(folder):,} bytes on disk)")


def register(app: typer.Typer) -> None:
    app.command()(archive)
    app.command()(unarchive)
