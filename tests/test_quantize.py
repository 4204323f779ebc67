"""INT8 quantization: the graph it writes from a real exported model, and which failures become a one-line
error (a graph ONNX Runtime cannot quantize) and which keep their type (our bugs, the machine's problems)."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.data import DataLoader, Dataset, TensorDataset

from edgeprune import EdgePruneError, create_model
from edgeprune.export import export_onnx
from edgeprune.quantize import quantize_int8
from edgeprune.recipe import ExportOptions, Int8Options


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model = create_model("cifar_resnet20", "cifar10-jpeg")
    return export_onnx(model, (3, 32, 32), tmp_path_factory.mktemp("q") / "model.onnx", ExportOptions())


class Images(Dataset):
    def __init__(self, x, fail_at=None):
        self.x, self.fail_at = x, fail_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError(28, "No space left on device")
        return self.x[i], 0


def test_static_int8_is_qdq_with_one_weight_scale_per_channel(fp32, tmp_path, cifar_test_subset):
    x, _ = cifar_test_subset
    out = quantize_int8(fp32, tmp_path / "model.int8.onnx", DataLoader(Images(x[:64]), batch_size=32), Int8Options())
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    conv_weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    dequant = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    scales = [inits[dequant[w].input[1]] for w in conv_weights if w in dequant]
    assert len(scales) == len(conv_weights) == 19
    stem = next(s for s in scales if s.shape == (16,))
    assert len(np.unique(stem)) > 1  # per-channel: each output channel has its own scale
    per_tensor = quantize_int8(fp32, tmp_path / "pt.onnx", DataLoader(Images(x[:64]), batch_size=32),
                               Int8Options(per_channel=False))
    pt_graph = onnx.load(str(per_tensor)).graph
    pt_inits = {t.name: numpy_helper.to_array(t) for t in pt_graph.initializer}
    pt_dequant = {n.output[0]: n for n in pt_graph.node if n.op_type == "DequantizeLinear"}
    pt_convs = [n.input[1] for n in pt_graph.node if n.op_type == "Conv"]
    assert all(pt_inits[pt_dequant[w].input[1]].size == 1 for w in pt_convs)


def test_no_calibration_images_is_a_clear_error(fp32, tmp_path):
    with pytest.raises(EdgePruneError, match="INT8 calibration has no images"):
        quantize_int8(fp32, tmp_path / "q.onnx", DataLoader(Images(torch.zeros(0, 3, 32, 32))), Int8Options())


def test_a_failure_outside_the_quantizer_keeps_its_type(fp32, tmp_path, cifar_test_subset):
    """A full disk while reading calibration data is not 'INT8 quantization failed'."""
    x, _ = cifar_test_subset
    with pytest.raises(OSError, match="No space left"):
        quantize_int8(fp32, tmp_path / "q.onnx", DataLoader(Images(x[:64], fail_at=40), batch_size=32), Int8Options())
    assert not (tmp_path / "q.onnx").exists()


def conv_graph(path, custom_op: bool = False):
    """x -> Conv (-> an op of an unknown domain) -> y, as ONNX."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c" if custom_op else "y"])]
    opsets = [helper.make_opsetid("", 17)]
    if custom_op:
        nodes.append(helper.make_node("Mystery", ["c"], ["y"], domain="com.example"))
        opsets.append(helper.make_opsetid("com.example", 1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def images(n=4):
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8), torch.zeros(n)), batch_size=1)


def test_a_graph_onnx_runtime_cannot_infer_is_a_one_line_error_with_its_cause(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ORT's symbolic shape inference leaves sym_shape_infer_temp.onnx in the cwd
    src = conv_graph(tmp_path / "custom.onnx", custom_op=True)
    with pytest.raises(EdgePruneError) as err:
        quantize_int8(src, tmp_path / "custom.int8.onnx", images(), Int8Options())
    assert str(err.value) == f"INT8 quantization of {src} failed (Exception: Incomplete symbolic shape inference)"
    assert type(err.value.__cause__) is Exception  # ORT raises a bare Exception; kept for --debug
    assert not (tmp_path / "custom.int8.onnx").exists()


def test_a_bug_in_the_calibration_reader_is_not_turned_into_advice(tmp_path):
    """Batches that are not (images, labels) tensors: an AttributeError in our reader propagates as such."""
    src = conv_graph(tmp_path / "conv.onnx")
    lists = DataLoader([[0.0] * 3] * 4, batch_size=2, collate_fn=lambda batch: batch)
    with pytest.raises(AttributeError, match="'list' object has no attribute 'numpy'"):
        quantize_int8(src, tmp_path / "conv.int8.onnx", lists, Int8Options())
    out = quantize_int8(src, tmp_path / "conv.int8.onnx", images(), Int8Options())  # the same graph quantizes
    assert {n.op_type for n in onnx.load(str(out)).graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}


def test_a_missing_output_folder_is_an_os_error(tmp_path):
    src = conv_graph(tmp_path / "conv.onnx")
    with pytest.raises(FileNotFoundError):
        quantize_int8(src, tmp_path / "absent" / "conv.int8.onnx", images(), Int8Options())


def int8_weight_peak(path) -> int:
    graph = onnx.load(str(path)).graph
    return max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in graph.initializer
               if t.data_type == TensorProto.INT8 and len(t.dims) == 4)


def test_7_bit_weights_where_the_cpu_lacks_vnni(fp32, tmp_path, cifar_test_subset):
    """Full-range INT8 weights saturate the u8s8 kernels of CPUs without VNNI (AVX2 only)."""
    from edgeprune.quantize import cpu_lacks_vnni, reduce_range

    x, _ = cifar_test_subset
    data = DataLoader(Images(x[:32]), batch_size=32)
    full = quantize_int8(fp32, tmp_path / "full.onnx", data, Int8Options(reduce_range=False))
    seven = quantize_int8(fp32, tmp_path / "seven.onnx", data, Int8Options(reduce_range=True))
    assert int8_weight_peak(full) == 127 and int8_weight_peak(seven) <= 64
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    assert cpu_lacks_vnni() == (bool(flags) and "vnni" not in flags and "amx_int8" not in flags)
    assert reduce_range(Int8Options()) == cpu_lacks_vnni() and reduce_range(Int8Options(reduce_range=False)) is False
