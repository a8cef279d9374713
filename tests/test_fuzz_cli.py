"""Fuzz (hypothesis): every subcommand with hostile option values (NaN, infinities, negatives, zero, huge,
not numbers, empty). The contract, end to end through `neoxrt.cli.main`: exit 0 with a correct result (an
artifact that verifies and generates the fp32 export's tokens, a report, tokens), or exit 2 with one line naming
the option -- never a traceback, never a half-written output folder. (compare may also exit 1: over threshold.)

Accepted values that are expensive run for real on the embedded 14M model, so export / calibrate / compare
get a few examples in CI; `make fuzz` multiplies every budget. `bench` is left out: accepted values start a
benchmark of several minutes."""

import io as stdio
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from fuzzing import budget, fuzz, one_line
from hypothesis import event, given
from hypothesis import strategies as st

from neox_testing import default_checkpoint
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions

ODD = ["nan", "NaN", "inf", "-inf", "1e400", "abc", "", "1.5", "0x10", "9223372036854775808", " 7", "-0", "1e3"]
# small integers only: accepted values run (a --num-beams of 10**5 would allocate 10**5 x vocab logits)
INTS = st.one_of(st.integers(-3, 6).map(str), st.sampled_from(ODD))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.floats(-2, 2).map(str), st.sampled_from(ODD))
SMALL = st.one_of(st.integers(1, 6).map(str), INTS)  # half valid: the expensive commands' few examples also run
SEEDS = st.one_of(st.integers(-2, 2**64).map(str), st.sampled_from(ODD))
PROMPT = ["--input-ids", "5,17,33", "--json"]

# subcommand -> (fixed arguments, {option: strategy}, CI examples)
COMMANDS = {
    "generate": (["{art}", *PROMPT], {
        "--max-new-tokens": INTS, "--temperature": FLOATS, "--top-k": INTS, "--top-p": FLOATS, "--seed": SEEDS,
        "--repetition-penalty": FLOATS, "--min-new-tokens": INTS, "--no-repeat-ngram-size": INTS, "--typical-p": FLOATS,
        "--logprobs": INTS, "--num-beams": INTS, "--length-penalty": FLOATS, "--num-return-sequences": INTS,
        "--prompt-lookup-tokens": INTS, "--threads": INTS, "--stop-token-ids": st.sampled_from(["1,2", "-1", "a", "", "5"]),
        "--max-new-tokens ": st.sampled_from(["2048", "4096"])}, 30),
    "export": (["{ckpt}", "{out}"], {"--opset": st.one_of(st.sampled_from(["17", "18", "23", "24"]), INTS),
                                    "--external-data-threshold": st.one_of(st.sampled_from(["0", "4096", "2147483648"]), INTS),
                                    "--dtype": st.sampled_from(["fp32", "fp16", "fp8", ""]),
                                    "--task": st.sampled_from(["text-generation", "feature-extraction", "text-classification"])},
               4),
    "calibrate": (["{art}", "{out}", "--samples", "2", "--seq-len", "16"], {
        "--samples": SMALL, "--seq-len": st.one_of(SMALL, st.just("16")), "--percentile": FLOATS,
        "--smoothquant": FLOATS, "--seed": SEEDS, "--accuracy-level": SMALL, "--threads": SMALL}, 4),
    "compare": (["{art}", "--against", "{art}", "--windows", "1", "--seq-len", "16", "--max-new-tokens", "2", "--json"], {
        "--windows": SMALL, "--seq-len": SMALL, "--max-new-tokens": SMALL,
        "--threshold": st.sampled_from(["logits_max_abs=nan", "top1_agreement=inf", "x=1", "logits_max_abs=0.5", "="])}, 4),
    "build": (["{art}", "{out}"], {
        "--max-batch": INTS, "--max-context": INTS, "--opt-batch": INTS, "--opt-prompt": INTS, "--opt-past": INTS,
        "--workspace": FLOATS, "--optimization-level": INTS, "--verify-tokens": INTS}, 20),
    "triton-repo": (["{art}", "{out}"], {"--max-batch": INTS, "--max-queue": INTS, "--threads": INTS, "--openai-port": INTS,
                                        "--name": st.sampled_from(["m", "", "../x", "a b"]),
                                        "--kv-cache-memory": FLOATS, "--max-prefill-tokens": INTS}, 15),
    "serve": (["{missing}"], {"--max-batch": INTS, "--max-queue": INTS, "--threads": INTS, "--http-port": INTS,
                              "--grpc-port": st.sampled_from(["0", "65536", "8001", "x"]),
                              "--kv-cache-memory": FLOATS, "--max-prefill-tokens": INTS}, 15),
    "classify": (["{art}", "--text", "hi"], {"--batch-size": INTS, "--threads": INTS}, 10),
    "answer": (["{art}", "--question", "q", "--context", "c"], {"--max-answer-len": INTS, "--stride": INTS,
                                                                 "--batch-size": INTS}, 10),
}


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = stdio.StringIO(), stdio.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    export_checkpoint(default_checkpoint(), root / "art", ExportOptions(), log=lambda *_: None)
    code, out, err = _run(["generate", str(root / "art"), *PROMPT, "--max-new-tokens", "4"])
    assert code == 0, err
    return {"root": root, "ckpt": str(default_checkpoint()), "art": str(root / "art"), "missing": str(root / "missing"),
            "tokens": json.loads(out)["ids"][0]}


