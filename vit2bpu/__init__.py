"""vit2bpu: rewrite exported Vision Transformers into the all-4-D convolution form BPUs run fast."""

__version__ = "0.1.0"

from .api import convert, save  # noqa: E402
from .errors import (InputModelError, OutputError, ParityError, UnsupportedModelError, UsageError,  # noqa: E402
                     Vit2BpuError)
from .options import ConvertOptions  # noqa: E402
from .report import ConversionReport  # noqa: E402

__all__ = ["convert", "save", "ConvertOptions", "ConversionReport", "Vit2BpuError", "InputModelError",
           "OutputError", "ParityError", "UnsupportedModelError", "UsageError", "__version__"]
