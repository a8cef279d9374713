"""What an engine artifact records and the runtime checks (no tensorrt import here): the TensorRT
optimization profiles of the one-graph contract -- computed from the build options and the artifact's I/O,
validated before a build, recorded in the engine manifest, used by the runtime to pick each step's
profile -- and the engine's compatibility with the machine that loads it.

    dynamic cache (past [B,H,P,D] in, present [B,H,P+S,D] out):
    profile "prompt":  sequence 1..T,  past_sequence 0,       total_sequence = sequence
    profile "decode":  sequence 1,     past_sequence 1..T-1,  total_sequence = past_sequence + 1
    static cache (`--kv-cache static`: past and present [B,H,C,D], one buffer written in place):
    profile "prompt":  sequence 1..T,  cache_sequence 1..T
    profile "decode":  sequence 1,     cache_sequence 2..T    (fixed shapes per batch: CUDA graphs replay)
    with --verify-tokens K, a third profile for speculative decoding's verify step (K guesses + 1 token
    after a past; also the draft's catch-up step of 2 tokens):
    profile "verify":  sequence 2..K+1, past_sequence 1..T-2, total = past + sequence  (dynamic)
                       sequence 2..K+1, cache_sequence 2..T                          (static)
    head graphs (`--task` other than text-generation: input_ids and attention_mask, no KV cache):
    profile "prompt":  sequence 1..T                          (the only one)
    batch 1..max_batch in all (opt: opt_batch)
"""

from __future__ import annotations

from dataclasses import dataclass

from neoxrt import contract as io
from neoxrt.errors import ArtifactError, BuildError, RuntimeShapeError

PROMPT, DECODE, VERIFY = "prompt", "decode", "verify"
ENGINE_FILE = "model.engine"


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


def axis_ranges(max_batch: int, max_context: int, opt_batch: int, opt_prompt: int, opt_past: int,
                static: bool = False, verify_tokens: int = 0, head: bool = False) -> dict:
    """{profile: {axis: Range}} for the prompt and decode profiles (of the static-cache contract if `static`),
    plus the verify profile when `verify_tokens` > 0; the one prompt profile of a head graph if `head`.

    Raises:
        BuildError: a range with min > opt or opt > max, a context too small for a decode step (or for a
            verify step of verify_tokens + 1 tokens).
    """
    if max_context < 2:
        raise BuildError(f"--max-context must be at least 2 (one prompt token and one new token), got {max_context}")
    batch = Range(1, opt_batch, max_batch)
    if head:
        return {PROMPT: {io.BATCH: batch, io.SEQUENCE: Range(1, opt_prompt, max_context)}}
    if verify_tokens and not 1 <= verify_tokens <= max_context - 2:
        raise BuildError(f"--verify-tokens must be in [1, {max_context - 2}] (a verify step of K + 1 tokens after a "
                         f"past of at least one, within --max-context {max_context}), got {verify_tokens}")
    if static:
        slots = min(max_context, max(opt_prompt, opt_past + 1))
        profiles = {PROMPT: {io.BATCH: batch, io.SEQUENCE: Range(1, opt_prompt, max_context),
                             io.CACHE_SEQUENCE: Range(1, slots, max_context)},
                    DECODE: {io.BATCH: batch, io.SEQUENCE: Range(1, 1, 1),
                             io.CACHE_SEQUENCE: Range(2, max(2, slots), max_context)}}
        if verify_tokens:
            profiles[VERIFY] = {io.BATCH: batch, io.SEQUENCE: Range(2, verify_tokens + 1, verify_tokens + 1),
                                io.CACHE_SEQUENCE: Range(3, max(3, slots), max_context)}
    else:
        profiles = {PROMPT: {io.BATCH: batch, io.SEQUENCE: Range(1, opt_prompt, max_context),
                             io.PAST_SEQUENCE: Range(0, 0, 0)},
                    DECODE: {io.BATCH: batch, io.SEQUENCE: Range(1, 1, 1),
                             io.PAST_SEQUENCE: Range(1, opt_past, max_context - 1)}}
        if verify_tokens:  # total = past + sequence; a step past max_context is refused by the runtime
            profiles[VERIFY] = {io.BATCH: batch, io.SEQUENCE: Range(2, verify_tokens + 1, verify_tokens + 1),
                                io.PAST_SEQUENCE: Range(1, min(opt_past, max_context - 2), max_context - 2)}
    for name, axes in profiles.items():
        for axis, r in axes.items():
            if not 0 <= r.min <= r.opt <= r.max:
                raise BuildError(f"profile {name}: {axis} needs min <= opt <= max, got {r.min} <= {r.opt} <= {r.max}")
        if not static:
            axes[io.TOTAL_SEQUENCE] = Range(*(s + p for s, p in zip(axes[io.SEQUENCE].as_list(),
                                                                    axes[io.PAST_SEQUENCE].as_list())))
    return profiles


