"""The Triton Python backend model (copied to REPO/NAME/1/model.py by `neoxrt triton-repo`). It only wires
Triton to `neoxrt.serve.backend`; neoxrt must be importable by the backend's Python (`pip install neoxrt`)."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from neoxrt.serve.backend import TritonBackend


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / params["artifact"]
        self.backend = TritonBackend(pb_utils, config["name"], folder, max_batch=int(params["max_batch"]),
                                     max_queue=int(params["max_queue"]), threads=int(params["threads"]) or None,
                                     openai=(params.get("openai_host", "127.0.0.1"), int(params.get("openai_port", 0))),
                                     kv_cache_memory=float(params.get("kv_cache_memory", 0)),
                                     max_prefill_tokens=int(params.get("max_prefill_tokens", 256)),
                                     prefix_cache=params.get("prefix_cache", "1") == "1")

    def execute(self, requests):
        for request in requests:
            self.backend.submit(request)
        return None  # decoupled: responses go through each request's sender

    def finalize(self):
        self.backend.stop()
