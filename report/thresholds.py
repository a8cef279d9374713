"""Default pass/fail thresholds per artifact precision (override with --threshold NAME=VALUE).

| check | fp32 | fp32-screened | fp16 | int8 | int4 |
|---|---|---|---|---|---|
| logits_max_abs (forward pass)              | 1e-3 | 0.5 | 0.25 | 4.0 | 8.0 |
| top_logit_max_abs (forward pass)           | - | 1e-3 | - | - | - |
| presents_max_abs (forward pass)            | 1e-3 | 1e-3 | 0.05 | 1.0 | 2.0 |
| top1_agreement (teacher-forced), min       | 0.999 | 0.999 | 0.98 | 0.95 | 0.9 |
| perplexity_delta_pct (abs), max            | 0.01 | 0.1 | 0.5 | 2.0 | 3.0 |
| greedy_match_fraction (free-running), min  | 1.0 | 1.0 | 0.5 | 0.25 | 0.25 |

fp32-screened: an fp32 export with `--lm-head screened` (export/screen.py): the largest logit of every position
is fp32's (top_logit_max_abs), the others come from the head's INT8 copy within a proven per-position bound
(0.1 max-abs measured on the trained model), which moves perplexity slightly (+0.012 % measured).
"""

from __future__ import annotations

import math

from neoxrt.errors import NeoxrtError

# name -> (kind, value): kind "max" passes when value <= threshold, "min" when value >= threshold
DEFAULTS = {
    "fp32": {"logits_max_abs": ("max", 1e-3), "presents_max_abs": ("max", 1e-3), "top1_agreement": ("min", 0.999),
             "perplexity_delta_pct": ("max", 0.01), "greedy_match_fraction": ("min", 1.0)},
    "fp32-screened": {"logits_max_abs": ("max", 0.5), "top_logit_max_abs": ("max", 1e-3),
                      "presents_max_abs": ("max", 1e-3), "top1_agreement": ("min", 0.999),
                      "perplexity_delta_pct": ("max", 0.1), "greedy_match_fraction": ("min", 1.0)},
    "fp16": {"logits_max_abs": ("max", 0.25), "presents_max_abs": ("max", 0.05), "top1_agreement": ("min", 0.98),
             "perplexity_delta_pct": ("max", 0.5), "greedy_match_fraction": ("min", 0.5)},
    "int4": {"logits_max_abs": ("max", 8.0), "presents_max_abs": ("max", 2.0), "top1_agreement": ("min", 0.9),
             "perplexity_delta_pct": ("max", 3.0), "greedy_match_fraction": ("min", 0.25)},
    "int8": {"logits_max_abs": ("max", 4.0), "presents_max_abs": ("max", 1.0), "top1_agreement": ("min", 0.95),
             "perplexity_delta_pct": ("max", 2.0), "greedy_match_fraction": ("min", 0.25)},
}


# head artifacts (report.compare_heads): outputs over real tokens, and argmax agreement with the reference
HEAD_DEFAULTS = {
    "fp32": {"output_max_abs": ("max", 1e-3), "label_agreement": ("min", 1.0)},
    "fp16": {"output_max_abs": ("max", 0.25), "label_agreement": ("min", 0.98)},
    "int8": {"output_max_abs": ("max", 4.0), "label_agreement": ("min", 0.95)},
}


def thresholds_for(precision: str, overrides: list[str] | None = None, defaults: dict = DEFAULTS) -> dict:
    if precision not in defaults:
        raise NeoxrtError(f"no thresholds for precision {precision!r}; expected one of {', '.join(defaults)}")
    table = dict(defaults[precision])
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep or name not in table:
            raise NeoxrtError(f"--threshold expects NAME=VALUE with NAME in {', '.join(table)}, got {item!r}")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise NeoxrtError(f"--threshold {name}: expected a finite number, got {value!r}")
        table[name] = (table[name][0], number)
    return table
