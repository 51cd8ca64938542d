"""Which INT8 scheme suits this CPU's integer kernels (ONNX Runtime's MLAS and PyTorch's fbgemm).

On x86 CPUs with AVX2 or AVX-512 BW but without VNNI, a uint8 x int8 (U8S8) dot product runs on
``vpmaddubsw``, which adds pairs of products into a *saturating* 16-bit sum: 255 * 127 * 2 > 32767,
so large activations times large weights clip (static INT8 of the Fashion-MNIST ResNet: top-1
fell from 91.8% to 86.4%). Keeping weights to 7 bits (``reduce_range``: 255 * 64 * 2 < 32767)
removes the overflow at a small precision cost. VNNI (``vpdpbusd``, AVX-512 or AVX-VNNI) and AMX
accumulate in 32 bits, so full 8-bit weights are safe there. ``recommend`` is a pure function of
the feature list so that every CPU kind can be tested; ``detect`` reads this machine's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Iterable

# /proc/cpuinfo flag names that decide the int8 kernels (x86), and Arm's for completeness
INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "neon")


@dataclass(frozen=True)
class Int8Scheme:
    level: str             # amx_int8 | avx512_vnni | avx_vnni | avx512bw | avx2 | arm | unknown
    activation_type: str   # uint8 | int8
    weight_type: str       # int8 | uint8
    reduce_range: bool     # weights in 7 bits
    saturates: bool        # U8S8 multiply-add sums can saturate at 16 bits on this CPU
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recommend(features: Iterable[str]) -> Int8Scheme:
    """The INT8 scheme for a CPU reporting ``features`` (flag names as in /proc/cpuinfo)."""
    f = {x.lower() for x in features}
    if "amx_int8" in f:
        return Int8Scheme("amx_int8", "uint8", "int8", False, False,
                          "AMX-INT8: tile multiplies accumulate in 32 bits; full 8-bit U8S8, no reduce_range")
    if "avx512_vnni" in f:
        return Int8Scheme("avx512_vnni", "uint8", "int8", False, False,
                          "AVX-512 VNNI: vpdpbusd accumulates U8S8 products in 32 bits; full 8-bit weights")
    if "avx_vnni" in f:
        return Int8Scheme("avx_vnni", "uint8", "int8", False, False,
                          "AVX-VNNI: vpdpbusd accumulates U8S8 products in 32 bits; full 8-bit weights")
    if "avx512bw" in f:
        return Int8Scheme("avx512bw", "uint8", "int8", True, True,
                          "AVX-512 BW without VNNI: U8S8 multiply-add (vpmaddubsw) saturates 16-bit sums; "
                          "weights use 7 bits (reduce_range)")
    if "avx2" in f:
        return Int8Scheme("avx2", "uint8", "int8", True, True,
                          "AVX2 without VNNI: U8S8 multiply-add (vpmaddubsw) saturates 16-bit sums; "
                          "weights use 7 bits (reduce_range)")
    if f & {"asimd", "asimddp", "neon"}:
        return Int8Scheme("arm", "int8", "int8", False, False,
                          "Arm: int8 kernels widen products before adding (or use 32-bit dot products); "
                          "S8S8, ONNX Runtime's default, without reduce_range")
    return Int8Scheme("unknown", "uint8", "int8", True, False,
                      "no int8 CPU features detected: weights use 7 bits (reduce_range) so that no "
                      "16-bit sum can saturate, at a small precision cost")


def risk(scheme: Int8Scheme, activation_type: str, weight_type: str, reduce_range: bool) -> str | None:
    """Why an explicit choice is risky or wasteful on a CPU with ``scheme`` (None: it is neither)."""
    if not scheme.saturates:
        if reduce_range and scheme.level != "unknown":
            return (f"reduce_range true on {scheme.level}: not needed (32-bit accumulation); "
                    "7-bit weights only lose precision")
        return None
    if reduce_range:
        return None
    if weight_type == "uint8":
        pair = f"{'U' if activation_type == 'uint8' else 'S'}8U8"
        return (f"{pair} on {scheme.level} without VNNI runs on ONNX Runtime's widening kernels: "
                "accurate, but slower than U8S8 with reduce_range")
    return (f"reduce_range false with int8 weights on {scheme.level} without VNNI: U8S8 sums can saturate "
            "at 16 bits (measured: the Fashion-MNIST ResNet fell from 91.8% to 86.4% top-1); "
            "set reduce_range: auto or true")


def choose(activation_type="auto", weight_type="auto", reduce_range="auto",
           features: Iterable[str] | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The scheme to use: ``"auto"`` fields from the CPU's features (this machine's when
    ``features`` is None), explicit ones kept. Returns (scheme, stats to record, a one-line note
    that says why, and what is risky about an explicit choice on this CPU)."""
    features, rec = detect() if features is None else (list(features), recommend(features))
    asked = {"activation_type": activation_type, "weight_type": weight_type, "reduce_range": reduce_range}
    chosen = {k: getattr(rec, k) if v == "auto" else v for k, v in asked.items()}
    chosen["reduce_range"] = bool(chosen["reduce_range"])
    explicit = [k for k, v in asked.items() if v != "auto"]
    letter = {"uint8": "U8", "int8": "S8"}
    short = (letter[chosen["activation_type"]] + letter[chosen["weight_type"]]
             + (", reduce_range" if chosen["reduce_range"] else ""))
    if not explicit:
        note = f"INT8 scheme {short} chosen for this CPU: {rec.reason}."
    else:
        warn = risk(rec, **chosen)
        note = (f"INT8 scheme {short} ({', '.join(explicit)} set explicitly; this CPU's choice: {rec.reason})"
                + (f". Risky here: {warn}." if warn else "."))
    stats = {"cpu_int8_features": list(features), "recommended_scheme": rec.to_dict(), "scheme": chosen}
    return chosen, stats, note


@lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_int8_features() -> list[str]:
    """This CPU's int8-relevant features: measure.hardware's list plus the /proc/cpuinfo flags it
    does not track (avx512bw, amx_int8, asimddp)."""
    from ..measure.hardware import cpu

    found = set(cpu()["features"]) | _cpuinfo_flags()
    return [f for f in INT8_FLAGS if f in found]


def detect() -> tuple[list[str], Int8Scheme]:
    features = cpu_int8_features()
    return features, recommend(features)
