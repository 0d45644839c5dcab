"""``vit2bpu diff``: per-block parity, its tensor pairing, a located fault, and the error contract."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import fixture_path
from onnx import TensorProto, helper, numpy_helper

import vit2bpu
from vit2bpu import cli
from vit2bpu.diff import assign_blocks, block_of_name, diff_models, first_divergent_block

FIXTURE = "timm_deit_ts_op14.onnx"
BLOCKS = ["embed", "blocks.0", "blocks.1", "head"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model, _ = vit2bpu.convert(fixture_path(FIXTURE), parity=False)
    path = tmp_path_factory.mktemp("converted") / "deit_bpu.onnx"
    vit2bpu.save(model, path)
    return path


def scale_conv_weight(path, node_name: str, factor: float) -> onnx.ModelProto:
    """The converted model with one Conv's weight multiplied by ``factor``: a conversion fault."""
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == node_name)
    assert node.op_type == "Conv"
    weight = next(i for i in model.graph.initializer if i.name == node.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor, weight.name))
    return model


def test_unmodified_conversion_has_no_divergence(converted):
    report = diff_models(fixture_path(FIXTURE), converted)
    assert report.first_divergent_block is None
    assert [b.block for b in report.blocks] == BLOCKS
    for block in report.blocks:
        assert block.tensor is not None, block.block
        assert block.cosine > 0.99999, block.block
        assert block.max_abs_error < 1e-5, block.block


def test_block_verdict_is_residual_output(converted):
    report = diff_models(fixture_path(FIXTURE), converted)
    verdicts = {b.block: b for b in report.blocks}
    assert verdicts["blocks.0"].tensor == "/blocks/blocks.0/Add_1_output_0"
    assert verdicts["blocks.0"].converted_tensor == "/blocks/blocks.0/Add_1/nchw_output"
    assert verdicts["blocks.1"].tensor == "/blocks/blocks.1/Add_1_output_0"
    assert verdicts["head"].tensor == "logits"
    assert verdicts["blocks.0"].paired_tensors >= 10


def test_tensor_pairing_and_layouts(converted):
    rows = {row.original_tensor: row for row in diff_models(fixture_path(FIXTURE), converted).tensors}
    residual = rows["/blocks/blocks.0/Add_1_output_0"]
    assert residual.layout == "tokens"  # [B, N, C] against [B, C, 1, N]
    assert residual.shape == [1, 17, 64]
    assert rows["/Gather_output_0"].layout == "vector"  # the class token [B, C] against [B, C, 1, 1]
    assert rows["/patch_embed/Reshape_output_0"].layout == "reshape"  # [B, C, N] before the exporter's transpose
    # The Linear's Conv folded the bias Add, so it is compared with the Add's output.
    fc2 = rows["/blocks/blocks.1/mlp/fc2/Add_output_0"]
    assert fc2.original_node == "/blocks/blocks.1/mlp/fc2/MatMul"
    assert fc2.converted_node == "/blocks/blocks.1/mlp/fc2/MatMul/conv"
    assert fc2.cosine > 0.99999
    assert "/blocks/blocks.1/mlp/fc2/MatMul_output_0" not in rows


@pytest.mark.parametrize("block", [0, 1])
def test_fault_in_fc2_names_its_block(block, converted):
    faulty = scale_conv_weight(converted, f"/blocks/blocks.{block}/mlp/fc2/MatMul/conv", 1.5)
    assert first_divergent_block(fixture_path(FIXTURE), faulty) == f"blocks.{block}"


def test_rows_before_fault_still_agree(converted):
    faulty = scale_conv_weight(converted, "/blocks/blocks.1/mlp/fc2/MatMul/conv", 1.5)
    report = diff_models(fixture_path(FIXTURE), faulty)
    verdicts = {b.block: b for b in report.blocks}
    assert verdicts["embed"].cosine > 0.99999
    assert verdicts["blocks.0"].cosine > 0.99999
    assert verdicts["blocks.1"].cosine < report.threshold
    assert verdicts["head"].cosine < report.threshold
    rows = {row.original_tensor: row for row in report.tensors}
    assert rows["/blocks/blocks.1/mlp/fc1/Add_output_0"].max_abs_error < 1e-5
    assert rows["/blocks/blocks.1/mlp/fc2/Add_output_0"].max_abs_error > 1e-3


def test_threshold_is_an_option(converted):
    faulty = scale_conv_weight(converted, "/blocks/blocks.1/mlp/fc2/MatMul/conv", 1.5)
    assert first_divergent_block(fixture_path(FIXTURE), faulty, threshold=0.99) is None


