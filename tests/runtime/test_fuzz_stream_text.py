"""Fuzz (hypothesis): a row's streamed pieces (`RowBook.emit`, what `Generator.stream` and both servers send)
against the non-streamed text (`Generator._truncate(decode(ids), stop_strings)`), for token sequences of random
Unicode text (multi-byte characters split over byte-level BPE tokens, and random ids: invalid UTF-8), up to three
stop strings (cut from the text across token boundaries, overlapping, prefixes of one another, multi-byte), ending
by length, a stop token or a stop string, for the byte-level tokenizer and the whole-text decode branch. The pieces
join to the text, and never show text at or after the first stop string."""

import pytest
from fuzzing import budget, fuzz
from hypothesis import given, note
from hypothesis import strategies as st

from neox_testing import default_checkpoint
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.generator import RowBook
from neoxrt.runtime.sampling import GenerationOptions

TEXT = st.lists(st.sampled_from(list("ab c.\n\\\"'é€日本😀\u0301") + ["ab", "abc"]), min_size=1, max_size=25).map("".join)


class WholeText:
    """The tokenizer seen through the other branch of `Generator._piece`: not byte-level, decoded whole."""

    decoder = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def encode(self, text):
        return self.tokenizer.encode(text)


@pytest.fixture(scope="module", params=["byte-level", "whole-text"])
def generator(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream-text") / "model"
    export_checkpoint(default_checkpoint(), out, ExportOptions(), log=lambda *_: None)
    gen = Generator.from_artifacts(out)
    if request.param == "whole-text":
        gen.tokenizer = WholeText(gen.tokenizer)
    return gen


@fuzz
@budget(150)
@given(text=TEXT, data=st.data())
def test_streamed_pieces_join_to_the_text(generator, text, data):
    tokenizer = generator.tokenizer
    ids = tokenizer.encode(text).ids
    for _ in range(data.draw(st.integers(0, 3))):  # random ids: bytes that are not UTF-8 on their own
        ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.integers(1, 50276)))
    decoded = tokenizer.decode(ids)
    stops = []
    for _ in range(data.draw(st.integers(0, 3))):
        if decoded and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(decoded) - 1))
            stops.append(decoded[i:data.draw(st.integers(i + 1, min(len(decoded), i + 4)))])
        else:
            stops.append(data.draw(st.text(alphabet=st.sampled_from(list("abc é€日😀")), min_size=1, max_size=3)))
    stop_ids = (data.draw(st.sampled_from(ids)),) if data.draw(st.booleans()) else ()
    options = GenerationOptions(max_new_tokens=data.draw(st.integers(1, len(ids))), stop_strings=tuple(stops),
                                stop_token_ids=stop_ids)
    book, pieces, out = RowBook(generator, [[1]], options), [], []
    for token in ids:
        event = book.emit(0, token)
        out.append(token)
        pieces.append(event.text)
        if event.finish_reason:
            break
    full = tokenizer.decode(out)
    want = Generator._truncate(full, tuple(stops))
    note(f"ids={out} stops={stops} pieces={pieces} want={want!r}")
    assert "".join(pieces) == want
    assert len("".join(pieces)) <= min((full.find(s) for s in stops if s in full), default=len(full))
