"""Raspberry Pi 4 / 5 (Cortex-A72 / A76, 4-8 GB): onnxruntime int8-dynamic, LiteRT as alternative."""

from targets import Budgets, Target, register

register(Target(
    name="rpi",
    description="Raspberry Pi 4/5 over ssh: ONNX int8-dynamic (onnxruntime), tflite alternative",
    formats=("onnx", "tflite"),
    default_recipes={"onnx": "int8-dynamic", "tflite": "int8-dynamic"},
    transport="ssh",
    # SmolLM2-135M int8 on a Pi 5: budgets for a usable keyboard / assistant, not measured limits.
    budgets=Budgets(decode_tok_s_min=10.0, ttft_ms_max=2000.0, peak_rss_mb_max=1024.0),
))
