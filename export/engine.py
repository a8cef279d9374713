"""`neoxrt build`: an export or INT8 artifact -> a TensorRT engine artifact (model.engine + manifest.json).

    artifact --tensorrt_ready--> graph TensorRT imports --check_tensorrt_support--> profiles (prompt, decode
        [, verify with --verify-tokens]; a head graph: prompt only, batch x sequence)
        --TensorRT (strongly typed; precision from the graph)--> model.engine, manifest.json

Everything before the TensorRT call runs (and is tested) on CPU; the call itself lives in
neoxrt.tensorrt_api. The manifest records TensorRT version, GPU and compute capability, the profiles, the
build options and the source model's hash; `neoxrt.engine_meta.check_engine_compatible` refuses an engine
made elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from neoxrt import contract as io
from neoxrt import engine_meta as prof
from neoxrt.engine_meta import ENGINE_FILE
from neoxrt.errors import ArtifactError, BuildError
from neoxrt.export.tensorrt_graph import check_tensorrt_support, tensorrt_ready
from neoxrt.fsutil import atomic_dir
from neoxrt.manifest import precision_of, read_manifest, write_manifest

STAGE = "build"
HARDWARE_COMPATIBILITY = ("none", "ampere_plus")
DEFAULT_MAX_CONTEXT = 2048  # or the model's max_position_embeddings when smaller
AMPERE = (8, 0)  # what --hardware-compatibility ampere_plus engines (and their plugin PTX) target


@dataclass(frozen=True)
class BuildOptions:
    """Args:
        max_batch, max_context: the largest batch and total tokens (prompt + generated) the engine serves;
            max_context None: min(2048, the model's max_position_embeddings), set by `for_model`.
        opt_batch, opt_prompt, opt_past: the shapes TensorRT tunes for (default: max_batch, 128 / max, half),
            derived from max_context once it is known.
        timing_cache: file to read and update (tactic timings; rebuilds take seconds instead of minutes).
        workspace_gib: TensorRT workspace limit.
        optimization_level: builder optimisation level 0..5 (TensorRT's default is 3).
        hardware_compatibility: none, or ampere_plus (one engine for every Ampere-or-newer GPU).
        version_compatible: an engine later TensorRT versions of the same major can run.
        plugin: build a plugin-flavour export with neoxrt's Triton attention plugin.
        verify_tokens: K > 0 adds the `verify` profile (K + 1 tokens after a past): speculative decoding's
            verify step on this engine as the target, its catch-up step as a draft.
    """

    max_batch: int = 8
    max_context: int | None = None
    opt_batch: int | None = None
    opt_prompt: int | None = None
    opt_past: int | None = None
    timing_cache: Path | None = None
    workspace_gib: float = 4.0
    optimization_level: int = 3
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    plugin: bool = False
    verify_tokens: int = 0

    def __post_init__(self):
        if self.verify_tokens < 0:
            raise BuildError(f"--verify-tokens must be at least 0, got {self.verify_tokens}")
        if self.max_batch < 1:
            raise BuildError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.optimization_level <= 5:
            raise BuildError(f"--optimization-level must be in 0..5, got {self.optimization_level}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise BuildError(f"--hardware-compatibility must be one of {', '.join(HARDWARE_COMPATIBILITY)}, "
                             f"got {self.hardware_compatibility!r}")
        if not (isinstance(self.workspace_gib, (int, float)) and math.isfinite(self.workspace_gib) and self.workspace_gib > 0):
            raise BuildError(f"--workspace must be a finite number > 0 (GiB), got {self.workspace_gib}")
        for name in ("max_context", "opt_batch", "opt_prompt", "opt_past"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise BuildError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.opt_batch is None:
            object.__setattr__(self, "opt_batch", self.max_batch)
        if self.max_context is None:
            return
        defaults = {"opt_prompt": min(128, self.max_context), "opt_past": max(1, self.max_context // 2)}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def for_model(self, max_positions: int) -> BuildOptions:
        """These options with every default that depends on the model derived from it.

        Raises:
            BuildError: an explicit --max-context past the model's max_position_embeddings.
        """
        if self.max_context is None:
            return dataclasses.replace(self, max_context=min(DEFAULT_MAX_CONTEXT, max_positions))
        if self.max_context > max_positions:
            raise BuildError(f"--max-context {self.max_context} is past the model's max_position_embeddings {max_positions}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return d


def engine_profiles(manifest: dict, options: BuildOptions) -> tuple[dict, dict]:
    """({profile: {axis: [min, opt, max]}}, {profile: {input: [min, opt, max shapes]}}), validated, for the
    dynamic-cache contract (past_sequence / total_sequence axes), the static one (cache_sequence) or a head
    graph (batch x sequence, one profile).

    Raises:
        BuildError: bad ranges; --verify-tokens on a head graph or on a graph returning the last logits only.
    """
    options = options.for_model(int(manifest["config"]["max_position_embeddings"]))
    export_options = manifest.get("export_options", {})
    static = export_options.get("kv_cache") == "static"
    task = manifest.get("task", io.TEXT_GENERATION)
    head = task != io.TEXT_GENERATION
    if options.verify_tokens and head:
        raise BuildError(f"--verify-tokens needs a text-generation artifact (a KV cache to verify after); this is a "
                         f"{task} export")
    if options.verify_tokens and export_options.get("logits") == "last":
        raise BuildError("--verify-tokens needs every position's logits: export with --logits all (this artifact "
                         "returns the last position's only)")
    ranges = prof.axis_ranges(options.max_batch, options.max_context, options.opt_batch, options.opt_prompt,
                              options.opt_past, static=static, verify_tokens=options.verify_tokens, head=head)
    inputs = manifest["io"]["inputs"]
    shapes = prof.input_shapes(ranges, inputs)
    prof.check_consistent(shapes, inputs)
    axes = {p: {a: r.as_list() for a, r in table.items()} for p, table in ranges.items()}
    return axes, shapes


def prepare_graph(src: Path, manifest: dict, options: BuildOptions) -> onnx.ModelProto:
    """The source graph in the form TensorRT imports, checked against the support table.

    Raises:
        BuildError: a plugin graph without --plugin (or the reverse), or ops TensorRT would refuse.
    """
    is_plugin = bool(manifest.get("plugin"))
    if is_plugin != options.plugin:
        raise BuildError(f"artifact {src} {'has' if is_plugin else 'has no'} plugin attention nodes; "
                         f"{'pass --plugin' if is_plugin else '--plugin needs an export made with --attention plugin'}")
    model = tensorrt_ready(onnx.load(str(src / io.MODEL_FILE)))
    plugins = set()
    if is_plugin:
        plugins.add((manifest["plugin"]["domain"], manifest["plugin"]["op_type"]))
    problems = check_tensorrt_support(model, plugins)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BuildError(f"TensorRT would refuse {src}: {'; '.join(problems[:3])}{more}")
    return model


def build_engine_artifact(src, out, options: BuildOptions, force: bool = False, log=print) -> dict:
    """Build `src` (export or calibrate artifact) into the engine artifact `out`; returns the manifest.

    Raises:
        BuildError: bad options, an unusable source, TensorRT or a GPU missing, a failed build.
    """
    from neoxrt import tensorrt_api

    src, out = Path(src), Path(out)
    try:
        manifest = read_manifest(src, ("export", "calibrate"))
    except ArtifactError as exc:
        raise BuildError(f"source artifact: {exc}") from None
    options = options.for_model(int(manifest["config"]["max_position_embeddings"]))
    axes, shapes = engine_profiles(manifest, options)
    model = prepare_graph(src, manifest, options)
    facts = tensorrt_api.facts()  # TensorRT and a GPU, or one line saying which is missing
    if options.plugin:
        here = tuple(int(p) for p in facts["compute_capability"].split("."))
        target = AMPERE if options.hardware_compatibility == "ampere_plus" else here
        tensorrt_api.register_attention_plugin(target, tensorrt_api.driver_ptx_isa())
    start = time.perf_counter()
    with atomic_dir(out, force, BuildError) as tmp:
        with tempfile.TemporaryDirectory(prefix="neoxrt-trt-") as work:
            graph = Path(work) / io.MODEL_FILE
            onnx.save_model(model, str(graph), save_as_external_data=True, location=io.WEIGHTS_FILE, size_threshold=1024)
            del model
            engine, timing = tensorrt_api.build_serialized_engine(str(graph), shapes, options, log)
        (tmp / ENGINE_FILE).write_bytes(engine)
        if timing is not None and options.timing_cache:
            options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            options.timing_cache.write_bytes(timing)
        files = [ENGINE_FILE]
        for name in io.COMPANION_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                files.append(name)
        body = {k: manifest[k] for k in ("config", "io", "checkpoint_sha256", "export_options", "plugin", "task",
                                         "id2label") if k in manifest}
        body.update(source={"artifact": str(src.resolve()), "stage": manifest["stage"],
                            "model_sha256": manifest["files"][io.MODEL_FILE]},
                    precision=precision_of(manifest), build_options=options.to_dict(), profiles=axes,
                    profile_order=list(axes), engine=facts)
        result = write_manifest(tmp, STAGE, body, files)
    log(f"wrote {out} ({body['precision']} engine, TensorRT {facts['tensorrt']}, {facts['gpu']}) "
        f"in {time.perf_counter() - start:.0f}s")
    return result
