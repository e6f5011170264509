"""ExecuTorch .pte export: every recipe lowers to XNNPACK and runs in ExecuTorch's runtime.

Tiny random Llama / GPT-2 / BERT folders come from conftest (``tiny_loaded``). Lowering is slow
(20-100 s per toy model on 2 shared cores), so each (arch, recipe) program is built once per
module and shared by the tests that read it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporter.errors import ExportFailedError, UnsupportedRecipeError
from exporter.formats import ExportOptions, get_format
from exporter.parity import evaluate, logit_metrics, reference_logits
from exporter.recipes import get_recipe
from exporter.runtime.base import RunnerError, open_runner
from exporter.texts import calibration_texts

MAX_CONTEXT = 128

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tiny_loaded, tmp_path_factory):
    """(arch, recipe) -> (loaded, bundle_dir, artifact), each built once for the module."""
    cache: dict = {}

    def get(arch: str, recipe: str):
        if (arch, recipe) not in cache:
            loaded = tiny_loaded(arch)
            out = tmp_path_factory.mktemp(f"pte-{arch}-{recipe}")
            options = ExportOptions(max_context=MAX_CONTEXT, calibration_texts=calibration_texts(),
                                    calibration_samples=8)
            art = get_format("pte").build(loaded, recipe, options, out)
            (out / "runtime.json").write_text(json.dumps(art.spec))
            cache[(arch, recipe)] = (loaded, out, art)
        return cache[(arch, recipe)]

    return get


def _runner(bundle):
    _, out, art = bundle
    return open_runner(out, art.spec, verify_files=False)


# Expected max |logit error| per recipe on the tiny models (measured: fp32 ~3e-7, 8da4w ~0.1).
MAX_ERR = {"fp32": 1e-4, "fp16": 0.5, "int8-dynamic": 0.5, "int8-static": 2.0, "int4-weight": 1.0}


@pytest.mark.parametrize("arch,recipe", [
    ("llama", "fp32"), ("gpt2", "fp32"), ("llama", "int4-weight"), ("llama", "fp16"),
    ("gpt2", "int8-dynamic"), ("llama", "int8-static"), ("gpt2", "fp16"),
])
def test_recipe_builds_and_matches_hf(built, arch, recipe):
    loaded, out, art = built(arch, recipe)
    assert (out / "model.pte").stat().st_size > 0 and art.files == ["model.pte"]
    runner = _runner(built(arch, recipe))
    assert runner.runtime_name == "executorch" and runner.runtime_version not in ("", "unknown")
    result = evaluate(loaded, runner, recipe, window=64, max_windows=2, greedy_tokens=16)
    assert result["passed"], result["failures"]
    assert result["metrics"]["max_abs_err"] < MAX_ERR[recipe], result["metrics"]


def test_constant_methods_for_executorch_llm_runner(built):
    _, _, art = built("llama", "fp32")
    runner = _runner(built("llama", "fp32"))
    # Names from executorch/extension/llm/runner/constants.h.
    assert runner.constant("get_max_seq_len") == MAX_CONTEXT - 1
    assert runner.constant("get_max_context_len") == MAX_CONTEXT
    assert runner.constant("get_vocab_size") == 1000
    assert runner.constant("get_bos_id") == 1
    assert runner.constant("get_eos_ids") == [2]
    assert runner.constant("use_kv_cache") is True
    assert runner.constant("enable_dynamic_shape") is True
    assert runner.constant("use_sdpa_with_kv_cache") is True
    assert art.spec["inputs"] == ["tokens", "input_pos"] and art.spec["max_context"] == MAX_CONTEXT


def _portable_operators(bundle) -> set[str]:
    """The kernels a lowered program calls outside its XNNPACK delegates."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary((bundle[1] / "model.pte").read_bytes())
    return {op.name for op in getattr(program, "program", program).execution_plan[0].operators}


def test_llama_attention_runs_in_executorch_custom_sdpa_kernel(built):
    """Llama-family attention becomes ExecuTorch's llama::custom_sdpa op (outside the XNNPACK
    delegates), GPT-2's stays transformers' own; the bundle tells the runner which kernels to load."""
    llama = built("llama", "fp32")
    assert "llama::custom_sdpa" in _portable_operators(llama) and llama[2].spec["custom_ops"]
    gpt2 = built("gpt2", "fp32")
    assert not any(op.startswith("llama::") for op in _portable_operators(gpt2)) and gpt2[2].spec["custom_ops"] == []