def _accepted(command: str, argv: list[str], out_dir: Path, stdout: str, places) -> None:
    """What exit 0 must have produced."""
    if command == "generate":
        ids = json.loads(stdout)["ids"]
        assert ids and all(all(0 <= t < 50304 for t in row) for row in ids)
    elif command == "compare":
        assert "passed" in json.loads(stdout)
    elif command in ("export", "calibrate"):
        assert _run(["verify", str(out_dir)])[0] == 0
        code, text, err = _run(["generate", str(out_dir), *PROMPT, "--max-new-tokens", "4"])
        if "feature-extraction" in argv:
            assert code == 2 and "feature-extraction export" in err
        else:
            assert code == 0, err
            if command == "export" and "fp16" not in argv:  # fp32 exports agree with the reference export
                assert json.loads(text)["ids"][0] == places["tokens"]
    elif command == "triton-repo":
        assert (out_dir / "neoxrt" / "config.pbtxt").is_file() or any(out_dir.glob("*/config.pbtxt"))


def _names(option: str) -> set[str]:
    flag = option.strip()
    return {flag, flag[2:].replace("-", "_"), flag[2:]}


def _check(places, command, picks):
    fixed, _, _ = COMMANDS[command]
    root: Path = places["root"]
    out_dir = root / f"out-{command}"
    argv = [command] + [a.format(art=places["art"], ckpt=places["ckpt"], out=out_dir, missing=places["missing"])
                        for a in fixed]
    for option, value in picks:
        argv += [option.strip(), value] if not value.startswith("-") or value == "-" else [f"{option.strip()}={value}"]
    code, stdout, stderr = _run(argv)
    try:
        if code == 0 or (command == "compare" and code == 1):
            event(f"{command}: accepted")
            _accepted(command, argv, out_dir, stdout, places)
            return
        event(f"{command}: refused")
        assert code == 2, (argv, code, stderr)
        line = one_line(stderr)
        assert line.startswith(f"neoxrt {command}: "), line
        if "argument" in line:  # argparse: it names the option it refused
            assert any(n in line for pick in picks for n in _names(pick[0])), (argv, line)
        assert not out_dir.exists() and not list(root.glob(f".{out_dir.name}*")), argv
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _fuzz_test(command: str):
    _, options, examples = COMMANDS[command]
    pick = st.sampled_from(sorted(options)).flatmap(lambda o: st.tuples(st.just(o), options[o]))

    @fuzz
    @budget(examples)
    @given(picks=st.lists(pick, min_size=1, max_size=2, unique_by=lambda p: p[0].strip()))
    def test(places, picks):
        _check(places, command, picks)

    test.__name__ = f"test_{command.replace('-', '_')}_options_give_a_result_or_one_line"
    return test


for _command in COMMANDS:  # one test per subcommand, so each reports its own examples
    globals()[f"test_{_command.replace('-', '_')}_options_give_a_result_or_one_line"] = _fuzz_test(_command)
