"""TF "same" padding exported with constant amounts: no shape arithmetic in the graph, ONNX Runtime
fuses the pads into the convolutions, and the outputs match eager."""
import onnx
import onnxruntime as ort
import torch

from slimcart.accelerate.onnx_export import export_onnx
from slimcart.accelerate.static_pad import StaticSameConv, static_same_padding
from slimcart.models import build

SPEC = {"arch": "efficientnet_lite0", "config": {"num_classes": 5, "pretrained": False}}


def test_same_padding_becomes_constant_and_fuses(tmp_path):
    torch.manual_seed(0)
    model = build(SPEC).eval()
    x = torch.rand(2, 3, 64, 48)
    static = static_same_padding(model, (x,))
    assert static is not model and type(model.conv_stem).__name__ == "Conv2dSame"  # the model is left as it was
    assert isinstance(static.conv_stem, StaticSameConv) and static.conv_stem.pads == (0, 1, 0, 1)
    with torch.no_grad():
        assert torch.equal(static(x), model(x))
    path = export_onnx(model, (x,), tmp_path / "m.onnx", ("image",), {"image": {0: "batch"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Shape", "Pad", "Cast"}  # the five stride-2 pads went into their convolutions
    pads = [list(a.ints) for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "pads"]
    # the stem (3x3, stride 2, 64x48 in): TF pads 1 row / column after, none before, as ONNX's asymmetric pads
    assert pads[0] == [0, 0, 1, 1]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        xb = torch.rand(batch, 3, 64, 48)
        got = sess.run(None, {"image": xb.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(xb).detach(), atol=1e-4, rtol=1e-4)


def test_dynamic_height_keeps_the_general_padding(tmp_path):
    torch.manual_seed(0)
    model = build(SPEC).eval()
    path = export_onnx(model, (torch.rand(1, 3, 64, 64),), tmp_path / "m.onnx", ("image",),
                       {"image": {0: "batch", 2: "h", 3: "w"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 50, 70)
    torch.testing.assert_close(torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), model(x).detach(),
                               atol=1e-4, rtol=1e-4)
