"""Canonical Huffman coding of a stream of non-negative integer symbols (bytes, gaps, indices).

Code lengths come from the symbol frequencies (classic Huffman tree, limited to ``MAX_LEN`` bits
by halving the frequencies until the longest code fits); codes are canonical: sorted by (length,
symbol), each code is the previous one plus one, shifted left when the length grows. So the
lengths alone define the code and are all that is stored. A stream holding a single distinct
symbol gets the one-bit code ``0``.

Layout of an encoded stream (``varint``: unsigned LEB128, 7 bits per byte, low bits first)::

    varint  n          number of symbols; a stream with n = 0 ends here
    varint  lo         smallest symbol that has a code
    varint  span       code lengths follow for symbols lo .. lo + span - 1 (0: no code)
    u8      w          bits per stored code length (1..5)
    bytes   lengths    span values of w bits each, most significant bit first, zero-padded to a byte
    u8      log2(B)    block size: the symbols are cut into blocks of B symbols (the last may be shorter)
    varint  delta[i]   for each block after the first: bits from the start of the previous block
    varint  nbits      payload length in bits
    bytes   payload    the codes, one after the other, most significant bit of each code first,
                       packed into bytes most significant bit first (np.packbits order),
                       zero-padded to a whole byte

The block starts let the decoder decode every block at once, one symbol of each block per numpy
step (a window of ``max length`` bits at each block's position looks up (symbol, length) in a
table of ``2**max_length`` entries), so decoding costs ``B`` numpy steps whatever the stream
length. The decoder checks that every code is valid and that each block ends exactly where the
next one starts; a damaged stream raises ValueError.
"""
from __future__ import annotations

import heapq

import numpy as np

MAX_LEN = 20      # longest code; the decoder table has 2**max_length entries
BLOCK_LOG2 = 12   # 4096 symbols per block


# ---- code construction ---------------------------------------------------------------------

