"""What this machine offers the runtimes: CPU model and the instruction-set features that decide
kernel speed (and whether bf16/fp16 math is native), CUDA devices, ONNX Runtime's execution
providers, OpenVINO's devices and a C++ compiler for torch.compile. Recorded in each result's
environment and shown by ``slimcart runtimes``; every probe is cheap and cached."""
from __future__ import annotations

import os
import platform
import shutil
from functools import lru_cache
from typing import Any

import torch

FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
            "avx512_fp16", "amx_fp16", "amx_tile", "neon", "asimd", "sve", "bf16", "fphp")
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")     # x86 flags, Arm "bf16"
FP16_FEATURES = ("avx512_fp16", "amx_fp16", "fphp")     # x86 flags, Arm "fphp"


@lru_cache(maxsize=1)
def cpu() -> dict[str, Any]:
    """CPU model, architecture, logical cores, the listed features it reports, PyTorch's kernel level."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), model)
        flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith(("flags", "Features"))), []))
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "features": [f for f in FEATURES if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def has_cpu_feature(*names: str) -> bool:
    return any(n in cpu()["features"] for n in names)


def cuda_devices() -> list[dict[str, Any]]:
    """Name, compute capability and memory of each CUDA device PyTorch sees ([] without one)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gb": round(p.total_memory / 1e9, 1)})
    return out


def ort_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


@lru_cache(maxsize=1)
def openvino_core():
    """The process's one OpenVINO Core (OpenVINO recommends one per application); ImportError
    when OpenVINO is not installed."""
    import openvino

    return openvino.Core()


def openvino_devices() -> dict[str, str] | None:
    """OpenVINO device -> its full name; None when OpenVINO is not installed."""
    try:
        core = openvino_core()
    except ImportError:
        return None
    out = {}
    for d in core.available_devices:
        try:
            out[d] = str(core.get_property(d, "FULL_DEVICE_NAME"))
        except RuntimeError:  # a plugin that lists a device but cannot describe it
            out[d] = "?"
    return out


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would use on the CPU (None: it cannot compile)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def detect() -> dict[str, Any]:
    """Everything above, for a result's environment."""
    return {"cpu": cpu(), "cuda_devices": cuda_devices(), "ort_providers": ort_providers(),
            "openvino": openvino_version(), "openvino_devices": openvino_devices(),
            "cxx_compiler": cxx_compiler()}


def summary() -> str:
    """One line: what this machine offers (printed under `slimcart runtimes`)."""
    c = cpu()
    gpus = ", ".join(f"{d['name']} (sm {d['capability']}, {d['memory_gb']} GB)" for d in cuda_devices()) or "none"
    ov = openvino_devices()
    feats = ", ".join(c["features"]) or "no listed features"
    return (f"This machine: CPU {c['model']} ({c['cores']} logical cores; {feats}); "
            f"CUDA: {gpus}; ONNX Runtime providers: {', '.join(ort_providers())}; OpenVINO devices: "
            + (", ".join(ov) if ov is not None else "not installed")
            + f"; C++ compiler: {cxx_compiler() or 'none'}.")
