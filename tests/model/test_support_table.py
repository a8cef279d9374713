"""Guard: every value in the support table is exercised by at least one test variant."""

from neox_testing import FORMAT_CASES, VARIANTS
from neoxrt.model.checkpoint import CHECKPOINT_FORMATS, DTYPES
from neoxrt.model.config import SUPPORT_TABLE, support_key


def test_every_supported_value_has_a_variant():
    covered = {field: set() for field in SUPPORT_TABLE}
    for config in VARIANTS.values():
        for field, value in support_key(config).items():
            covered[field].add(value)
    missing = {f: sorted(set(vals) - covered[f], key=str) for f, vals in SUPPORT_TABLE.items()}
    missing = {f: v for f, v in missing.items() if v}
    assert not missing, f"support-table values with no test variant: {missing}"


def test_every_checkpoint_format_and_dtype_is_tested():
    assert {fmt for fmt, _ in FORMAT_CASES} == set(CHECKPOINT_FORMATS)
    assert {dtype for _, dtype in FORMAT_CASES} == set(DTYPES)
