"""A quantized source's 4-bit blocks carried into int4 artifacts (exporter/source_grid.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter import source_grid
from exporter.formats import ExportOptions, get_format
from exporter.parity import logit_metrics, reference_logits
from exporter.runtime.base import open_runner
from exporter.texts import eval_text
from tiny_models import as_gguf_blocks, make_model_dir

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def gguf_like(tmp_path_factory):
    """arch, {role: levels} -> LoadedModel of a tiny model whose linears lie on GGUF-like blocks."""
    from exporter.loading import load_model

    made = {}

    def get(arch: str, levels: dict):
        key = (arch, tuple(sorted(levels.items())))
        if key not in made:
            folder = make_model_dir(arch, tmp_path_factory.mktemp(f"gguf-{arch}"), source_levels=levels)
            made[key] = load_model(str(folder))
        return made[key]

    return get


def test_grid_rebuilds_q4_blocks_exactly_and_refuses_float_weights():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    src = as_gguf_blocks(w, 16)
    grid = source_grid.find_grid(src, 32)
    assert grid is not None
    assert torch.equal(grid.weight(), src)  # max |w - w_src| == 0
    assert grid.codes.min() == -8 and grid.codes.max() <= 7
    assert (grid.codes.unflatten(-1, (-1, 32)).amin(-1) == -8).all()  # so a symmetric quantizer finds d
    assert source_grid.find_grid(w, 32) is None  # float weights
    assert source_grid.find_grid(as_gguf_blocks(w, 32), 32) is None  # a 5-bit source is not 4-bit
    assert source_grid.source_levels(as_gguf_blocks(w, 32), 32) == 32
    assert source_grid.find_grid(src, 64) is None  # blocks of another size


def test_grid_linear_computes_the_source_layer():
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(as_gguf_blocks(linear.weight, 16))
    carried = source_grid.GridLinear(linear, source_grid.find_grid(linear.weight, 32))
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(carried(x), linear(x), rtol=1e-5, atol=1e-5)


def _pte_carried_weights(model) -> dict[str, torch.Tensor]:
    """module path -> the weights an 8da4w GridLinear stands for (torchao's dequantized codes + offsets)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, source_grid.GridLinear):
            main = m.weight.dequantize().float()
            offsets = m.block_offsets.offsets.repeat_interleave(m.group, -1)
            out[name] = main + offsets
    return out


def test_pte_plan_carries_the_source_blocks_exactly(gguf_like):
    """8da4w of a Q4_1-like source: torchao holds the very codes and scales (max |w - w_src| == 0); the
    MLP down projection, 8-bit for a float source, is carried at 4 bits too."""
    from exporter.formats import pte_quant

    loaded = gguf_like("llama", {"*": 16})
    source = {n: m.weight.detach().clone() for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)}
    import copy

    model, plan = pte_quant.prepare_eager(copy.deepcopy(loaded.model), "int4-weight", 32, loaded.family)
    assert plan is not None and not plan.finer
    carried = _pte_carried_weights(model)
    assert set(carried) == set(plan.carried) == {n for n in source if n != "lm_head"}
    assert any(n.endswith("down_proj") for n in carried)
    for name, w in carried.items():
        assert (w - source[name]).abs().max().item() == 0.0, name
    assert model.lm_head.weight.target_dtype == torch.int8  # float source weights: the plan's 8 bits


def test_a_finer_source_layer_gets_8_bits_not_4(gguf_like):
    from exporter.formats import pte_quant

    loaded = gguf_like("llama", {"*": 16, "q": 32})  # q projections on 5-bit blocks, as Gemma's Q5_0
    import copy

    model, plan = pte_quant.prepare_eager(copy.deepcopy(loaded.model), "int4-weight", 32, loaded.family)
    assert plan.finer and all(n.endswith("q_proj") for n in plan.finer)
    for name in plan.finer:
        assert model.get_submodule(name).weight.target_dtype == torch.int8


