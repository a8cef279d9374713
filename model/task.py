"""`HeadConfig`: which GPT-NeoX head a checkpoint carries (optimum's task name) and its labels -- the part of
a checkpoint's description that `NeoXConfig` (the shared trunk) leaves out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from neoxrt import contract as io
from neoxrt.errors import CheckpointError

# task -> (our and Hugging Face's module name of the output layer, has bias); the names transformers uses
HEAD_LAYERS = {
    io.TEXT_GENERATION: ("lm_head", False),
    io.TEXT_CLASSIFICATION: ("score", False),
    io.TOKEN_CLASSIFICATION: ("classifier", True),
    io.QUESTION_ANSWERING: ("qa_outputs", True),
}


@dataclass(frozen=True)
class HeadConfig:
    """Args:
    task: one of `contract.TASKS`.
    id2label: label names by class index (sequence and token classification); `num_labels` is its length.
    """

    task: str = io.TEXT_GENERATION
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    num_labels: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.task not in io.TASKS:
            raise CheckpointError(f"task must be one of {', '.join(io.TASKS)}, got {self.task!r}")
        if not self.id2label:
            raise CheckpointError("config.json: id2label is empty; a classifier needs at least one label")
        object.__setattr__(self, "id2label", tuple(str(label) for label in self.id2label))
        object.__setattr__(self, "num_labels", len(self.id2label))

    def output_width(self) -> int:
        """Columns of the head's output layer (2 for question answering: start and end)."""
        return 2 if self.task == io.QUESTION_ANSWERING else self.num_labels

    def to_dict(self) -> dict:
        return {"task": self.task, "id2label": {str(i): label for i, label in enumerate(self.id2label)}}
