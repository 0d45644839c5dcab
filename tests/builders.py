"""Hand-built ViT-like ONNX graphs in the forms exporters write, for pass-level and property tests.

``build_vit(ViTSpec(...))`` composes a patch embedding, class token, position
embedding, ``depth`` encoder blocks and a classifier head. Every variant a
DeiT/ViT exporter writes has a switch: LayerNorm as the 9-node chain (Pow or
Mul square, Div or Reciprocal) or as the LayerNormalization op, GELU as the Erf
chain in either constant order or as the Gelu op, Linear as MatMul + Add in
either order, MatMul without bias or Gemm, and attention as timm's fused qkv
with a 5-D reshape or Hugging Face's separate q/k/v, with the scale on q or on
the scores. Axes and split sizes are attributes or inputs as the opset requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass
class ViTSpec:
    width: int = 32
    heads: int = 2
    depth: int = 1
    grid: tuple[int, int] = (2, 3)  # patch rows, patch columns
    patch: int = 4
    classes: int = 5
    mlp_ratio: int = 2
    epsilon: float = 1e-6
    opset: int = 14
    layernorm: str = "pow"          # pow | mul | reciprocal | op
    gelu: str = "ts"                # ts (constants second) | dynamo (0.5 first) | op
    linear_bias: bool = True
    bias_first: bool = True         # Add(bias, mm) as the TorchScript exporter writes it
    attention: str = "timm"         # timm (fused qkv, 5-D) | hf (separate q/k/v, 4-D)
    scale_on: str = "q"             # q | scores
    gamma_zeros: bool = True
    class_token: bool = True
    head: str = "gemm"              # gemm | matmul
    tokens_input: bool = False      # blocks only: input and output are token streams [1, N, C]
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] + (1 if self.class_token else 0)


class _Builder:
    def __init__(self, spec: ViTSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, base: str, shape, scale: float = 0.2) -> str:
        return self.const(base, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs, base: str | None = None, outputs: int = 1, **attrs):
        name = self.name(base or op.lower())
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def scalar(self, value: float) -> str:
        return self.const("scalar", np.array(value, np.float32))

    def axes_node(self, op: str, x: str, axes, **attrs) -> str:
        """Squeeze/Unsqueeze/ReduceMean with axes as attribute or input, as the opset dictates."""
        input_from = {"Squeeze": 13, "Unsqueeze": 13, "ReduceMean": 18}[op]
        if self.spec.opset >= input_from:
            return self.node(op, [x, self.const("axes", np.array(axes, np.int64))], **attrs)
        return self.node(op, [x], axes=list(axes), **attrs)

    # -- layers ---------------------------------------------------------------------------------

    def linear(self, x: str, cin: int, cout: int, base: str) -> str:
        spec = self.spec
        w = self.weight(f"{base}_weight", (cin, cout))
        y = self.node("MatMul", [x, w], base=f"{base}_matmul")
        if not spec.linear_bias:
            return y
        b = self.weight(f"{base}_bias", (cout,), 0.05)
        return self.node("Add", [b, y] if spec.bias_first else [y, b], base=f"{base}_add")

    def layernorm(self, x: str, channels: int) -> str:
        spec = self.spec
        gamma = (1.0 + 0.3 * self.rng.standard_normal(channels)).astype(np.float32)
        if spec.gamma_zeros:
            gamma[::5] = 0.0
        beta = (0.1 * self.rng.standard_normal(channels)).astype(np.float32)
        if spec.layernorm == "op":
            return self.node("LayerNormalization", [x, self.const("gamma", gamma), self.const("beta", beta)],
                             axis=-1, epsilon=spec.epsilon)
        mean = self.axes_node("ReduceMean", x, [-1])
        centred = self.node("Sub", [x, mean])
        if spec.layernorm == "mul":
            square = self.node("Mul", [centred, centred])
        else:
            square = self.node("Pow", [centred, self.scalar(2.0)])
        var = self.axes_node("ReduceMean", square, [-1])
        std = self.node("Sqrt", [self.node("Add", [var, self.scalar(spec.epsilon)])])
        if spec.layernorm == "reciprocal":
            normed = self.node("Mul", [centred, self.node("Reciprocal", [std])])
        else:
            normed = self.node("Div", [centred, std])
        return self.node("Add", [self.node("Mul", [normed, self.const("gamma", gamma)]), self.const("beta", beta)])

    def gelu(self, x: str) -> str:
        form = self.spec.gelu
        if form == "op":
            return self.node("Gelu", [x])
        erf = self.node("Erf", [self.node("Div", [x, self.scalar(math.sqrt(2.0))])])
        plus = self.node("Add", [erf, self.scalar(1.0)])
        if form == "dynamo":
            return self.node("Mul", [x, self.node("Mul", [self.scalar(0.5), plus])])
        return self.node("Mul", [self.node("Mul", [x, plus]), self.scalar(0.5)])

    def attention(self, x: str) -> str:
        spec = self.spec
        n, c, h = spec.tokens, spec.width, spec.heads
        d = c // h
        scale = d ** -0.5
        if spec.attention == "timm":
            qkv = self.linear(x, c, 3 * c, "qkv")
            qkv5 = self.node("Reshape", [qkv, self.const("shape", np.array([1, n, 3, h, d], np.int64))])
            moved = self.node("Transpose", [qkv5], perm=[2, 0, 3, 1, 4])
            if spec.opset >= 13:
                parts = self.node("Split", [moved, self.const("split", np.array([1, 1, 1], np.int64))], outputs=3, axis=0)
            else:
                parts = self.node("Split", [moved], outputs=3, axis=0, split=[1, 1, 1])
            q, k, v = [self.axes_node("Squeeze", p, [0]) for p in parts]
            kt = self.node("Transpose", [k], perm=[0, 1, 3, 2])
        else:
            def heads(t, perm):
                four = self.node("Reshape", [t, self.const("shape", np.array([1, n, h, d], np.int64))])
                return self.node("Transpose", [four], perm=perm)
            q = heads(self.linear(x, c, c, "query"), [0, 2, 1, 3])
            kt = heads(self.linear(x, c, c, "key"), [0, 2, 3, 1])
            v = heads(self.linear(x, c, c, "value"), [0, 2, 1, 3])
        if spec.scale_on == "q":
            q = self.node("Mul", [q, self.scalar(scale)])
            scores = self.node("MatMul", [q, kt])
        else:
            scores = self.node("Div", [self.node("MatMul", [q, kt]), self.scalar(1.0 / scale)])
        probs = self.node("Softmax", [scores], axis=3 if spec.opset < 13 else -1)
        context = self.node("MatMul", [probs, v])
        merged = self.node("Reshape", [self.node("Transpose", [context], perm=[0, 2, 1, 3]),
                                       self.const("shape", np.array([1, n, c], np.int64))])
        return self.linear(merged, c, c, "proj")

    def block(self, x: str) -> str:
        c = self.spec.width
        x = self.node("Add", [x, self.attention(self.layernorm(x, c))])
        hidden = self.linear(self.layernorm(x, c), c, c * self.spec.mlp_ratio, "fc1")
        return self.node("Add", [x, self.linear(self.gelu(hidden), c * self.spec.mlp_ratio, c, "fc2")])

    def model(self) -> onnx.ModelProto:
        spec = self.spec
        rows, cols = spec.grid
        c, n = spec.width, spec.tokens
        if spec.tokens_input:
            return self._blocks_only()
        image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, rows * spec.patch, cols * spec.patch])
        feat = self.node("Conv", ["input", self.weight("patch_weight", (c, 3, spec.patch, spec.patch)),
                                  self.weight("patch_bias", (c,), 0.05)],
                         kernel_shape=[spec.patch, spec.patch], strides=[spec.patch, spec.patch])
        flat = self.node("Reshape", [feat, self.const("shape", np.array([1, c, rows * cols], np.int64))])
        x = self.node("Transpose", [flat], perm=[0, 2, 1])
        if spec.class_token:
            x = self.node("Concat", [self.weight("cls_token", (1, 1, c), 0.1), x], axis=1)
        x = self.node("Add", [x, self.weight("pos_embed", (1, n, c), 0.1)])
        for _ in range(spec.depth):
            x = self.block(x)
        x = self.layernorm(x, c)
        pooled = self.node("Gather", [x, self.const("index", np.array(0, np.int64))], axis=1)
        if spec.head == "gemm":
            logits = self.node("Gemm", [pooled, self.weight("head_weight", (spec.classes, c)),
                                        self.weight("head_bias", (spec.classes,), 0.05)], transB=1)
        else:
            logits = self.linear(pooled, c, spec.classes, "head")
        self.nodes[-1].output[0] = "logits"
        output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, spec.classes])
        graph = helper.make_graph(self.nodes, "vit", [image], [output], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
        model.ir_version = 7 if spec.opset <= 12 else 8
        onnx.checker.check_model(model)
        return model


def _blocks_only(self) -> onnx.ModelProto:
    spec = self.spec
    shape = [1, spec.tokens, spec.width]
    x = "tokens"
    for _ in range(spec.depth):
        x = self.block(x)
    self.nodes[-1].output[0] = "tokens_out"
    graph = helper.make_graph(self.nodes, "blocks", [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("tokens_out", TensorProto.FLOAT, shape)], self.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = 7 if spec.opset <= 12 else 8
    onnx.checker.check_model(model)
    return model


_Builder._blocks_only = _blocks_only


def build_vit(spec: ViTSpec | None = None, **overrides) -> onnx.ModelProto:
    """Build a ViT-like model; keyword arguments override fields of ``spec``."""
    spec = spec or ViTSpec()
    for key, value in overrides.items():
        setattr(spec, key, value)
    return _Builder(spec).model()


def single_op_model(nodes, inputs, outputs, initializers=(), opset: int = 14) -> onnx.ModelProto:
    """Wrap hand-written nodes into a checked model."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset <= 12 else 8
    onnx.checker.check_model(model)
    return model
