import importlib.util
import os

import pytest


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Triton kernels run on CUDA where there is a GPU, else in Triton's interpreter on CPU tensors; the
# interpreter must be chosen before any kernel module is imported.
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        pass
    if has_trt and has_gpu:
        return
    reason = f"needs TensorRT and an NVIDIA GPU (tensorrt importable: {has_trt}, CUDA GPU: {has_gpu})"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
