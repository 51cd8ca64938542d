"""The ``.scz`` Deep Compression archive: one file holding a saved model folder for storage and
transfer. It is not run as it is: ``read_archive`` (``slimcart unarchive``) decodes it back into
a normal model folder, whose weights are exactly the archived ones, bit for bit.

Layout (integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89SCZ\\r\\n\\x1a\\n"
    8       2     u16    archive version (2; version 1 files, without per-tensor escapes and
                         half-precision parts, are read too)
    10      4     u32    H, bytes of the compressed header
    14      4     u32    crc32 of those H bytes
    18      H     header: zlib-compressed UTF-8 JSON (below)
    18 + H  ...   the sections, back to back, in the order the header lists them; nothing after

Header JSON: ``{"version": 2, "meta": slimcart.json of the folder (its "encoding" dropped),
"weights": [tensor entry ...], "examples": [tensor entry ...], "files": [{"name", "section"}],
"sections": [{"length", "crc32"}], "data_bytes": total bytes of the sections}``. A tensor entry
is the entry of archive_codec.py (dtype, shape, kind, nnz, zlib) plus ``name`` and ``parts``:
part name -> index of its section. Weights are coded by archive_codec.py (pruned + shared
tensors: Huffman-coded relative positions, Huffman-coded codebook indices and the codebook;
anything else raw); ``examples`` is the folder's example batch (its first row unless all rows
were asked for); ``files`` are the serving files (preprocess.json, tokenizer, ...) and
train.json, zlib-compressed. Every section carries a crc32, so a damaged byte is found and
named.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file

from .. import artifact
from ..errors import ModelError, UsageError
from ..meta import validate_meta
from ..output import staged_output
from . import archive_codec, decode, encode
from .sparse import encode_state as sparse_encode

MAGIC = b"\x89SCZ\r\n\x1a\n"
VERSION = 2
READS = (1, 2)
PREFIX = struct.Struct("<8sHII")
EXTRA_FILES = ("train.json",)


def _tensor_sections(tensors: dict[str, torch.Tensor], sections: list[bytes]) -> list[dict[str, Any]]:
    entries = []
    for name, t in tensors.items():
        try:
            entry, parts = archive_codec.encode_tensor(t)
        except ValueError as exc:
            raise ModelError(f"Tensor {name} cannot be archived: {exc}") from None
        entry = {"name": name, **entry, "parts": {}}
        for part, data in parts.items():
            entry["parts"][part] = len(sections)
            sections.append(data)
        entries.append(entry)
    return entries


def _weights(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = folder / meta["weights"]
    if path.suffix != ".safetensors" or not path.is_file():
        raise ModelError(f"{folder}: a {meta['format']} model ({meta['weights']}) cannot be archived; "
                         "the archive holds models whose weights are a safetensors file.",
                         "Archive the float or int8 PyTorch model folder instead of the ONNX one.")
    try:
        return decode(load_file(str(path)), meta.get("encoding"))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelError(f"Cannot read the weights {path}: {exc}") from None


def write_archive(model_folder: str | Path, path: str | Path, *, overwrite: bool = False,
                  all_examples: bool = False) -> dict[str, Any]:
    """Archive the model folder into ``path`` (written to a temporary file, then renamed).
    Returns the bytes of each part and the bytes-per-stage table (see ``stage_bytes``)."""
    folder, path = Path(model_folder), Path(path)
    if path.is_dir():
        raise UsageError(f"Output {path} is a folder; give the archive's file name, e.g. model.scz.")
    if path.exists() and not overwrite:
        raise UsageError(f"Output {path} already exists.", "Choose another name, or pass --overwrite to replace it.")
    meta = artifact.read_meta(folder)
    tensors = _weights(folder, meta)
    sections: list[bytes] = []
    header: dict[str, Any] = {"version": VERSION, "meta": {k: v for k, v in meta.items() if k != "encoding"}}
    header["weights"] = _tensor_sections(tensors, sections)
    weight_bytes = sum(len(s) for s in sections)
    examples = {}
    if (folder / artifact.EXAMPLES).is_file():
        try:
            examples = load_file(str(folder / artifact.EXAMPLES))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ModelError(f"Cannot read the example batch {folder / artifact.EXAMPLES}: {exc}") from None
        if not all_examples:
            examples = {k: v[:1].clone() for k, v in examples.items()}
    header["examples"] = _tensor_sections(examples, sections)
    header["files"] = []
    serving = [str(f) for f in meta.get("serving_files", [])]
    for name in dict.fromkeys(serving + [f for f in EXTRA_FILES if (folder / f).is_file()]):
        file = folder / name
        if not file.is_file() or not file.resolve().is_relative_to(folder.resolve()):
            raise ModelError(f"{folder}: the serving file {name} that {artifact.META} lists is missing "
                             "or outside the folder.", "Save the model again; the folder is incomplete.")
        header["files"].append({"name": name, "section": len(sections)})
        sections.append(zlib.compress(file.read_bytes(), 9))
    header["sections"] = [{"length": len(s), "crc32": zlib.crc32(s)} for s in sections]
    header["data_bytes"] = sum(len(s) for s in sections)
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    blob = PREFIX.pack(MAGIC, VERSION, len(packed), zlib.crc32(packed)) + packed + b"".join(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    example_bytes = sum(header["sections"][i]["length"] for e in header["examples"] for i in e["parts"].values())
    return {"bytes": len(blob), "weights_bytes": weight_bytes, "examples_bytes": example_bytes,
            "files_bytes": header["data_bytes"] - weight_bytes - example_bytes,
            "header_bytes": PREFIX.size + len(packed),
            "kinds": {e["name"]: e["kind"] for e in header["weights"]},
            "tensor_bytes": {e["name"]: sum(len(sections[i]) for i in e["parts"].values()) for e in header["weights"]},
            "stages": stage_bytes(tensors, weight_bytes, len(blob))}


def stage_bytes(tensors: dict[str, torch.Tensor], huffman_bytes: int, archive_bytes: int) -> list[dict[str, Any]]:
    """Bytes of the weights at each Deep Compression stage, as files: dense safetensors; pruned
    tensors in sparse form (relative indices, storage/sparse.py); + shared tensors as codebook and
    packed indices (what a saved model folder holds); + Huffman (the archive's weight sections);
    and the whole archive."""
    dense = len(save({k: v.contiguous() for k, v in tensors.items()}))
    rows = [("dense: every tensor as is", dense), ("pruned: sparse, relative indices", len(save(sparse_encode(tensors)[0]))),
            ("+ shared: codebook, packed indices", len(save(encode(tensors)[0]))),
            ("+ Huffman: archive weight sections", huffman_bytes), ("whole .scz archive", archive_bytes)]
    return [{"stage": s, "bytes": b, "ratio": dense / max(b, 1)} for s, b in rows]


def _fail(path: Path, what: str) -> ModelError:
    return ModelError(f"{path}: {what}", "The archive is damaged or not a slimcart .scz archive; "
                      "copy it again or write a new one with `slimcart archive`.")


def _parse(path: Path) -> tuple[dict[str, Any], list[bytes]]:
    if not path.is_file():
        raise UsageError(f"Archive {path} does not exist.")
    blob = path.read_bytes()
    if len(blob) < PREFIX.size or blob[:8] != MAGIC:
        raise _fail(path, "wrong magic bytes: not a .scz archive")
    _, version, hlen, crc = PREFIX.unpack_from(blob)
    if version not in READS:
        raise _fail(path, f"archive version {version}; this slimcart reads versions "
                          f"{', '.join(map(str, READS))}")
    packed = blob[PREFIX.size:PREFIX.size + hlen]
    if len(packed) < hlen:
        raise _fail(path, f"truncated: the header needs {hlen} bytes, the file ends after {len(packed)}")
    if zlib.crc32(packed) != crc:
        raise _fail(path, "the header's checksum does not match: the header is damaged")
    try:
        header = json.loads(zlib.decompress(packed))
        sizes = [int(s["length"]) for s in header["sections"]]
        header["meta"], header["weights"], header["examples"], header["files"]  # noqa: B018
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise _fail(path, f"the header cannot be read: {exc}") from None
    data, start = blob[PREFIX.size + hlen:], 0
    if len(data) != sum(sizes):
        what = "truncated" if len(data) < sum(sizes) else "has trailing bytes"
        raise _fail(path, f"{what}: the sections hold {len(data)} bytes, the header says {sum(sizes)}")
    sections = []
    for i, (size, rec) in enumerate(zip(sizes, header["sections"])):
        part = data[start:start + size]
        if zlib.crc32(part) != rec.get("crc32"):
            raise _fail(path, f"section {i} ({_owner(header, i)}) is damaged: its checksum does not match")
        sections.append(part)
        start += size
    return header, sections


def _owner(header: dict[str, Any], index: int) -> str:
    for group in ("weights", "examples"):
        for e in header.get(group, []):
            for part, i in e.get("parts", {}).items():
                if i == index:
                    return f"{group} tensor {e.get('name')}, part {part}"
    for f in header.get("files", []):
        if f.get("section") == index:
            return f"file {f.get('name')}"
    return "unlisted"


def _tensors(path: Path, entries: list[dict[str, Any]], sections: list[bytes]) -> dict[str, torch.Tensor]:
    out = {}
    for e in entries:
        try:
            parts = {p: sections[i] for p, i in e["parts"].items()}
            out[e["name"]] = archive_codec.decode_tensor(e, parts)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _fail(path, f"tensor {e.get('name')!r} cannot be decoded: {exc}") from None
    return out


def read_archive(path: str | Path, out_folder: str | Path, *, overwrite: bool = False) -> Path:
    """Decode the archive into a new model folder (written aside, then renamed into place)."""
    path, out = Path(path), Path(out_folder)
    if out.exists() and not overwrite:
        raise UsageError(f"Output {out} already exists.", "Choose another folder, or pass --overwrite to replace it.")
    header, sections = _parse(path)
    weights = _tensors(path, header["weights"], sections)
    examples = _tensors(path, header["examples"], sections)
    meta = header["meta"]
    if not isinstance(meta, dict) or any(k not in meta for k in ("format", "weights", "model")) \
            or not str(meta["weights"]).endswith(".safetensors"):
        raise _fail(path, "the header's model description (slimcart.json) is incomplete")
    validate_meta(meta, path)
    with staged_output(out, overwrite) as stage:
        for f in header["files"]:
            name = str(f.get("name", ""))
            target = (stage / name).resolve()
            if not name or not target.is_relative_to(stage.resolve()) or name in (artifact.META, artifact.EXAMPLES, meta["weights"]):
                raise _fail(path, f"a file entry names {name!r}, outside the model folder or one of its own files")
            try:
                data = zlib.decompress(sections[f["section"]])
            except (zlib.error, IndexError, KeyError, TypeError) as exc:
                raise _fail(path, f"file {name} cannot be decoded: {exc}") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        stored, meta["encoding"] = encode(weights)
        save_file(stored, str(stage / meta["weights"]))
        if examples:
            save_file({k: v.contiguous() for k, v in examples.items()}, str(stage / artifact.EXAMPLES))
        (stage / artifact.META).write_text(json.dumps(meta, indent=2))
        artifact.read_meta(stage)  # the rebuilt folder must describe a model
    return out
