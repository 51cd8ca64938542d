"""Runners: call a model on a tuple of input tensors, get numpy outputs, in one runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class TorchRunner:
    runtime = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(*inputs).float().numpy()


class OrtRunner:
    runtime = "onnxruntime"

    def __init__(self, path: Path, input_names: tuple[str, ...], threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # ONNX Runtime's worker threads busy-wait after each run by default; with variants timed
        # interleaved in one process, that spinning steals the cores from the next (PyTorch) run
        # and inflated eager latencies ~3x in a measurement here. Passive waiting keeps it fair.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        wanted = {i.name for i in self.session.get_inputs()}
        self.input_names = tuple(input_names)
        self.used = [n in wanted for n in self.input_names]

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        feed = {n: t.numpy() for n, t, u in zip(self.input_names, inputs, self.used) if u}
        return self.session.run(None, feed)[0]