def _matmul_nbits_weights(path) -> list[np.ndarray]:
    """The float weights ([K, N]) each 4-bit MatMulNBits node of the graph at ``path`` stands for."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs["bits"] != 4:
            continue
        packed, scales = inits[node.input[1]], inits[node.input[2]]
        assert len(node.input) < 4 or not node.input[3]  # symmetric: no zero points (8 implied)
        codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(packed.shape[0], packed.shape[1], -1)
        w = (codes.astype(np.float32) - 8) * scales.reshape(codes.shape[0], codes.shape[1], 1)
        out.append(w.reshape(attrs["N"], -1)[:, :attrs["K"]])
    return out


def _metrics(loaded, folder, spec):
    ids = loaded.tokenizer(" ".join(eval_text().split()), add_special_tokens=False)["input_ids"][:48]
    runner = open_runner(folder, spec, verify_files=False)
    runner.reset()
    return logit_metrics(reference_logits(loaded.model, ids), runner.forward(ids), np.asarray(ids[1:]))


def test_onnx_int4_carries_the_source_blocks_and_beats_requantizing(gguf_like, tmp_path, monkeypatch):
    loaded = gguf_like("llama", {"*": 16})
    onnx_format = get_format("onnx")
    for sub in ("carried", "requantized"):
        (tmp_path / sub).mkdir()
    art = onnx_format.build(loaded, "int4-weight", ExportOptions(max_context=MAX_CONTEXT), tmp_path / "carried")
    assert art.spec["source_grid"]["carried"] and any("source grid" in n for n in art.notes)
    # every 4-bit node holds one source layer's 4-bit part exactly: codes and scales as the source's
    grids = [source_grid.find_grid(m.weight, 32) for n, m in loaded.model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    mains = sorted((g.weight() - g.offset.repeat_interleave(32, -1)).numpy().tobytes() for g in grids)
    nodes = sorted(w.astype(np.float32).tobytes() for w in _matmul_nbits_weights(tmp_path / "carried" / "model.onnx"))
    assert nodes == mains
    carried = _metrics(loaded, tmp_path / "carried", art.spec)

    from exporter.formats import onnx_quant

    monkeypatch.setattr(onnx_quant, "source_plan", lambda *a: None)  # what the exporter did before
    again = onnx_format.build(loaded, "int4-weight", ExportOptions(max_context=MAX_CONTEXT), tmp_path / "requantized")
    requantized = _metrics(loaded, tmp_path / "requantized", again.spec)
    assert carried["max_abs_err"] < 0.5 * requantized["max_abs_err"], (carried, requantized)
    assert carried["top1_agreement"] >= requantized["top1_agreement"]


def _carried_and_requantized(fmt: str, loaded, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """Parity metrics of ``fmt``'s int4-weight build of ``loaded`` with the source grid carried, and of the
    same build re-quantizing (no grid found), as the exporter did before."""
    from exporter import source_grid as grid_module

    builder = get_format(fmt)
    for sub in ("carried", "requantized"):
        (tmp_path / sub).mkdir()
    art = builder.build(loaded, "int4-weight", ExportOptions(max_context=MAX_CONTEXT), tmp_path / "carried")
    assert art.spec["source_grid"]["carried"]
    carried = _metrics(loaded, tmp_path / "carried", art.spec)
    monkeypatch.setattr(grid_module, "find_grid", lambda *a: None)
    again = builder.build(loaded, "int4-weight", ExportOptions(max_context=MAX_CONTEXT), tmp_path / "requantized")
    assert "source_grid" not in again.spec
    return carried, _metrics(loaded, tmp_path / "requantized", again.spec)


@pytest.mark.parametrize("fmt", ["pte", "tflite"])
def test_int4_of_a_gguf_source_is_closer_than_requantizing(fmt, gguf_like, tmp_path, monkeypatch):
    """The lowered .pte and .tflite (XNNPACK keeps pte group scales as bf16: close rather than exact)."""
    carried, requantized = _carried_and_requantized(fmt, gguf_like("llama", {"*": 16}), tmp_path, monkeypatch)
    assert carried["max_abs_err"] < 0.5 * requantized["max_abs_err"], (carried, requantized)


def test_explain_and_gate_know_the_carried_layers(gguf_like):
    """`recipes --explain int4-weight --model M` says which layers keep the source's blocks; an artifact
    that carried them is held to the recipe's tighter source-grid thresholds."""
    from exporter.recipes import explain, get_recipe

    loaded = gguf_like("llama", {"*": 16, "q": 32})
    recipe = get_recipe("int4-weight")
    source = source_grid.plan_for_format(loaded.model, loaded.family, "int4-weight", "pte", 32)
    rows = {name: (gets, why) for name, _, gets, why in explain(recipe, "pte", loaded.family, loaded.model, 32, source)}
    assert "source's own blocks" in rows["model.layers.0.mlp.down_proj"][0]  # 8-bit for a float source
    assert rows["model.layers.0.self_attn.q_proj"][0] == "int8 weights per channel"
    assert "more than 4 bits" in rows["model.layers.0.self_attn.q_proj"][1]
    assert recipe.thresholds_for({"source_grid": source.as_dict()}) is recipe.source_grid_thresholds
    assert recipe.thresholds_for({}) is recipe.thresholds
    assert recipe.source_grid_thresholds.top1_min > recipe.thresholds.top1_min
