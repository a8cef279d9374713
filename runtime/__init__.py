"""The thin runtime: ONNX Runtime (and TensorRT) sessions, text generation, and the classification /
question-answering heads. Imports neither torch nor transformers."""

from neoxrt.runtime.classifier import Answer, Classification, Classifier, TaggedToken
from neoxrt.runtime.generator import GenerationResult, Generator, TokenEvent
from neoxrt.runtime.sampling import GenerationOptions
from neoxrt.runtime.structured import StructuredOutputs

__all__ = ["Answer", "Classification", "Classifier", "GenerationOptions", "GenerationResult", "Generator",
           "StructuredOutputs", "TaggedToken", "TokenEvent"]
