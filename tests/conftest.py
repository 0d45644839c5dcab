"""Shared helpers: fixture paths, onnxruntime runs and an independent check of the 4-D form."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(TESTS))


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing committed fixture {path}; regenerate with python models/make_fixtures.py")
    return path


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def random_input(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).reshape(-1)
    b = b.astype(np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


def non_4d_float_tensors(model: onnx.ModelProto) -> list[str]:
    """Float tensors of rank other than 4, outside the nodes that read graph inputs or write graph outputs.

    Written independently of vit2bpu.report so the structure tests do not check the product with itself.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        if t.elem_type in FLOAT_TYPES and t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    outputs = {o.name for o in model.graph.output}
    producers = {out: node for node in model.graph.node for out in node.output}
    # The tail that restores each output's shape: Reshape/Transpose chains ending in a graph output.
    tail = set()
    for name in outputs:
        node = producers.get(name)
        while node is not None and node.op_type in ("Reshape", "Transpose"):
            tail.update(node.output)
            node = producers.get(node.input[0])
    # The head that brings a token-stream input into 4-D: Transpose/Reshape chains from a graph input.
    frontier = [i.name for i in model.graph.input]
    while frontier:
        name = frontier.pop()
        for node in model.graph.node:
            if node.input and node.input[0] == name and node.op_type in ("Reshape", "Transpose"):
                tail.update(node.output)
                frontier.extend(node.output)
    return sorted(name for name, rank in ranks.items() if rank != 4 and name not in tail)


def assert_bpu_form(model: onnx.ModelProto) -> None:
    """The structure every converted ViT must have."""
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 11)]
    assert model.ir_version == 7
    constants = {i.name for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "Gemm" not in ops
    assert "LayerNormalization" not in ops
    assert "Pow" not in ops
    for node in model.graph.node:
        assert node.domain in ("", "ai.onnx"), node.name
        if node.op_type == "MatMul":
            assert not any(i in constants for i in node.input), f"constant-weight MatMul {node.name}"
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in inferred.graph.value_info:
        assert len(vi.type.tensor_type.shape.dim) < 5, f"rank-5 tensor {vi.name}"
    assert non_4d_float_tensors(model) == []