def test_kv_cache_decode_equals_full_forward(built):
    loaded, _, _ = built("llama", "fp32")
    runner = _runner(built("llama", "fp32"))
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 1000, 40)]
    ref = reference_logits(loaded.model, ids)
    runner.reset()
    step = np.concatenate([runner.forward([t]) for t in ids])
    assert np.abs(step - ref).max() < 1e-4
    # Chunked prefill (as ExecuTorch's runner does past max_seq_len) continues the same cache.
    runner.reset()
    runner.max_seq_len = 16
    chunked = np.concatenate([runner.forward(ids[:35]), runner.forward(ids[35:])])
    assert np.abs(chunked - ref).max() < 1e-4
    # reset() really starts over: a second, different sequence is not polluted by the first.
    runner.max_seq_len = MAX_CONTEXT - 1
    other = ids[::-1][:20]
    runner.reset()
    np.testing.assert_allclose(runner.forward(other), reference_logits(loaded.model, other), atol=1e-4)


def test_rewind_then_a_different_continuation_equals_a_fresh_prefill(built):
    loaded, _, _ = built("llama", "fp32")
    runner = _runner(built("llama", "fp32"))
    rng = np.random.default_rng(3)
    ids, other = [int(i) for i in rng.integers(3, 1000, 30)], [int(i) for i in rng.integers(3, 1000, 10)]
    runner.reset()
    runner.forward(ids)
    assert runner.rewind(12) and runner.position == 12
    want = reference_logits(loaded.model, ids[:12] + other)[12:]
    assert np.abs(runner.forward(other) - want).max() < 1e-4
    with pytest.raises(RunnerError, match="rewind"):
        runner.rewind(100)


def test_runner_refuses_context_overflow(built):
    runner = _runner(built("llama", "fp32"))
    runner.reset()
    runner.forward(list(range(3, 3 + MAX_CONTEXT - 1)))
    with pytest.raises(RunnerError, match="exceed"):
        runner.forward([5, 6])
    runner.reset()
    assert runner.forward([5]).shape == (1, 1000)


def test_int4_weight_keeps_the_sensitive_layers_at_8_bits():
    """int4-weight: 4-bit grouped weights, but 8-bit per-channel for lm_head and the MLP down projection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporter.formats import pte_quant

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      num_hidden_layers=1, vocab_size=100, tie_word_embeddings=False)
    from exporter.families import FAMILIES

    model, source = pte_quant.prepare_eager(LlamaForCausalLM(cfg).eval(), "int4-weight", 32, FAMILIES.get("llama"))
    assert source is None  # random float weights: no source grid to carry
    bits = {name: (m.weight.target_dtype, tuple(m.weight.block_size)) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}
    assert bits.pop("lm_head") == (torch.int8, (1, 64))
    assert bits.pop("model.layers.0.mlp.down_proj") == (torch.int8, (1, 128))
    assert set(bits.values()) == {(torch.int4, (1, 32))} and len(bits) == 6


def _weight_only_int4(model, recipe, group_size, family=None):
    """Test-only: torchao IntxWeightOnlyConfig, which XNNPACK lowers to garbage without an error."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)))
    return model, None


def test_parity_gate_catches_silent_garbage(built, tiny_loaded, tmp_path, monkeypatch):
    """Lower the known-garbage recipe on purpose: the int4-weight thresholds must reject it."""
    from exporter.formats import pte_quant

    loaded = tiny_loaded("llama")
    monkeypatch.setattr(pte_quant, "prepare_eager", _weight_only_int4)
    art = get_format("pte").build(loaded, "int4-weight", ExportOptions(max_context=MAX_CONTEXT), tmp_path)
    monkeypatch.undo()
    garbage = open_runner(tmp_path, art.spec, verify_files=False)
    ids = loaded.tokenizer(" ".join(calibration_texts()[:20]), add_special_tokens=False)["input_ids"][:64]
    assert len(ids) == 64
    ref = reference_logits(loaded.model, ids)
    garbage.reset()
    bad = logit_metrics(ref, garbage.forward(ids), np.asarray(ids[1:]))
    thresholds = get_recipe("int4-weight").thresholds
    assert thresholds.failures(bad), bad  # the gate says no
    # ... while the real 8da4w program of the same model passes the same gate on the same tokens.
    good_runner = _runner(built("llama", "int4-weight"))
    good_runner.reset()
    good = logit_metrics(ref, good_runner.forward(ids), np.asarray(ids[1:]))
    assert not thresholds.failures(good), good
    assert bad["max_abs_err"] > 10 * good["max_abs_err"]


