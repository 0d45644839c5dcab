"""Helpers for reading and editing onnx-graphsurgeon graphs.

Passes work on ``gs.Graph``. These helpers answer the questions every pattern
match asks (is this input a constant, who produces and consumes this tensor)
and make the edits every rewrite needs (new nodes with unique names and known
shapes, rewiring consumers, keeping graph output names stable).
"""

from __future__ import annotations

import gc
import logging
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

log = logging.getLogger(__name__)

# Tensors with more elements than this are left out of the model built for shape
# inference: their shapes are declared, their values are not needed.
_SHAPE_INFERENCE_CONST_LIMIT = 4096


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """Return the value of a constant tensor, or None when it is computed at run time.

    A weight still stored in the input model is read without being cached on the
    tensor: the passes replace most weights, and a cached copy of each would keep
    the model's weights in memory twice.
    """
    if isinstance(tensor, gs.Constant):
        stored = getattr(tensor, "_values", None)
        if isinstance(stored, LazyValues):
            return stored.load()
        return np.asarray(tensor.values)
    producer = producer_of(tensor)
    if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
        value = producer.attrs["value"]
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def is_const(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or const_value(tensor) is not None


def producer_of(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers_of(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def only_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """Return the single consumer of ``tensor``, or None if it has several or is a graph output."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def split_const_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray, int] | None:
    """For a binary node with exactly one constant operand, return (activation, constant, constant index)."""
    if len(node.inputs) != 2:
        return None
    values = [const_value(t) for t in node.inputs]
    if values[0] is None and values[1] is not None:
        return node.inputs[0], values[1], 1
    if values[1] is None and values[0] is not None:
        return node.inputs[1], values[0], 0
    return None


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def shape_of(tensor: gs.Tensor) -> list | None:
    value = const_value(tensor)
    if value is not None:
        return list(value.shape)
    return list(tensor.shape) if tensor.shape is not None else None


def static_shape(tensor: gs.Tensor) -> list[int] | None:
    """Return the shape if every dimension is a known integer, else None."""
    shape = shape_of(tensor)
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return [int(d) for d in shape]


def rank_of(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def np_dtype(tensor: gs.Tensor):
    value = const_value(tensor)
    if value is not None:
        return value.dtype
    if tensor.dtype is None:
        return None
    return np.dtype(tensor.dtype) if not isinstance(tensor.dtype, int) else onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype)


def is_float(tensor: gs.Tensor) -> bool:
    dtype = np_dtype(tensor)
    return dtype is not None and np.issubdtype(dtype, np.floating)


class NameAllocator:
    """Hands out node and tensor names that are unique in one graph."""

    def __init__(self, graph: gs.Graph):
        self.used: set[str] = set()
        for node in graph.nodes:
            if node.name:
                self.used.add(node.name)
        self.used.update(graph.tensors().keys())

    def new(self, base: str) -> str:
        base = base or "vit2bpu"
        if base not in self.used:
            self.used.add(base)
            return base
        index = 1
        while f"{base}_{index}" in self.used:
            index += 1
        name = f"{base}_{index}"
        self.used.add(name)
        return name


class GraphEditor:
    """Creates nodes and tensors in one graph with unique names and explicit shapes.

    Every tensor a pass creates gets its shape and dtype here, so later passes can
    read shapes without running shape inference again.
    """

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.names = NameAllocator(graph)

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        value = np.asarray(value)
        # np.ascontiguousarray would turn a rank-0 scalar into shape [1]; keep the rank.
        return gs.Constant(self.names.new(base), value if value.flags.c_contiguous else value.copy())

    def variable(self, base: str, dtype, shape: Sequence[int] | None) -> gs.Variable:
        return gs.Variable(self.names.new(base), dtype=dtype, shape=list(shape) if shape is not None else None)

    def node(self, op: str, base: str, inputs: Sequence[gs.Tensor], *, attrs: dict | None = None,
             dtype=None, shape: Sequence[int] | None = None, domain: str | None = None,
             num_outputs: int = 1, output_shapes: Sequence[Sequence[int]] | None = None,
             outputs: Sequence[gs.Variable] | None = None) -> gs.Node:
        """Append a node named after ``base`` and return it.

        Its outputs are new variables unless ``outputs`` passes existing ones (which
        must have lost their old producer).
        """
        name = self.names.new(base)
        if outputs is None:
            if output_shapes is None:
                output_shapes = [shape] * num_outputs
            outputs = [self.variable(f"{name}_output_{i}" if num_outputs > 1 else f"{name}_output", dtype, s)
                       for i, s in enumerate(output_shapes)]
        node = gs.Node(op=op, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=outputs, domain=domain)
        self.graph.nodes.append(node)
        return node

    def out(self, op: str, base: str, inputs: Sequence[gs.Tensor], **kwargs) -> gs.Variable:
        """Append a single-output node and return its output tensor."""
        return self.node(op, base, inputs, **kwargs).outputs[0]


def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` read ``new``.

    When ``old`` is a graph output, ``new`` takes over its name and its place in
    ``graph.outputs``, so the model's interface keeps its names.
    """
    for node in list(old.outputs):
        node.inputs = [new if t is old else t for t in node.inputs]
    if old in graph.outputs:
        output_name = old.name
        old.name = f"{output_name}__replaced"
        new.name = output_name
        graph.outputs = [new if t is old else t for t in graph.outputs]


def light_model(graph: gs.Graph, opset: int | None = None) -> onnx.ModelProto:
    """Export ``graph`` without the values of its large constants, for shape inference and checks.

    Large constants become graph inputs with their shapes declared; they are never
    read or copied, which keeps this cheap on models of hundreds of megabytes.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    initializers, weight_inputs, seen = [], [], set()
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or tensor.name in seen or not tensor.name:
            continue
        seen.add(tensor.name)
        shape = list(tensor.shape)
        if int(np.prod(shape)) > _SHAPE_INFERENCE_CONST_LIMIT:
            elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
            weight_inputs.append(onnx.helper.make_tensor_value_info(tensor.name, elem_type, shape))
        else:
            initializers.append(OnnxExporter.export_tensor_proto(tensor))
    nodes = [OnnxExporter.export_node(node) for node in graph.nodes]
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs] + weight_inputs
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    opsets = [onnx.helper.make_opsetid("", opset if opset is not None else graph.opset)]
    opsets += [onnx.helper.make_opsetid(domain, 1) for domain in sorted({n.domain for n in graph.nodes} - {"", None})]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, graph.name or "graph", inputs, outputs, initializers),
                                   opset_imports=opsets)
    return model


def export_model(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto, adding the initializers one at a time.

    ``gs.export_onnx`` builds every TensorProto first and then copies the list into
    the graph, which keeps all weights in memory twice at once; this keeps one extra tensor
    at most. Weights still stored in the input model are copied from their
    TensorProto without going through numpy.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    model = onnx.ModelProto()
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    proto = model.graph
    proto.name = graph.name or "graph"
    proto.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    proto.input.extend(OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs)
    proto.output.extend(OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs)
    seen = set()
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or tensor.name in seen:
            continue
        seen.add(tensor.name)
        stored = getattr(tensor, "_values", None)
        initializer = proto.initializer.add()
        if isinstance(stored, LazyValues) and getattr(stored, "tensor", None) is not None:
            initializer.CopyFrom(stored.tensor)
            initializer.name = tensor.name
            continue
        value = np.asarray(tensor.values)  # not ascontiguousarray, which turns a rank-0 scalar into shape [1]
        initializer.name = tensor.name
        initializer.data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        initializer.dims.extend(value.shape)
        initializer.raw_data = value.tobytes()
    return model


def infer_shapes(graph: gs.Graph) -> None:
    """Run ONNX shape inference and copy the inferred shapes and dtypes onto ``graph``'s variables."""
    model = light_model(graph)
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several types here; shapes stay as they were
        log.debug("shape inference failed: %s", exc)
        return
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant) or name not in infos:
            continue
        type_proto = infos[name].type
        if not type_proto.HasField("tensor_type"):
            continue
        tensor_type = type_proto.tensor_type
        if tensor_type.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if tensor_type.HasField("shape"):
            dims = []
            for dim in tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                elif dim.HasField("dim_param"):
                    dims.append(dim.dim_param)
                else:
                    dims.append(None)
            tensor.shape = _merge_dims(tensor.shape, dims)


def _merge_dims(known, inferred):
    """Prefer a static dimension over a symbolic one; inference can lose what a pass stated."""
    if known is None or len(known) != len(inferred):
        return inferred
    return [k if isinstance(k, (int, np.integer)) and (not isinstance(i, (int, np.integer))) else i
            for k, i in zip(known, inferred)]


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system.

    graphsurgeon graphs are reference cycles, so replaced weights wait for the cyclic
    collector; and glibc keeps freed tensors of tens of megabytes in its heap unless
    malloc_trim returns them (glibc only; elsewhere the memory is reused by later allocations).
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cleanup(graph: gs.Graph) -> None:
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def node_inputs_named(nodes: Iterable[gs.Node]) -> str:
    return ", ".join(f"'{n.name}' ({n.op})" for n in nodes)
