"""One exception tree. The CLI turns every `NeoxrtError` into one line on stderr and exit code 2."""


class NeoxrtError(Exception):
    """Base of every error neoxrt raises on bad input or a failed check."""


class CheckpointError(NeoxrtError):
    """A checkpoint folder, its config.json or its tensors are missing, malformed or unsupported."""


class ExportError(NeoxrtError):
    """An ONNX export could not be produced or validated."""


class CalibrationError(NeoxrtError):
    """INT8 calibration data or options are unusable."""


class BuildError(NeoxrtError):
    """A TensorRT engine could not be built or loaded."""


class RuntimeShapeError(NeoxrtError):
    """Inputs to a runtime session do not fit the artifact (shapes, lengths, options)."""


class GrammarError(NeoxrtError):
    """A structured-outputs constraint (JSON schema, regex, choice, grammar) is malformed, unsupported by the
    grammar engine, or took longer than its limit to compile."""


class ArtifactError(NeoxrtError):
    """An artifact folder is missing files or its manifest does not match what is there."""


class ParityError(NeoxrtError):
    """A candidate's outputs differ from the reference by more than the tolerance."""
