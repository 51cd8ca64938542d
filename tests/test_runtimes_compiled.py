"""Compiled and hardware runtimes: torch.compile and OpenVINO agree with eager PyTorch and ONNX
Runtime, setup (compile) time is recorded apart from latency, fallbacks leave a notice, bad
options name their key. GPU cases run only where CUDA is available."""
import numpy as np
import pydantic
import pytest
import torch

import slimcart as sc
from slimcart.errors import UsageError
from slimcart.measure import hardware
from slimcart.measure.runtimes import (CompiledRunner, OpenVinoRunner, OrtRunner, RuntimeFallbackWarning,
                                       TorchRunner, parse_choice)

from .tiny import tiny, tiny_inputs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NAMES = {"cnn": ("pixels",), "deepfm": ("sparse", "dense")}


def _onnx(name, tmp_path):
    from slimcart.accelerate.onnx_export import export_onnx

    axes = {n: {0: "batch"} for n in NAMES[name]} | {"logits": {0: "batch"}}
    return export_onnx(tiny(name), tiny_inputs(name, 2), tmp_path / f"{name}.onnx", NAMES[name], axes)


def _eager(model, x):
    with torch.inference_mode():
        return model(*x).float().numpy()


# ---- a measurement session with every new runtime ---------------------------------------------

@pytest.fixture(scope="module")
def session_record(ctr_task, ctr_model, tmp_path_factory):
    from slimcart.measure.session import Session
    from slimcart.pipeline import baseline_state

    missing = next(p for p in ("CoreMLExecutionProvider", "DmlExecutionProvider", "NnapiExecutionProvider")
                   if p not in hardware.ort_providers())
    m = sc.MeasureConfig(batch_sizes=[1, 16], memory=False, deployed=False, throughput_seconds=0.0,
                         eval_limit=300, runtimes=["torch", "torch_compile", "onnxruntime", "openvino", {
                             "runtime": "onnxruntime", "label": "ort-gone", "provider": missing}])
    s = Session(ctr_task, m, tmp_path_factory.mktemp("session"), progress=False)
    base, _, _ = baseline_state(ctr_model, ctr_task)
    with pytest.warns(RuntimeFallbackWarning, match=missing):
        s.add("baseline", base, baseline=True)
    rec = s.variant_record(s.baseline, s.time([]))
    yield rec, s, missing
    s.close()


def test_compiled_and_openvino_match_the_scored_runtime(session_record):
    rec, _, _ = session_record
    assert rec["served_parity"]["torch_compile"]["max_abs_diff"] < 1e-5      # vs eager torch (scored)
    assert rec["served_parity"]["onnxruntime"]["max_abs_diff"] < 1e-4
    assert rec["served_parity"]["openvino"]["max_abs_diff"] < 1e-4
    assert rec["served"]["openvino"] == rec["served"]["onnxruntime"]       # one ONNX export serves both


def test_setup_time_is_recorded_apart_from_latency(session_record):
    rec, _, _ = session_record
    setup, lat = rec["setup_s"], rec["latency_ms"]
    assert set(setup) == set(lat) == {"torch", "torch_compile", "onnxruntime", "openvino", "ort-gone"}
    for label, per in setup.items():
        assert {"build", "1", "16", "total"} <= set(per), label
        assert per["total"] >= per["build"] + per["1"] + per["16"] - 1e-3, label
    # batch 1 is compiled on its own (PyTorch specializes size 1): compile + first run >> a steady call
    assert setup["torch_compile"]["1"] * 1000 > 20 * lat["torch_compile"]["1"]["p50"]
    assert setup["torch_compile"]["1"] > setup["torch"]["1"]
    sc.result.Variant.model_validate({**rec, "speedup_vs_baseline": {}, "compression_ratio": 1.0})


def test_provider_fallback_is_noted_in_the_variant(session_record):
    rec, s, missing = session_record
    assert any(n.startswith(f"ort-gone: {missing} not available here") for n in rec["notes"])
    assert s.baseline.runners["ort-gone"].providers == ["CPUExecutionProvider"]


def test_bench_takes_option_strings_and_shows_setup(session_record):
    from slimcart.bench import bench_artifact

    _, s, _ = session_record
    rows = bench_artifact(s.baseline.folder, [2], rounds=5, threads=2,
                          runtimes=["torch_compile:label=tc,dynamic=false", "{runtime: openvino, hint: throughput}"])
    torch.set_num_threads(2)
    assert [r["runtime"] for r in rows] == ["tc", "openvino"]
    assert all(float(r["first call s"]) > 0 and float(r["build s"]) >= 0 for r in rows)


# ---- runners on tiny models -------------------------------------------------------------------

