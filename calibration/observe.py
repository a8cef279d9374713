"""Activation statistics from the fp32 graph on ONNX Runtime, streamed window batch by window batch so
memory stays flat: per-channel max |x| (pass 1) and, for percentile/entropy, |x| histograms (pass 2)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from neoxrt import contract as io
from neoxrt.calibration.ranges import BINS
from neoxrt.progress import Progress


class StatsSession:
    """The graph with the chosen activations added as outputs, on ONNX Runtime (CPU)."""

    def __init__(self, model: onnx.ModelProto, activations: list[str], threads: int | None = None,
                 weights_dir: Path | None = None, elem_type: int = onnx.TensorProto.FLOAT):
        """Args:
            weights_dir: the source folder when `model` was loaded without its external data: the probe then
                reads the source's model.onnx.data in place (a link beside it), nothing is copied.
            elem_type: the activations' ONNX type (FLOAT16 in an fp16 export).
        """
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        for name in activations:
            if name not in known:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only (TensorScatter warns on every run of a static graph not in place)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if threads:
            options.intra_op_num_threads = threads
        # beside the source (same file system): its weights file is hard-linked in, not copied (ONNX Runtime
        # refuses external data that resolves outside the model's folder, so no symlink)
        where = Path(weights_dir).resolve().parent if weights_dir is not None else None
        with tempfile.TemporaryDirectory(prefix=".neoxrt-calib-", dir=where) as tmp:
            path = Path(tmp) / io.MODEL_FILE  # external data: works past protobuf's 2 GB
            if weights_dir is not None:
                if (Path(weights_dir) / io.WEIGHTS_FILE).is_file():
                    os.link((Path(weights_dir) / io.WEIGHTS_FILE).resolve(), Path(tmp) / io.WEIGHTS_FILE)
                onnx.save_model(probe, str(path))
            else:
                onnx.save_model(probe, str(path), save_as_external_data=True, location=io.WEIGHTS_FILE,
                                size_threshold=1024)
            self.sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.activations = list(activations)
        past = next((i for i in self.sess.get_inputs() if i.name == io.past_key(0)), None)
        self.layers = sum(1 for i in self.sess.get_inputs() if i.name.endswith(".key"))  # 0: a head graph
        if past is not None:
            self.heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
            self.kv_dtype = "float16" if past.type == "tensor(float16)" else "float32"
        self.static = any(i.name == io.WRITE_INDICES for i in self.sess.get_inputs())

    def batches(self, windows: np.ndarray, batch: int, label: str, progress: bool):
        bar = Progress(len(windows), label, progress)
        for start in range(0, len(windows), batch):
            ids = windows[start: start + batch]
            if self.layers:
                pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
                feeds = io.prompt_feeds(ids, np.ones_like(ids), pos, self.layers, self.heads, self.head_dim,
                                        self.kv_dtype, self.static)
            else:  # a head graph: no cache, positions computed in the graph
                feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: np.ones_like(ids)}
            yield dict(zip(self.activations, self.sess.run(self.activations, feeds)))
            bar.update(min(start + batch, len(windows)))


def channel_absmax(stats: StatsSession, windows: np.ndarray, batch: int, progress: bool = True) -> dict[str, np.ndarray]:
    """{activation: max |x| per channel (last axis)} over all windows."""
    out: dict[str, np.ndarray] = {}
    for values in stats.batches(windows, batch, "calibrate: ranges", progress):
        for name, x in values.items():
            m = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def abs_histograms(stats: StatsSession, windows: np.ndarray, batch: int, absmax: dict[str, float],
                   scales: dict[str, np.ndarray] | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """{activation: histogram of |x / s| in BINS bins over [0, absmax]} (s: SmoothQuant factors, if any)."""
    scales = scales or {}
    out = {name: np.zeros(BINS, np.int64) for name in stats.activations}
    for values in stats.batches(windows, batch, "calibrate: histograms", progress):
        for name, x in values.items():
            a = np.abs(x / scales[name]) if name in scales else np.abs(x)
            top = absmax[name] if absmax[name] > 0 else 1.0
            out[name] += np.histogram(a, bins=BINS, range=(0.0, top))[0]
    return out
