"""HTTP request bodies -> a bundle's raw input; a bad body raises BadRequest (a 4xx and a message).

intent:        JSON ``{"text": "..."}`` or ``{"texts": ["...", ...]}``
ctr:           JSON ``{"rows": [{"column": value, ...}, ...]}``; values missing from a column's
               training vocabulary get the fallback id 0, as in ``slimcart predict``; unknown
               column names are refused (a typo would otherwise look like a missing value)
product_image: JSON ``{"image": BASE64}`` or ``{"images": [BASE64, ...]}``, a multipart form with
               file fields, or the image file itself as the body (Content-Type image/...)
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError

SCALARS = (str, int, float, bool, type(None))


class BadRequest(Exception):
    def __init__(self, status: int, message: str, hint: str | None = None):
        super().__init__(message)
        self.status, self.message, self.hint = status, message, hint


@dataclass
class Payload:
    raw: Any                      # what Bundle.read takes: texts, a DataFrame, uint8 image arrays
    names: list[str] | None       # shown as the "input" of each prediction, where there are names


def parse(bundle, content_type: str, body: bytes, max_items: int) -> Payload:
    kind = bundle.spec["kind"]
    ctype = (content_type or "").split(";")[0].strip().lower()
    if kind == "image" and (ctype.startswith("multipart/") or ctype.startswith("image/")):
        files = _multipart(content_type, body) if ctype.startswith("multipart/") else [("<body>", body)]
        return _images(bundle, files, max_items, named=True)
    if ctype.startswith(("multipart/", "image/")):  # any other type is read as JSON (curl -d sends form type)
        raise BadRequest(415, f"Content-Type {ctype!r} is not accepted by a {bundle.task} model.",
                         "Send a JSON object (application/json).")
    doc = _json(body)
    if kind == "text":
        return Payload(_texts(doc, max_items), None)
    if kind in ("table", "ids"):
        return Payload(_rows(doc, _columns(bundle), max_items, bundle), None)
    items = _one_or_many(doc, "image", "images", str, "a base64 string", max_items)
    return _images(bundle, [(f"image[{i}]", _b64(v, i)) for i, v in enumerate(items)], max_items, named=False)


def example(bundle) -> str:
    kind = bundle.spec["kind"]
    if kind == "text":
        return '{"text": "where is my parcel?"} or {"texts": ["...", "..."]}'
    if kind == "image":
        return '{"image": "<base64 of a PNG/JPEG file>"}, a multipart file upload, or the file as the body'
    cols = _columns(bundle)
    return '{"rows": [{' + ", ".join(f'"{c}": ...' for c in cols[:4]) + (", ..." if len(cols) > 4 else "") + "}]}"


def _json(body: bytes) -> dict:
    if not body.strip():
        raise BadRequest(400, "The request body is empty.", "Send a JSON object.")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(doc, dict):
        raise BadRequest(422, f"The request body must be a JSON object, got {type(doc).__name__}.")
    return doc


def _one_or_many(doc: dict, one: str, many: str, typ: type, what: str, max_items: int) -> list:
    extra = sorted(set(doc) - {one, many})
    if extra:
        raise BadRequest(422, f"Unknown field(s) {', '.join(map(repr, extra))}.",
                         f"Send {{\"{one}\": ...}} or {{\"{many}\": [...]}}.")
    if (one in doc) == (many in doc):
        raise BadRequest(422, f"Send exactly one of the fields {one!r} or {many!r}.")
    if one in doc:
        items, field = [doc[one]], one
    else:
        items, field = doc[many], many
        if not isinstance(items, list) or not items:
            raise BadRequest(422, f"Field {many!r} must be a non-empty list.")
    _check_count(len(items), max_items, field)
    for i, v in enumerate(items):
        if not isinstance(v, typ):
            where = field if one in doc else f"{many}[{i}]"
            raise BadRequest(422, f"Field {where!r} must be {what}, got {type(v).__name__}.")
    return items


def _check_count(n: int, max_items: int, field: str) -> None:
    if n > max_items:
        raise BadRequest(413, f"Field {field!r} holds {n} items; this server takes at most {max_items} "
                              "per request.", "Split the request, or start the server with a higher --max-items.")


def _texts(doc: dict, max_items: int) -> list[str]:
    return _one_or_many(doc, "text", "texts", str, "a string", max_items)


def _columns(bundle) -> list[str]:
    pre = bundle.preprocessor
    cols = getattr(pre, "columns", None) or bundle.spec["categorical"] + bundle.spec["dense"]
    return list(dict.fromkeys(cols))


def _rows(doc: dict, columns: list[str], max_items: int, bundle) -> pd.DataFrame:
    extra = sorted(set(doc) - {"rows"})
    if extra:
        raise BadRequest(422, f"Unknown field(s) {', '.join(map(repr, extra))}; send the field 'rows' only.")
    if "rows" not in doc:
        raise BadRequest(422, "The field 'rows' is missing.")
    rows = doc["rows"]
    if not isinstance(rows, list) or not rows:
        raise BadRequest(422, "Field 'rows' must be a non-empty list of objects.")
    _check_count(len(rows), max_items, "rows")
    known = set(columns)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(422, f"rows[{i}] must be an object (column -> value), got {type(row).__name__}.")
        unknown = [c for c in row if c not in known]
        missing = [c for c in columns if c not in row]
        problems = ([f"unknown column(s) {', '.join(map(repr, unknown))}"] if unknown else []) + \
            ([f"missing column(s) {', '.join(map(repr, missing))}"] if missing else [])
        if problems:
            raise BadRequest(422, f"rows[{i}]: {'; '.join(problems)}.",
                             f"The model takes the columns: {', '.join(columns)}.")
        bad = [c for c, v in row.items() if not isinstance(v, SCALARS)]
        if bad:
            raise BadRequest(422, f"rows[{i}]: column {bad[0]!r} must be a string, number, boolean or null, "
                                  f"got {type(row[bad[0]]).__name__}.")
    df = pd.DataFrame(rows, columns=columns)
    for c in getattr(bundle.preprocessor, "str_columns", []):  # as `slimcart predict` reads a CSV
        df[c] = df[c].map(lambda v: v if v is None else str(v)).astype(object)
    return df


def _b64(value: str, i: int) -> bytes:
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(422, f"image[{i}] is not valid base64.") from None


def _multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    from email import policy
    from email.parser import BytesParser

    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    files = [(part.get_filename() or part.get_param("name", header="content-disposition") or f"file[{i}]",
              part.get_payload(decode=True) or b"")
             for i, part in enumerate(msg.iter_parts())] if msg.is_multipart() else []
    if not files:
        raise BadRequest(422, "The multipart body holds no file.", "Send the image as a form file field.")
    return files


def _images(bundle, files: list[tuple[str, bytes]], max_items: int, named: bool) -> Payload:
    """Decode each image as ``slimcart predict`` decodes an image file (data.images._open)."""
    from ..data.images import _open

    _check_count(len(files), max_items, "images")
    h, w, c = bundle.preprocessor.shape
    if h != w:
        raise BadRequest(422, f"This model takes {h}x{w} images; image files are served to square models only.")
    arrays = []
    for name, data in files:
        if not data:
            raise BadRequest(422, f"{name} is empty.", "Send the bytes of a PNG/JPEG image.")
        try:
            arrays.append(_open(io.BytesIO(data), bundle.spec["mode"], h).reshape(h, w, c))
        except DataError:
            raise BadRequest(422, f"{name} is not a readable image.", "Send a PNG, JPEG or other image "
                             "file PIL can read.") from None
    return Payload([np.ascontiguousarray(a) for a in arrays], [n for n, _ in files] if named else None)
