"""The thin runtime: ONNX Runtime (and TensorRT) sessions and text generation. Imports neither torch nor
transformers."""

from neoxrt.runtime.generator import GenerationResult, Generator, TokenEvent
from neoxrt.runtime.sampling import GenerationOptions

__all__ = ["GenerationOptions", "GenerationResult", "Generator", "TokenEvent"]
