"""TFLite / LiteRT format: litert-torch conversion, ai-edge-quantizer recipes, the signature runner.

Tiny random Llama / GPT-2 / BERT folders (tests/tiny_models.py) go through exporter.loading like a
user's model; every artifact is run by the real ai-edge-litert interpreter and compared with the
PyTorch model. Conversions are shared per module (each takes ~10-20 s on 2 cores).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from exporter.errors import ExportFailedError, SlmExportError, UnsupportedRecipeError
from exporter.formats import ExportOptions, get_format
from exporter.recipes import get_recipe
from exporter.runtime.base import RUNTIME_SPEC, RunnerError, greedy_generate, open_runner
from exporter.texts import calibration_texts

MAX_CONTEXT = 64
PREFILL = (8, 16)


def options(**kw) -> ExportOptions:
    base = dict(max_context=MAX_CONTEXT, prefill_lengths=PREFILL, calibration_texts=calibration_texts(),
                calibration_samples=4)
    base.update(kw)
    return ExportOptions(**base)


@pytest.fixture(scope="module")
def build(tiny_loaded, tmp_path_factory):
    """A function (arch, recipe) -> bundle folder with model.tflite and runtime.json, built once."""
    built = {}

    def get(arch: str, recipe: str):
        if (arch, recipe) not in built:
            out = tmp_path_factory.mktemp(f"tflite-{arch}-{recipe}")
            art = get_format("tflite").build(tiny_loaded(arch), recipe, options(), out)
            (out / RUNTIME_SPEC).write_text(json.dumps(art.spec))
            built[arch, recipe] = (out, art)
        return built[arch, recipe]

    return get


def runner_for(build, arch, recipe, **kw):
    out, art = build(arch, recipe)
    return open_runner(out, json.loads((out / RUNTIME_SPEC).read_text()), verify_files=False, **kw)


def token_ids(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(3, 1000, n)]


def hf_logits(loaded, ids) -> np.ndarray:
    with torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0].numpy()


# ---------------------------------------------------------------- fp32 conversion and the runner


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_fp32_matches_pytorch_with_chunked_prefill(build, tiny_loaded, arch):
    runner = runner_for(build, arch, "fp32")
    assert runner.runtime_name == "ai-edge-litert" and runner.runtime_version
    ids = token_ids(40)  # longer than the largest prefill (16): three prefill calls 16 + 16 + 8
    got = runner.forward(ids)
    ref = hf_logits(tiny_loaded(arch), ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4
    assert runner.position == 40


def test_signatures_and_spec(build):
    out, art = build("llama", "fp32")
    spec = art.spec
    assert art.files == ["model.tflite"] and (out / "model.tflite").stat().st_size > 0
    assert spec["format"] == "tflite" and spec["max_context"] == MAX_CONTEXT
    assert spec["signatures"] == {"prefill_8": 8, "prefill_16": 16, "decode": 1}
    assert spec["inputs"] == ["tokens", "input_pos"] and spec["outputs"] == ["logits"]
    cache = ["kv_cache_k_0", "kv_cache_v_0", "kv_cache_k_1", "kv_cache_v_1"]  # LiteRT-LM's names
    assert spec["cache"] == {"inputs": cache, "outputs": cache,
                             "layout": ["batch", "kv_heads", "seq", "head_dim"], "max_context": MAX_CONTEXT}
    from ai_edge_litert.interpreter import Interpreter

    # The runtime.json contract names exactly the tensors of every signature.
    sigs = Interpreter(model_path=str(out / "model.tflite")).get_signature_list()
    assert set(sigs) == set(spec["signatures"])
    for name in sigs:
        assert set(sigs[name]["inputs"]) == {*spec["inputs"], *spec["cache"]["inputs"]}
        assert set(sigs[name]["outputs"]) == {*spec["outputs"], *spec["cache"]["outputs"]}


def test_token_by_token_decode_equals_full_forward(build, tiny_loaded):
    runner = runner_for(build, "llama", "fp32")
    ids = token_ids(20, seed=1)
    ref = hf_logits(tiny_loaded("llama"), ids)
    runner.reset()
    steps = np.concatenate([runner.forward([t]) for t in ids])
    assert np.abs(steps - ref).max() < 1e-4
    # A padded prefill (5 of 8 slots) followed by decode steps: the padding must stay invisible.
    runner.reset()
    mixed = np.concatenate([runner.forward(ids[:5])] + [runner.forward([t]) for t in ids[5:]])
    assert np.abs(mixed - ref).max() < 1e-4
    # reset() really forgets: the same prompt again gives the same logits.
    runner.reset()
    assert np.abs(runner.forward(ids) - ref).max() < 1e-4


def test_rewind_then_a_different_continuation_equals_a_fresh_prefill(build, tiny_loaded):
    runner = runner_for(build, "llama", "fp32")
    ids, other = token_ids(20, seed=1), token_ids(12, seed=2)
    runner.reset()
    runner.forward(ids)
    assert runner.rewind(8) and runner.position == 8
    want = hf_logits(tiny_loaded("llama"), ids[:8] + other)[8:]
    assert np.abs(runner.forward(other) - want).max() < 1e-4


def test_direct_and_plain_cache_paths_agree(build, tiny_loaded):
    # Switching signatures (prefill 16, decode, prefill 8, decode) exercises the direct path's
    # per-signature sync of the cache inputs; the plain SignatureRunner path copies everything.
    ids = token_ids(36, seed=6)
    cuts = [0, 20, 22, 27, 29, 36]
    ref = hf_logits(tiny_loaded("llama"), ids)
    results = []
    for direct in (True, False):
        runner = runner_for(build, "llama", "fp32", direct=direct)
        assert runner.direct is direct
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            parts += [runner.forward(ids[a:b])] if b - a > 2 else [runner.forward([t]) for t in ids[a:b]]
        results.append(np.concatenate(parts))
    assert np.array_equal(results[0], results[1])
    assert np.abs(results[0] - ref).max() < 1e-4


def test_prompt_near_the_end_of_the_context_uses_decode_steps(build, tiny_loaded):
    # With 4 slots left no prefill signature fits (a prefill writes all N slots), so the runner must
    # fall back to decode steps and still give the right logits up to the last slot.
    runner = runner_for(build, "llama", "fp32")
    ids = token_ids(MAX_CONTEXT, seed=2)
    got = np.concatenate([runner.forward(ids[:60]), runner.forward(ids[60:])])
    assert runner.position == MAX_CONTEXT
    assert np.abs(got - hf_logits(tiny_loaded("llama"), ids)).max() < 1e-4


def test_exceeding_max_context_is_a_runner_error(build):
    runner = runner_for(build, "llama", "fp32")
    with pytest.raises(RunnerError, match="exceed the exported context of 64"):
        runner.forward(token_ids(MAX_CONTEXT + 1))
    runner.reset()
    runner.forward(token_ids(60))
    with pytest.raises(RunnerError, match="65 tokens exceed"):
        runner.forward(token_ids(5))
    assert runner.position == 60  # the refused call changed nothing


def test_greedy_generation_matches_pytorch(build, tiny_loaded):
    loaded = tiny_loaded("gpt2")
    runner = runner_for(build, "gpt2", "fp32", threads=1)
    prompt = token_ids(6, seed=3)
    with torch.no_grad():
        ref = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    attention_mask=torch.ones(1, 6, dtype=torch.long), pad_token_id=0)
    ref = ref[0, 6:].tolist()
    assert greedy_generate(runner, prompt, 12) == ref[:12]


def test_latency_main_runs_the_bundle(build):
    from exporter.runtime.main import run

    out, _ = build("llama", "fp32")
    result = run(out, decode_tokens=4, repeats=1, warmup=0, threads=1, verify_files=False)
    assert result["runtime"] == "ai-edge-litert" and result["latency"]["decode_tok_s"] > 0


# ---------------------------------------------------------------- recipes


@pytest.mark.slow
@pytest.mark.parametrize("arch,recipe,max_err", [
    ("llama", "fp16", 0.05),
    ("llama", "int8-dynamic", 0.5),
    ("llama", "int8-static", 5.0),
    ("llama", "int4-weight", 3.0),
    ("gpt2", "int8-static", 5.0),
])
def test_recipe_parity_and_size(build, tiny_loaded, arch, recipe, max_err):
    runner = runner_for(build, arch, recipe)
    ids = token_ids(48, seed=4)
    got = runner.forward(ids)
    ref = hf_logits(tiny_loaded(arch), ids)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    err = float(np.abs(got - ref).max())
    assert top1 >= get_recipe(recipe).thresholds.top1_min, (top1, err)
    assert 0 < err < max_err  # 0 would mean the recipe did nothing
    # Weights must shrink: a quantized weight buffer copied per signature would undo that.
    fp32_size = (build(arch, "fp32")[0] / "model.tflite").stat().st_size
    size = (build(arch, recipe)[0] / "model.tflite").stat().st_size
    assert size < 0.85 * fp32_size, (size, fp32_size)
    assert build(arch, recipe)[1].notes


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_smoothing_keeps_the_float_function_and_leaves_the_original(tiny_loaded, arch):
    from exporter.formats.tflite_quant import smooth_model

    loaded = tiny_loaded(arch)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    smoothed, groups = smooth_model(loaded, options())
    assert groups == (6 if arch == "llama" else 4)
    ids = token_ids(32, seed=8)
    ref = hf_logits(loaded, ids)
    with torch.no_grad():
        got = smoothed(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    changed = [k for k, v in smoothed.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the weights really moved
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())


def test_int4_group_size_the_quantizer_lacks_is_refused_before_conversion(tiny_loaded, tmp_path):
    with pytest.raises(UnsupportedRecipeError, match="group size 48") as e:
        get_format("tflite").build(tiny_loaded("llama"), "int4-weight", options(group_size=48), tmp_path)
    assert "32, 64, 128, 256" in e.value.hint
    assert not list(tmp_path.iterdir())


def test_static_recipe_without_calibration_text_is_refused(tiny_loaded, tmp_path):
    with pytest.raises(SlmExportError, match="calibration"):
        get_format("tflite").build(tiny_loaded("llama"), "int8-static", options(calibration_texts=[]), tmp_path)


def test_unknown_recipe_is_refused(tiny_loaded, tmp_path):
    with pytest.raises(UnsupportedRecipeError, match="int8-full"):
        get_format("tflite").build(tiny_loaded("llama"), "int8-full", options(), tmp_path)


def test_prefill_lengths_are_fitted_to_the_context(tiny_loaded):
    from exporter.formats.tflite import causal_plan

    loaded = tiny_loaded("llama")  # 512 positions
    assert causal_plan(loaded, options(prefill_lengths=(128, 256))) == (
        64, [64], ["prefill lengths [128, 256] dropped (each must be in 2..max_context=64)",
                   "prefill signature of 64 tokens (the whole context) used instead"])
    ctx, lengths, notes = causal_plan(loaded, options(max_context=4096, prefill_lengths=(1, 32)))
    assert (ctx, lengths) == (512, [32]) and "lowered from 4096 to the model's 512" in notes[0]
    with pytest.raises(SlmExportError, match="too small"):
        causal_plan(loaded, options(max_context=1))


def test_converter_rejection_is_condensed():
    import litert_torch

    from exporter.formats.tflite import _run_converter

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x[x > 0]  # output shape depends on the values: no static TFLite shape

    converter = litert_torch.Converter().signature("f", DataDependent(), (torch.randn(8),))
    loaded = types.SimpleNamespace(config=types.SimpleNamespace(model_type="toy"))
    with pytest.raises(ExportFailedError) as e:
        _run_converter(converter, loaded)
    assert e.value.message.startswith("litert-torch could not convert this toy model: ")
    assert "\n" not in e.value.message and len(e.value.message) < 500
    assert "--format onnx" in e.value.hint


# ---------------------------------------------------------------- encoders and runtime details


def test_encoder_matches_pytorch_and_refuses_long_input(build, tiny_loaded):
    out, art = build("bert", "fp32")
    lengths = sorted(art.spec["signatures"].values())
    assert art.spec["kind"] == "encoder" and lengths[-1] == MAX_CONTEXT and len(lengths) > 1
    runner = open_runner(out, art.spec, verify_files=False)
    for n in (10, lengths[0] + 3):  # the smallest signature, and the next one up (padded)
        ids = token_ids(n, seed=5)
        with torch.no_grad():
            ref = tiny_loaded("bert").model(torch.tensor([ids])).last_hidden_state[0].numpy()
        got = runner.encode(ids)
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    with pytest.raises(RunnerError, match="exceed the exported encoder length"):
        runner.encode(token_ids(MAX_CONTEXT + 1))


@pytest.mark.slow
def test_encoder_static_int8_is_calibrated_and_close(build, tiny_loaded):
    out, art = build("bert", "int8-static")
    runner = open_runner(out, art.spec, verify_files=False)
    ids = token_ids(24, seed=7)
    with torch.no_grad():
        ref = tiny_loaded("bert").model(torch.tensor([ids])).last_hidden_state[0].numpy()
    got = runner.encode(ids)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.99 and 0 < np.abs(got - ref).max() < 0.2


def test_runtime_selection_reports_and_refuses():
    from exporter.runtime.tflite_runner import load_interpreter_class

    _, name, version = load_interpreter_class()
    assert name == "ai-edge-litert" and version[0].isdigit()
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(RunnerError, match="no TFLite runtime found"):
            load_interpreter_class("tflite-runtime")
    with pytest.raises(RunnerError, match="unknown TFLite runtime"):
        load_interpreter_class("tensorflow")


def test_integer_outputs_are_dequantized():
    from exporter.runtime.tflite_runner import dequantize, quantize

    details = {"dtype": np.int8, "quantization": (0.5, -3),
               "quantization_parameters": {"scales": np.array([0.5], np.float32),
                                           "zero_points": np.array([-3]), "quantized_dimension": 0}}
    raw = np.array([[-128, -3, 0, 127]], np.int8)
    assert np.allclose(dequantize(raw, details), [[-62.5, 0.0, 1.5, 65.0]])
    assert np.array_equal(quantize(dequantize(raw, details), details), raw)
    per_axis = {"dtype": np.int16, "quantization": (0.0, 0),
                "quantization_parameters": {"scales": np.array([1.0, 0.25], np.float32),
                                            "zero_points": np.array([0, 0]), "quantized_dimension": 1}}
    assert np.allclose(dequantize(np.array([[4, 4]], np.int16), per_axis), [[4.0, 1.0]])
