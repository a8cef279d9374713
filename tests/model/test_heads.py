"""The PyTorch heads match transformers' GPTNeoXFor{Sequence,Token}Classification / ForQuestionAnswering /
GPTNeoXModel on every row of left- and right-padded batches (each row against transformers on that row alone);
config.json architectures and labels become a HeadConfig."""

import pytest
import torch

from neox_testing import HEAD_ARCHITECTURES, HEAD_ROWS, LABELS, head_errors, head_reference, padded, write_head
from neoxrt import contract as io
from neoxrt.errors import CheckpointError
from neoxrt.model.heads import load_head_model
from neoxrt.model.hf_names import head_from_hf

ATOL = 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("task", list(HEAD_ARCHITECTURES))
def test_head_matches_transformers_per_row(task, side, tmp_path):
    reference = write_head(task, tmp_path / "ckpt")
    model = load_head_model(tmp_path / "ckpt")
    assert model.head.task == task and model.head.id2label == (LABELS if task in ("text-classification", "token-classification")
                                                               else model.head.id2label)
    ids, mask = padded(HEAD_ROWS, side)
    with torch.no_grad():
        out = {k: v.numpy() for k, v in model(torch.from_numpy(ids), torch.from_numpy(mask)).items()}
    errors = head_errors(out, head_reference(reference, HEAD_ROWS), mask)
    assert errors and max(errors.values()) <= ATOL, errors


def test_architectures_and_labels():
    head = head_from_hf({"architectures": ["GPTNeoXForSequenceClassification"], "id2label": {"1": "b", "0": "a"}})
    assert (head.task, head.id2label, head.num_labels) == (io.TEXT_CLASSIFICATION, ("a", "b"), 2)
    assert head_from_hf({}).task == io.TEXT_GENERATION
    assert head_from_hf({"num_labels": 4}, io.TOKEN_CLASSIFICATION).id2label == tuple(f"LABEL_{i}" for i in range(4))
    assert head_from_hf({"architectures": ["GPTNeoXForQuestionAnswering"]}).output_width() == 2
    with pytest.raises(CheckpointError, match="architectures"):
        head_from_hf({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(CheckpointError, match="id2label indices"):
        head_from_hf({"id2label": {"0": "a", "2": "c"}})
    with pytest.raises(CheckpointError, match="task must be one of"):
        head_from_hf({}, "summarization")


def test_lm_loader_refuses_a_classifier_checkpoint(tmp_path):
    from neoxrt.model import load_model

    write_head("text-classification", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no weights for task text-generation .*no embed_out.weight"):
        load_model(tmp_path / "ckpt")