def _tree_lengths(freqs: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over ``freqs`` (all > 0, at least two)."""
    m = len(freqs)
    heap = [(int(f), i) for i, f in enumerate(freqs)]
    heapq.heapify(heap)
    parent = [0] * (2 * m - 1)
    node = m
    while len(heap) > 1:
        fa, a = heapq.heappop(heap)
        fb, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (fa + fb, node))
        node += 1
    depth = [0] * (2 * m - 1)
    for i in range(2 * m - 3, -1, -1):  # parents have larger ids than their children
        depth[i] = depth[parent[i]] + 1
    return np.asarray(depth[:m], dtype=np.int64)


def code_lengths(freqs: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Code length of each symbol (0 for a symbol of frequency 0), at most ``max_len`` bits."""
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(len(freqs), dtype=np.int64)
    used = np.flatnonzero(freqs > 0)
    if len(used) > 1 << max_len:
        raise ValueError(f"{len(used)} distinct symbols do not fit codes of at most {max_len} bits")
    if len(used) == 1:
        lengths[used] = 1
    elif len(used) > 1:
        f = freqs[used]
        while True:
            got = _tree_lengths(f)
            if got.max() <= max_len:
                break
            f = np.maximum(1, f >> 1)  # flatter frequencies, shallower tree
        lengths[used] = got
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (right-aligned in ``lengths[s]`` bits; 0 where no code)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    used = np.flatnonzero(lengths > 0)
    if len(used) == 0:
        return codes
    order = used[np.lexsort((used, lengths[used]))]
    k = int(lengths.max())
    span = np.int64(1) << (k - lengths[order])         # share of the K-bit code space
    start = np.concatenate([[0], np.cumsum(span)[:-1]])
    codes[order] = start >> (k - lengths[order])
    return codes


# ---- varints and bit fields ----------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def varint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise ValueError("huffman stream: truncated or malformed header")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def take(self, count: int) -> np.ndarray:
        if self.pos + count > len(self.data):
            raise ValueError(f"huffman stream: truncated (needs {self.pos + count} bytes, has {len(self.data)})")
        out = np.frombuffer(self.data[self.pos:self.pos + count], dtype=np.uint8)
        self.pos += count
        return out


def _pack_fields(values: np.ndarray, width: int) -> bytes:
    bits = (values[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()


def _unpack_fields(data: np.ndarray, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(data)[:count * width].reshape(count, width).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(width - 1, -1, -1))


# ---- encoding and decoding -----------------------------------------------------------------

def encode(symbols: np.ndarray) -> bytes:
    """The canonical Huffman stream of ``symbols`` (non-negative integers), as bytes."""
    s = np.asarray(symbols).reshape(-1)
    if len(s) == 0:
        return _varint(0)
    if s.dtype.kind not in "iub" or int(s.min()) < 0:
        raise ValueError("huffman: symbols must be non-negative integers")
    s = s.astype(np.int64)
    lo = int(s.min())
    lengths = code_lengths(np.bincount(s - lo))
    codes = canonical_codes(lengths)
    lens, code = lengths[s - lo], codes[s - lo]
    ends = np.cumsum(lens)
    starts = ends - lens
    nbits = int(ends[-1])
    bits = np.zeros(nbits, dtype=np.uint8)
    for b in range(int(lengths.max())):
        sel = lens > b
        bits[starts[sel] + b] = (code[sel] >> (lens[sel] - 1 - b)) & 1
    width = max(1, int(lengths.max()).bit_length())
    block_starts = starts[::1 << BLOCK_LOG2]
    out = [_varint(len(s)), _varint(lo), _varint(len(lengths)), bytes([width]),
           _pack_fields(lengths, width), bytes([BLOCK_LOG2])]
    out += [_varint(int(d)) for d in np.diff(block_starts)]
    out += [_varint(nbits), np.packbits(bits).tobytes()]
    return b"".join(out)


def stream_info(data: bytes) -> dict:
    """The header of an encoded stream: symbol count, code lengths, block starts, payload bits."""
    r = _Reader(data)
    n = r.varint()
    if n == 0:
        if r.pos != len(data):
            raise ValueError("huffman stream: bytes after the end of an empty stream")
        return {"n": 0, "nbits": 0, "lo": 0, "lengths": np.zeros(0, np.int64), "payload_offset": r.pos}
    lo, span = r.varint(), r.varint()
    width = int(r.take(1)[0])
    if not 1 <= width <= 5 or span == 0 or span > 1 << 24:
        raise ValueError(f"huffman stream: malformed code table (span {span}, width {width})")
    lengths = _unpack_fields(r.take((span * width + 7) // 8), span, width)
    block_log2 = int(r.take(1)[0])
    if not 1 <= block_log2 <= 24:
        raise ValueError(f"huffman stream: malformed block size 2**{block_log2}")
    blocks = -(-n // (1 << block_log2))
    deltas = [r.varint() for _ in range(blocks - 1)]
    nbits = r.varint()
    return {"n": n, "lo": lo, "lengths": lengths, "block_log2": block_log2,
            "block_starts": np.concatenate([[0], np.cumsum(deltas, dtype=np.int64)]).astype(np.int64),
            "nbits": nbits, "payload_offset": r.pos}


def decode(data: bytes) -> np.ndarray:
    """The symbols of a stream written by ``encode`` (int64). Raises ValueError if it is damaged."""
    info = stream_info(data)
    n = info["n"]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lengths, nbits = info["lengths"], info["nbits"]
    used = np.flatnonzero(lengths > 0)
    if len(used) == 0 or lengths.max() > MAX_LEN:
        raise ValueError("huffman stream: malformed code lengths")
    k = int(lengths.max())
    if float(np.sum(np.ldexp(1.0, -lengths[used]))) > 1.0:
        raise ValueError("huffman stream: code lengths violate the Kraft inequality")
    payload = np.frombuffer(data, dtype=np.uint8, offset=info["payload_offset"])
    if len(payload) != (nbits + 7) // 8:
        raise ValueError(f"huffman stream: payload holds {len(payload)} bytes, the header says "
                         f"{(nbits + 7) // 8}")
    # decoder table: in canonical order the codes, left-aligned to k bits, are consecutive ranges
    order = used[np.lexsort((used, lengths[used]))]
    reps = np.int64(1) << (k - lengths[order])
    table_sym = np.full(1 << k, -1, dtype=np.int64)
    table_len = np.zeros(1 << k, dtype=np.int64)
    covered = int(reps.sum())
    table_sym[:covered] = np.repeat(order + info["lo"], reps)
    table_len[:covered] = np.repeat(lengths[order], reps)
    # a 32-bit big-endian word at every byte offset
    p = np.concatenate([payload, np.zeros(4, np.uint8)]).astype(np.int64)
    words = (p[:-3] << 24) | (p[1:-2] << 16) | (p[2:-1] << 8) | p[3:]
    size = 1 << info["block_log2"]
    starts = info["block_starts"]
    blocks = len(starts)
    counts = np.full(blocks, size, dtype=np.int64)
    counts[-1] = n - size * (blocks - 1)
    ends = np.concatenate([starts[1:], [nbits]])
    if (np.diff(starts) < 0).any() or starts[-1] > nbits:
        raise ValueError("huffman stream: malformed block starts")
    out = np.empty((blocks, int(counts.max())), dtype=np.int64)
    pos, last = starts.copy(), len(words) - 1
    for t in range(out.shape[1]):
        active = t < counts
        v = ((words[np.minimum(pos >> 3, last)] << (pos & 7)) & 0xFFFFFFFF) >> (32 - k)
        ln = table_len[v]
        if (active & (ln == 0)).any():
            raise ValueError(f"huffman stream: invalid code at symbol {t} of a block")
        out[:, t] = table_sym[v]
        pos += ln * active
    if (pos != ends).any():
        raise ValueError("huffman stream: the blocks do not end where the header says")
    flat = out.reshape(-1)
    if counts[-1] != out.shape[1]:
        flat = np.concatenate([out[:-1].reshape(-1), out[-1, :counts[-1]]])
    return flat
