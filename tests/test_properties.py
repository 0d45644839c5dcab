"""Property-based tests: random ViT-like graphs keep parity and the 4-D structure after conversion.

Each example draws a width (heads x head size, multiples of 8 and not), 1-12 heads, a
patch grid of up to 299 patches (square or not), depth 1-3, epsilon from 1e-12 to 1e-5,
gamma with or without zeros, Linear with or without bias in either Add order, every
LayerNorm, GELU and attention form of the builders, and an opset from 11 to 20.

The example count comes from the hypothesis profile: ``ci`` (default, 25 examples) or
``long`` (1000 examples): ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from builders import ViTSpec, build_vit
from conftest import assert_bpu_form, cosine, random_input, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vit2bpu

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Parity bounds for these fp32 graphs: cosine, and the max absolute error relative to the
# largest reference logit (the logits of random weights reach a few units).
MIN_COSINE = 0.99999
MAX_RELATIVE_ERROR = 1e-4


@st.composite
def vit_specs(draw) -> ViTSpec:
    opset = draw(st.sampled_from([11, 13, 14, 17, 18, 20]))
    heads = draw(st.integers(1, 12))
    head_dim = draw(st.sampled_from([2, 3, 4, 5, 8, 12, 16]))
    rows = draw(st.integers(1, 17))
    cols = draw(st.integers(1, min(17, 299 // rows)))
    layernorm = draw(st.sampled_from(["pow", "mul", "reciprocal"] + (["op"] if opset >= 17 else [])))
    gelu = draw(st.sampled_from(["ts", "dynamo"] + (["op"] if opset >= 20 else [])))
    return ViTSpec(width=heads * head_dim, heads=heads, depth=draw(st.integers(1, 3)), grid=(rows, cols), patch=2,
                   classes=draw(st.integers(2, 10)), mlp_ratio=draw(st.sampled_from([1, 2, 4])),
                   epsilon=draw(st.sampled_from([1e-12, 1e-6, 1e-5])), opset=opset, layernorm=layernorm, gelu=gelu,
                   linear_bias=draw(st.booleans()), bias_first=draw(st.booleans()),
                   attention=draw(st.sampled_from(["timm", "hf"])), scale_on=draw(st.sampled_from(["q", "scores"])),
                   gamma_zeros=draw(st.booleans()), class_token=draw(st.booleans()),
                   head=draw(st.sampled_from(["gemm", "matmul"])), seed=draw(st.integers(0, 2**16)))


def _onnxruntime_runs(opset: int) -> bool:
    import onnxruntime

    major, minor = (int(p) for p in onnxruntime.__version__.split(".")[:2])
    return opset <= (19 if (major, minor) < (1, 17) else 21)


@given(vit_specs())
def test_random_vit_keeps_parity_and_structure(spec):
    model = build_vit(spec)
    check_parity = _onnxruntime_runs(spec.opset)
    converted, report = vit2bpu.convert(model, parity=check_parity)

    assert_bpu_form(converted)
    assert report.unconverted == []
    rewritten = {r.name: r.rewritten for r in report.passes}
    assert rewritten["attention"] == spec.depth
    assert rewritten["layernorm"] == 2 * spec.depth + 1
    assert rewritten["linear"] == spec.depth * (4 if spec.attention == "timm" else 6) + 1

    if check_parity:
        feeds = random_input(model, seed=spec.seed)
        expected, got = run(model, feeds)[0], run(converted, feeds)[0]
        assert cosine(expected, got) >= MIN_COSINE
        scale = max(1.0, float(np.max(np.abs(expected))))
        assert float(np.max(np.abs(expected - got))) <= MAX_RELATIVE_ERROR * scale
