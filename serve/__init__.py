"""Serving: a Triton Inference Server model repository around the runtime's in-flight batching scheduler,
and `neoxrt serve`, which runs the `tritonserver` bundled with nvidia-pytriton on it. Importing this package
imports nothing heavy (no onnx, no torch): `neoxrt serve` starts quickly."""
