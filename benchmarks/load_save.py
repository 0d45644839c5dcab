"""Load an ONNX model with ``onnx.load`` and write it back with ``onnx.save``.

The conversion benchmark's floor: a tool that loads the whole model with onnx and
writes a model of the same size pays at least about this much in time and memory.

    python benchmarks/load_save.py IN.onnx OUT.onnx [--external-data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="ONNX model to read, with any external data beside it")
    parser.add_argument("output", help="ONNX file to write")
    parser.add_argument("--external-data", action="store_true",
                        help="write every tensor of 1 KiB or more to OUTPUT.data, as 'vit2bpu --external-data' "
                             "does")
    args = parser.parse_args()

    model = onnx.load(args.input)
    if args.external_data:
        onnx.save(model, args.output, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(args.output).name + ".data", size_threshold=1024)
    else:
        onnx.save(model, args.output)


if __name__ == "__main__":
    main()