def test_openvino_matches_onnxruntime_on_a_tiny_cnn_at_any_batch(tmp_path):
    path = _onnx("cnn", tmp_path)
    ort = OrtRunner(path, NAMES["cnn"])
    ov = OpenVinoRunner(path, NAMES["cnn"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for b in (1, 5):  # the batch dimension stays dynamic in OpenVINO
        x = tiny_inputs("cnn", b)
        assert np.abs(ov(x) - ort(x)).max() < 1e-4
    assert set(ov.setup_s) == {((1, 1, 16, 16),), ((5, 1, 16, 16),)}


def test_freezing_is_scoped_and_matches_eager():
    import torch._inductor.config as inductor_config

    model, x = tiny("deepfm"), tiny_inputs("deepfm", 4)
    run = CompiledRunner(model, freezing=True, dynamic=False)
    assert np.abs(run(x) - _eager(model, x)).max() < 1e-5
    assert inductor_config.freezing is False
    assert not run.notes


def test_failed_compile_falls_back_with_a_notice_or_stops(monkeypatch):
    def broken(model, **_):
        def fn(*_):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nlong traceback...")
        return fn

    monkeypatch.setattr(torch, "compile", broken)
    model, x = tiny("deepfm"), tiny_inputs("deepfm", 3)
    run = CompiledRunner(model)
    with pytest.warns(RuntimeFallbackWarning, match="running eager PyTorch instead"):
        out = run(x)
    np.testing.assert_allclose(out, _eager(model, x), atol=1e-6)
    assert run.notes == ["compiling failed (RuntimeError: InvalidCxxCompiler: no working C++ compiler "
                         "found); running eager PyTorch instead"]
    with pytest.raises(UsageError, match="compiling the model failed"):
        CompiledRunner(model, fallback=False)(x)


def test_missing_openvino_is_a_clear_error(tmp_path, monkeypatch):
    def gone():
        raise ImportError("No module named 'openvino'")

    monkeypatch.setattr(hardware, "openvino_core", gone)
    with pytest.raises(UsageError, match=r"runtime openvino is not installed: pip install openvino"):
        OpenVinoRunner(tmp_path / "x.onnx", ("pixels",))


def test_half_types_on_a_cpu_without_them_are_refused_with_the_reason():
    for dtype, feats in (("bfloat16", hardware.BF16_FEATURES), ("float16", hardware.FP16_FEATURES)):
        if hardware.has_cpu_feature(*feats):
            continue
        with pytest.raises(UsageError, match=f"dtype {dtype} is refused on this CPU"):
            TorchRunner(tiny("cnn"), dtype=dtype)


def test_interop_threads_already_fixed_gives_a_notice():
    try:  # PyTorch takes it once per process: after this (or after any parallel work) never again
        torch.set_num_interop_threads(torch.get_num_interop_threads())
    except RuntimeError:
        pass
    want = torch.get_num_interop_threads() + 1
    with pytest.warns(RuntimeFallbackWarning, match="interop_threads"):
        TorchRunner(tiny("cnn"), interop_threads=want)


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("item, key", [
    ("torch_compile:mode=fast", "mode"),
    ({"runtime": "torch_compile", "dynamic": "sometimes"}, "dynamic"),
    ("torch:device=tpu", "device"),
    ("torch:dtype=int8", "dtype"),
    ("onnxruntime:provider=CUDAExecutionProviderX", "provider"),
    ("onnxruntime:fp16=true", "fp16"),
    ("openvino:hint=fastest", "hint"),
    ("openvino:threads=0", "threads"),
    ("{runtime: openvino, num_streams: -1}", "num_streams"),
    ("openvino:turbo=true", "turbo"),
])
def test_bad_options_name_their_key(item, key):
    with pytest.raises(ValueError, match=rf"runtime '\w+': {key}: "):
        parse_choice(item)


def test_option_strings_and_provider_names_are_normalised():
    c = parse_choice("onnxruntime:label=trt,provider=tensorrt,fp16=true")
    assert (c.label, c.config.provider, c.config.fp16) == ("trt", "TensorrtExecutionProvider", True)
    c = parse_choice("torch_compile:mode=max-autotune,freezing=true,dynamic=null")
    assert (c.config.mode, c.config.freezing, c.config.dynamic) == ("max-autotune", True, None)
    assert parse_choice("{runtime: openvino, device: gpu, hint: throughput}").config.device == "GPU"
    with pytest.raises(pydantic.ValidationError, match="runtime 'torch_compile': mode: "):
        sc.MeasureConfig(runtimes=["torch_compile:mode=fast"])


def test_runtimes_say_what_this_machine_offers():
    from slimcart.measure.runtimes import runtimes

    here = {n: rt.availability() for n, rt in runtimes().items()}
    assert here["openvino"].startswith("devices: CPU")
    assert here["onnxruntime"].startswith("providers:") and "CPU" in here["onnxruntime"]
    line = hardware.summary()
    assert hardware.cpu()["model"] in line and "ONNX Runtime providers: " in line and "OpenVINO devices: CPU" in line


# ---- GPU ---------------------------------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 2e-2), ("bfloat16", 1e-1)])
def test_torch_on_cuda_matches_the_cpu(dtype, tol):
    model, x = tiny("cnn"), tiny_inputs("cnn", 8)
    run = TorchRunner(model, device="cuda", dtype=dtype)
    assert not run.notes
    assert np.abs(run(x) - _eager(model, x)).max() < tol
    assert next(model.parameters()).device.type == "cpu"   # the served model itself is not moved


@CUDA
def test_torch_compile_on_cuda_matches_eager():
    model, x = tiny("deepfm"), tiny_inputs("deepfm", 8)
    run = CompiledRunner(model, device="cuda")
    assert np.abs(run(x) - _eager(model, x)).max() < 1e-4 and not run.notes


@CUDA
@pytest.mark.skipif("CUDAExecutionProvider" not in hardware.ort_providers(), reason="onnxruntime without CUDA")
@pytest.mark.parametrize("fp16, tol", [(False, 1e-4), (True, 2e-2)])
def test_onnxruntime_cuda_provider_matches_the_cpu(tmp_path, fp16, tol):
    path, x = _onnx("cnn", tmp_path), tiny_inputs("cnn", 8)
    gpu = OrtRunner(path, NAMES["cnn"], providers=["CUDAExecutionProvider"], fp16=fp16)
    assert gpu.providers[0] == "CUDAExecutionProvider" and not gpu.notes
    assert np.abs(gpu(x) - OrtRunner(path, NAMES["cnn"])(x)).max() < tol
