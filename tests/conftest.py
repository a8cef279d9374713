import importlib.util

import pytest


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
