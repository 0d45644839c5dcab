"""Give every graph input a static shape and propagate shapes through the graph.

The BPU toolchain needs static shapes, and the pattern passes need to know
ranks and channel counts. Shapes given with ``--input-shape`` win; a symbolic
batch dimension (the first one) is pinned to 1; any other symbolic dimension
is an error that says which option fixes it.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..errors import UnsupportedModelError, UsageError
from ..graph import GraphEditor, infer_shapes
from ..pass_manager import Pass, PassContext, PassResult


class PinInputShapes(Pass):
    name = "pin_shapes"
    summary = "give every graph input a static shape, then infer the shapes of all tensors"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        requested = dict(ctx.options.input_shapes)
        names = {t.name for t in graph.inputs}
        unknown = sorted(set(requested) - names)
        if unknown:
            raise UsageError(f"--input-shape names {unknown}, but the model's inputs are {sorted(names)}")

        for tensor in graph.inputs:
            if tensor.name in requested:
                shape = [int(d) for d in requested[tensor.name]]
                if tensor.shape is not None and len(tensor.shape) != len(shape):
                    raise UsageError(f"--input-shape gives {len(shape)} dimensions for '{tensor.name}', "
                                     f"but the model declares {len(tensor.shape)}: {list(tensor.shape)}")
                for declared, pinned in zip(tensor.shape or [], shape):
                    if isinstance(declared, int) and declared > 0 and declared != pinned:
                        raise UsageError(f"--input-shape sets '{tensor.name}' to {shape}, but the model fixes it to "
                                         f"{list(tensor.shape)}")
                if list(tensor.shape or []) != shape:
                    result.notes.append(f"input '{tensor.name}' pinned to {shape}")
                    result.rewritten += 1
                tensor.shape = shape
                continue
            if tensor.shape is None:
                raise UnsupportedModelError(f"input '{tensor.name}' has no declared shape",
                                            hint=f"give it with --input-shape {tensor.name}=1x3x224x224")
            shape = list(tensor.shape)
            for axis, dim in enumerate(shape):
                if isinstance(dim, int) and dim > 0:
                    continue
                if axis == 0:
                    shape[0] = 1
                    result.notes.append(f"symbolic batch dimension '{dim}' of input '{tensor.name}' pinned to 1")
                    result.rewritten += 1
                    continue
                raise UnsupportedModelError(
                    f"input '{tensor.name}' has the symbolic dimension '{dim}' at axis {axis}; the BPU needs static shapes",
                    hint=f"give the full shape with --input-shape {tensor.name}=" + "x".join(
                        str(d) if isinstance(d, int) and d > 0 else "N" for d in tensor.shape))
            tensor.shape = shape

        for tensor in graph.outputs:
            # Output shapes are inferred again from the pinned inputs.
            tensor.shape = None
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
                tensor.shape = None
        infer_shapes(graph)
