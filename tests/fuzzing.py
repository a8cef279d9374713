"""The fuzz suite's budget: small and derandomised in CI (the same examples every run), large and random under
`make fuzz` (NEOXRT_FUZZ_SCALE multiplies every test's example count). Each test records whether an example
was accepted or refused (`hypothesis.event`), so `--hypothesis-show-statistics` counts both."""

import os

import pytest
from hypothesis import HealthCheck, settings

SCALE = int(os.environ.get("NEOXRT_FUZZ_SCALE", "1"))


def budget(examples: int):
    """Settings for a fuzz test that tries `examples` inputs in CI (x NEOXRT_FUZZ_SCALE under make fuzz)."""
    return settings(max_examples=examples * SCALE, derandomize=SCALE == 1, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def one_line(err: str) -> str:
    """The error line of a refused command: exactly one line on stderr."""
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert "Traceback" not in err, err
    return err


fuzz = pytest.mark.fuzz