def test_cli_prints_every_block_and_exits_0(tmp_path, converted, capsys):
    report_path = tmp_path / "diff.json"
    assert cli.main(["diff", str(fixture_path(FIXTURE)), str(converted), "--json", str(report_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["block", "tensor", "compared", "max", "abs", "error", "cosine"]
    assert [line.split()[0] for line in lines[2:6]] == BLOCKS
    assert lines[-1] == "no block diverges: every block cosine is >= 0.9999"
    data = json.loads(report_path.read_text())
    assert data["first_divergent_block"] is None
    assert [b["block"] for b in data["blocks"]] == BLOCKS
    assert len(data["tensors"]) == sum(b["paired_tensors"] for b in data["blocks"])


def test_cli_fault_exits_5_and_names_block(tmp_path, converted, capsys):
    faulty = tmp_path / "faulty.onnx"
    onnx.save(scale_conv_weight(converted, "/blocks/blocks.1/mlp/fc2/MatMul/conv", 1.5), str(faulty))
    assert cli.main(["diff", str(fixture_path(FIXTURE)), str(faulty)]) == 5
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines()[2:6]] == BLOCKS
    assert "first divergent block: blocks.1" in captured.out
    assert "block 'blocks.1' is the first to diverge" in captured.err


def test_cli_user_input(tmp_path, converted, capsys):
    sample = np.random.default_rng(7).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "image.npy", sample)
    args = ["diff", str(fixture_path(FIXTURE)), str(converted), "--input", str(tmp_path / "image.npy")]
    assert cli.main(args) == 0
    assert f"input: {tmp_path / 'image.npy'}" in capsys.readouterr().out


@pytest.mark.parametrize("case, code, message", [
    ("missing model", 3, "file not found"),
    ("unrelated models", 2, "has shape [1, 3, 32, 32] in the original model but [1, 3, 64, 64]"),
    ("unpaired names", 2, "no node of the original model has a converted counterpart"),
    ("missing input file", 2, "not found"),
    ("input of the wrong shape", 5, "onnxruntime failed to run"),
    ("threshold out of range", 2, "--threshold must be in (0, 1]"),
])
def test_cli_errors(case, code, message, tmp_path, converted, capsys):
    original, extra = str(fixture_path(FIXTURE)), []
    if case == "missing model":
        original = str(tmp_path / "nope.onnx")
    elif case == "unrelated models":
        original = str(fixture_path("resnet_tiny_op13.onnx"))
    elif case == "unpaired names":
        renamed = onnx.load(str(fixture_path(FIXTURE)))
        for node in renamed.graph.node:
            node.name = f"renamed_{node.name}"
        original = str(tmp_path / "renamed.onnx")
        onnx.save(renamed, original)
    elif case == "missing input file":
        extra = ["--input", str(tmp_path / "nope.npy")]
    elif case == "input of the wrong shape":
        np.save(tmp_path / "small.npy", np.zeros((1, 3, 32, 32), np.float32))
        extra = ["--input", str(tmp_path / "small.npy")]
    else:
        extra = ["--threshold", "1.5"]
    assert cli.main(["diff", original, str(converted), *extra]) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name, expected", [
    ("/blocks/blocks.3/attn/qkv/MatMul", ("blocks.3", (3,))),
    ("/model/vit/layers.0/attention/q_proj/MatMul", ("layers.0", (0,))),
    ("/vit/encoder/layer.11/output/dense/MatMul", ("layer.11", (11,))),
    ("/layers.1/blocks.2/mlp/fc1/MatMul", ("layers.1/blocks.2", (1, 2))),
    ("/blocks/blocks.0/Add_1/nchw", ("blocks.0", (0,))),
    ("/patch_embed/proj/Conv", None),
    ("/blocks_extra.1/Add", None),
    ("node_layer_norm_1", None),
])
def test_block_of_name(name, expected):
    assert block_of_name(name) == expected


def test_blocks_sort_by_index_not_text():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/stem/Relu")]
    previous = "a"
    for index in (0, 1, 2, 10, 11):
        nodes.append(helper.make_node("Relu", [previous], [f"b{index}"], name=f"/blocks/blocks.{index}/Relu"))
        previous = f"b{index}"
    nodes.append(helper.make_node("Relu", [previous], ["y"], name="/head/Relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    labels, order = assign_blocks(graph)
    assert order == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.10", "blocks.11", "head"]
    assert labels["/stem/Relu"] == "embed"
    assert labels["/head/Relu"] == "head"


@pytest.mark.skipif(not hasattr(onnx.NodeProto(), "metadata_props"),
                    reason="node metadata (where the dynamo exporter records module paths) needs onnx 1.16")
@pytest.mark.parametrize("key, value", [
    ("namespace", ": timm.VisionTransformer/blocks: torch.nn.Sequential/blocks.3: timm.Block/blocks.3.attn: "
                  "timm.Attention/scaled_dot_product_attention_12: aten.scaled_dot_product_attention.default"),
    ("pkg.torch.onnx.name_scopes", "['', 'blocks', 'blocks.3', 'blocks.3.attn', 'scaled_dot_product_attention_12']"),
])
def test_block_from_node_metadata(key, value):
    node = helper.make_node("Relu", ["x"], ["y"], name="node_scaled_dot_product_attention_12")
    entry = node.metadata_props.add()
    entry.key, entry.value = key, value
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    labels, order = assign_blocks(graph)
    assert labels[node.name] == "blocks.3"
    assert order == ["embed", "blocks.3", "head"]


@pytest.mark.skipif(not hasattr(onnx.NodeProto(), "metadata_props"),
                    reason="node metadata (where the dynamo exporter records module paths) needs onnx 1.16")
def test_dynamo_blocks_from_node_metadata():
    import onnxruntime as ort

    if tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 17):
        pytest.skip("onnxruntime before 1.17 cannot run the IR-10 dynamo fixture")
    original = fixture_path("timm_deit_dynamo_op18.onnx")
    converted, _ = vit2bpu.convert(original, parity=False)
    report = diff_models(original, converted)
    assert [b.block for b in report.blocks] == BLOCKS
    assert report.first_divergent_block is None
    assert all(b.tensor is not None for b in report.blocks)


def test_diff_rejects_an_int8_qdq_model(tmp_path, capsys):
    from onnx import TensorProto, helper

    from vit2bpu import cli

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "z")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "int8.onnx"))
    assert cli.main(["diff", str(fixture_path("timm_deit_ts_op14.onnx")), str(tmp_path / "int8.onnx")]) == 2
    assert "not an INT8 QDQ model" in capsys.readouterr().err