def input_shapes(profiles: dict, inputs: list[dict]) -> dict:
    """{profile: {input: [min_shape, opt_shape, max_shape]}} for the artifact's inputs (manifest io.inputs)."""
    out = {}
    for name, axes in profiles.items():
        shapes = {}
        for spec in inputs:
            dims = [[], [], []]
            for d in spec["shape"]:
                for k in range(3):
                    if isinstance(d, str):
                        if d not in axes:
                            raise BuildError(f"input {spec['name']}: dynamic axis {d!r} has no range in the profiles")
                        dims[k].append(axes[d].as_list()[k])
                    else:
                        dims[k].append(int(d))
            shapes[spec["name"]] = dims
        out[name] = shapes
    return out


def check_consistent(shapes: dict, inputs: list[dict]) -> None:
    """Every named axis takes one value per (profile, min/opt/max) across all inputs.

    Raises:
        BuildError: two inputs disagree on a named axis.
    """
    for profile, table in shapes.items():
        for k, label in enumerate(("min", "opt", "max")):
            seen: dict[str, tuple[int, str]] = {}
            for spec in inputs:
                for axis, value in zip(spec["shape"], table[spec["name"]][k]):
                    if not isinstance(axis, str):
                        continue
                    if axis in seen and seen[axis][0] != value:
                        raise BuildError(f"profile {profile} ({label}): axis {axis} is {seen[axis][0]} for "
                                         f"{seen[axis][1]} but {value} for {spec['name']}")
                    seen.setdefault(axis, (value, spec["name"]))


def select_profile(profiles: dict, batch: int, sequence: int, past: int, cache: int | None = None) -> str:
    """The profile that serves a step (past = tokens already in the cache; cache = static-cache slots), or a
    RuntimeShapeError saying what the engine supports. A static-cache step of several tokens after a past (a
    prompt chunk) takes the prompt profile unless the verify profile holds it: the static contract has no past
    axis, write indices place the tokens."""
    name = PROMPT if past == 0 else DECODE if sequence == 1 else VERIFY
    if name == VERIFY and cache is not None and not (VERIFY in profiles and profiles[VERIFY][io.SEQUENCE].contains(sequence)):
        name = PROMPT
    if name not in profiles:
        raise RuntimeShapeError(f"engine has no {VERIFY} profile: a step of {sequence} tokens after a past of {past} "
                                "needs an engine built with neoxrt build --verify-tokens K")
    axes = profiles[name]
    values = ((io.BATCH, batch), (io.SEQUENCE, sequence), (io.PAST_SEQUENCE, past), (io.CACHE_SEQUENCE, cache))
    for axis, value in values:
        r = axes.get(axis)
        if r is not None and value is not None and not r.contains(value):
            raise RuntimeShapeError(f"engine profile {name} supports {axis} in [{r.min}, {r.max}], got {value}")
    return name


def ranges_from_manifest(section: dict) -> dict:
    """Inverse of `{p: {a: r.as_list()}}` as recorded in an engine manifest."""
    return {p: {a: Range(*v) for a, v in axes.items()} for p, axes in section.items()}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def check_engine_compatible(manifest: dict, here: dict) -> None:
    """Refuse an engine built for another TensorRT version or GPU, saying both.

    Args:
        here: {"tensorrt", "gpu", "compute_capability"} of this machine (tensorrt_api.facts()).
    Raises:
        ArtifactError: the engine cannot run here.
    """
    built, options = manifest["engine"], manifest.get("build_options", {})
    v_built, v_here = _version(built["tensorrt"]), _version(here["tensorrt"])
    version_ok = v_built == v_here or bool(options.get("version_compatible") and v_built[0] == v_here[0]
                                           and v_here >= v_built)
    cc_built, cc_here = _version(built["compute_capability"]), _version(here["compute_capability"])
    gpu_ok = cc_built == cc_here or (options.get("hardware_compatibility") == "ampere_plus" and cc_here >= (8, 0))
    if not (version_ok and gpu_ok):
        raise ArtifactError(
            f"engine built with TensorRT {built['tensorrt']} for {built['gpu']} (sm {built['compute_capability']}); "
            f"this machine has TensorRT {here['tensorrt']} and {here['gpu']} (sm {here['compute_capability']}): "
            "rebuild it with neoxrt build")
