"""Predictive text in the browser: a static page running the ONNX bundle with onnxruntime-web."""