def test_encoder_export_dynamic_length(tiny_loaded, tmp_path):
    loaded = tiny_loaded("bert")
    art = get_format("pte").build(loaded, "fp32", ExportOptions(max_context=64), tmp_path)
    assert art.spec["kind"] == "encoder" and art.spec["max_context"] == 64
    runner = open_runner(tmp_path, art.spec, verify_files=False)
    for n in (5, 33):
        ids = [int(i) for i in np.random.default_rng(n).integers(3, 1000, n)]
        with torch.no_grad():
            ref = loaded.model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(runner.encode(ids), ref, atol=1e-4)
    with pytest.raises(RunnerError):
        runner.encode(list(range(3, 70)))


# ---------------------------------------------------------------- bad input (no lowering needed)


def test_context_longer_than_model_positions_is_refused(tiny_loaded, tmp_path):
    with pytest.raises(UnsupportedRecipeError, match="exceeds the 512 positions"):
        get_format("pte").build(tiny_loaded("gpt2"), "fp32", ExportOptions(max_context=4096), tmp_path)
    assert not (tmp_path / "model.pte").exists()


def test_static_needs_calibration_and_group_size_is_checked(tiny_loaded, tmp_path):
    with pytest.raises(UnsupportedRecipeError, match="calibration"):
        get_format("pte").build(tiny_loaded("llama"), "int8-static", ExportOptions(max_context=64), tmp_path)
    with pytest.raises(UnsupportedRecipeError, match="group size"):
        get_format("pte").build(tiny_loaded("llama"), "int4-weight", ExportOptions(max_context=64, group_size=48),
                                tmp_path)
    with pytest.raises(UnsupportedRecipeError, match="cannot do recipe"):
        get_format("pte").build(tiny_loaded("llama"), "int8-full", ExportOptions(max_context=64), tmp_path)


def test_converter_errors_become_one_condensed_message():
    from exporter.formats.pte import _guard

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow: torch.export refuses it

    with pytest.raises(ExportFailedError) as err:
        _guard(lambda: torch.export.export(DataDependent(), (torch.ones(3),), strict=True), "torch.export", "fp32")
    message = str(err.value).splitlines()[0]
    assert message.startswith("ExecuTorch torch.export failed for recipe fp32: ") and len(message) < 450
    assert "Traceback" not in str(err.value)


# ---------------------------------------------------------------- lowering-time rewrites


