"""neoxrt: GPT-NeoX from PyTorch to ONNX Runtime and TensorRT, checked against PyTorch at every step."""

from neoxrt.errors import (
    BuildError,
    CalibrationError,
    CheckpointError,
    ExportError,
    NeoxrtError,
    ParityError,
    RuntimeShapeError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "NeoxrtError",
    "CheckpointError",
    "ExportError",
    "CalibrationError",
    "BuildError",
    "RuntimeShapeError",
    "ParityError",
]
