"""The machine slm-export runs on: every format, measured in a local process."""

from targets import Budgets, Target, register

register(Target(
    name="host",
    description="this machine (local process): every format, fp32 by default",
    formats=("onnx", "pte", "tflite"),
    default_recipes={"onnx": "fp32", "pte": "fp32", "tflite": "fp32"},
    transport="local",
    budgets=Budgets(),
))