def test_linear_mean_rmsnorm_equals_transformers_rmsnorm():
    """The XNNPACK-friendly norm is the same function as LlamaRMSNorm, in float32 and float16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from exporter.formats.pte_layers import LinearMeanRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 7, 96) * 30
    np.testing.assert_allclose(LinearMeanRMSNorm(norm)(x).detach(), norm(x).detach(), rtol=1e-5, atol=1e-5)
    half = LlamaRMSNorm(96, eps=1e-5).half()
    out = LinearMeanRMSNorm(half)(x.half())
    assert out.dtype == torch.float16
    np.testing.assert_allclose(out.detach().float(), half(x.half()).detach().float(), rtol=2e-3, atol=2e-3)


def test_rotate_half_as_linear_is_exact_and_scoped():
    from transformers.models.llama import modeling_llama

    from exporter.formats.pte_layers import rotate_half_as_linear, rotation_matrix

    x = torch.randn(1, 3, 5, 16)
    assert torch.equal(x @ rotation_matrix(16), modeling_llama.rotate_half(x))
    cfg = modeling_llama.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=32, num_hidden_layers=1, vocab_size=50)
    model = modeling_llama.LlamaForCausalLM(cfg).eval()
    original = modeling_llama.rotate_half
    with rotate_half_as_linear(model):
        assert modeling_llama.rotate_half is not original
        assert torch.equal(modeling_llama.rotate_half(x), original(x))
    assert modeling_llama.rotate_half is original


def test_static_view_shapes_keeps_the_reshape():
    """view(b, seq, -1, d) with a symbolic seq becomes view(b, -1, heads, d): same results at every length."""
    from exporter.formats.pte_passes import static_view_shapes

    class Heads(torch.nn.Module):
        def forward(self, x):
            b, s, _ = x.shape
            return x.view(b, s, -1, 8).transpose(1, 2) * 2

    seq = torch.export.Dim("seq", min=1, max=64)
    ep = torch.export.export(Heads(), (torch.randn(1, 5, 32),), dynamic_shapes=({1: seq},), strict=True)
    assert static_view_shapes(ep) == 1
    shapes = [n.args[1] for n in ep.graph.nodes if n.op == "call_function" and "view" in str(n.target)]
    assert shapes == [[1, -1, 4, 8]]
    for n in (1, 7, 64):
        x = torch.randn(1, n, 32)
        assert torch.equal(ep.module()(x), Heads()(x))


def test_llama_layers_lower_into_the_delegates(built):
    """No norm mean, rotary slice or attention reshape is left outside XNNPACK in the Llama program."""
    operators = _portable_operators(built("llama", "fp32"))
    assert not operators & {"aten::mean", "aten::slice_copy", "aten::view_copy"}, operators


def test_pass_filter_keeps_passes_whose_operators_are_present():
    import executorch.exir.passes as exir_passes
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.exir.dialects._ops import ops as exir_ops

    from exporter.formats.pte_passes import PASS_CONDITIONS, pass_applies, pass_operators

    every = XNNPACKPassManager.__new__(XNNPACKPassManager)
    XNNPACKPassManager.__init__(every, None)
    names = {p.__name__ for p in every.passes} | set(dir(exir_passes))
    # Every filtered pass still exists in this ExecuTorch under that name.
    assert set(pass_operators()) | set(PASS_CONDITIONS) <= names

    def graph_of(op):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        graph.output(graph.call_function(op, (x, x)))
        return torch.fx.GraphModule(torch.nn.Module(), graph)

    linear = graph_of(exir_ops.edge.aten.linear.default)
    assert pass_applies("ConstPropPass", linear)  # not listed: always runs
    assert not any(pass_applies(name, linear) for name in (
        "FuseBatchNormPass", "DecomposeBatchNorm", "Conv1dUnsqueezePass", "PReLUReshapePass",
        "ConvertToLinearPass", "DecomposeConcatenate", "MemoryFormatOpsPass", "PropagateCustomMetaPass",
        "LegalizePortableDimOrderPass", "ReplaceBrokenOpsWithFunctionalOpsPass", "ChannelsLastTaggedReshapePass"))
    conv = graph_of(exir_ops.edge.aten.convolution.default)
    assert pass_applies("Conv1dUnsqueezePass", conv) and pass_applies("ChannelsLastTaggedReshapePass", conv)
    assert pass_applies("ConvertToLinearPass", graph_of(exir_ops.edge.aten.addmm.default))
    assert pass_applies("MemoryFormatOpsPass", graph_of(exir_ops.edge.aten._to_copy.default))
    assert pass_applies("NormalizeTransposePass", graph_of(torch.ops.aten.t.default))
    assert not pass_applies("ReplaceBrokenOpsWithFunctionalOpsPass", graph_of(torch.ops.aten.view_copy.default))
    assert pass_applies("ReplaceBrokenOpsWithFunctionalOpsPass", graph_of(torch.ops.aten.view.default))
    next(iter(linear.graph.nodes)).meta["custom"] = {"tag": 1}
    assert pass_applies("PropagateCustomMetaPass", linear)


def test_pattern_pass_operators_match_executorch_patterns():
    """The two pattern passes are skipped on an operator their pattern graphs cannot match without."""
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    from exporter.formats.pte_passes import PASS_OPERATORS, graph_operators

    for pass_name, graphs in (("ConvertToUpsampleBilinear2d", bilinear_2d.get_graphs()),
                              ("ConvertToSDPAPass", sdpa.get_graphs())):
        for pattern in graphs:
            assert PASS_OPERATORS[pass_name] <= graph_operators(pattern), pass_name


def test_lowering_shortcuts_leave_the_program_byte_identical(tiny_loaded, tmp_path, monkeypatch):
    """Lowering with every ExecuTorch pass and three decompositions, and with only the passes that
    apply and one decomposition less, writes the same .pte."""
    import contextlib

    from exporter.formats import pte_passes

    decompositions = []
    run_decompositions = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: decompositions.append(1) or run_decompositions(self, *a, **k))
    loaded = tiny_loaded("llama")
    options = ExportOptions(max_context=64)
    get_format("pte").build(loaded, "int4-weight", options, tmp_path / "shortcuts")
    fast = len(decompositions)
    monkeypatch.setattr(pte_passes, "skip_inapplicable_passes", contextlib.nullcontext)
    monkeypatch.setattr(pte_passes, "decompose_once", lambda partitioner: partitioner)
    decompositions.clear()
    get_format("pte").build(loaded, "int4-weight", options, tmp_path / "all")
    assert fast == len(decompositions) - 1
    assert (tmp_path / "shortcuts" / "model.pte").read_bytes() == (tmp_path / "all" / "model.pte").read_bytes()
