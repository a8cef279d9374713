"""The checkpoint's generation_config.json travels into the artifact and gives generate() its defaults, under
the caller's keywords; max_length means prompt + new tokens, as in transformers."""

import json
import shutil

import pytest

from neox_testing import default_checkpoint
from neoxrt import contract as io
from neoxrt.errors import ArtifactError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator

PROMPT = "The state of the Union is"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("gencfg")
    ckpt = root / "ckpt"
    shutil.copytree(default_checkpoint(), ckpt)
    (ckpt / io.GENERATION_CONFIG_FILE).write_text(json.dumps(
        {"do_sample": False, "no_repeat_ngram_size": 2, "max_new_tokens": 7, "eos_token_id": [0, 187], "top_k": 5}))
    export_checkpoint(ckpt, root / "art", ExportOptions(), log=lambda *_: None)
    return root / "art"


def test_defaults_come_from_the_checkpoint(artifact):
    manifest = json.loads((artifact / io.MANIFEST_FILE).read_text())
    assert io.GENERATION_CONFIG_FILE in manifest["files"]
    gen = Generator.from_artifacts(artifact)
    # eos 0 is the model's own; 187 becomes an extra stop id; top_k is ignored as do_sample is false
    assert gen.defaults == {"do_sample": False, "no_repeat_ngram_size": 2, "max_new_tokens": 7, "stop_token_ids": (187,)}
    got = gen.generate([PROMPT]).ids[0]
    assert got == gen.generate([PROMPT], do_sample=False, no_repeat_ngram_size=2, max_new_tokens=7,
                               stop_token_ids=(187,)).ids[0]
    assert len(got) == 7
    bigrams = list(zip(got, got[1:]))
    assert len(bigrams) == len(set(bigrams))
    assert len(gen.generate([PROMPT], max_new_tokens=3).ids[0]) == 3  # the caller's keyword wins
    width = len(gen.encode([PROMPT])[0])
    assert len(gen.generate([PROMPT], max_length=width + 4).ids[0]) == 4
    sampled = [gen.generate([PROMPT], temperature=0.9, seed=s, max_new_tokens=12).ids[0] for s in range(4)]
    assert len({tuple(x) for x in sampled}) > 1  # a caller's temperature still samples


def test_malformed_generation_config_is_refused(artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / io.GENERATION_CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object"):
        Generator.from_artifacts(bad, verify=False)
