"""Embedding tables of an ONNX graph as 8-bit blocks (GatherBlockQuantized), shared with a tied lm_head.

Written by hand because no installed quantizer does it: onnxruntime's MatMulNBitsQuantizer and
onnxruntime-genai's builder write GatherBlockQuantized at 4 bits only, and quantize_dynamic's int8 Gather
scales a whole table with one range. On Gemma-3-270M that one range made the embedding the costliest
layer of the onnx int8 recipe by far (simulated KL 0.0053, 40x the next layer; README, "Accuracy budget").
onnxruntime's kernel takes 8 bits with MatMulNBits' own storage (uint8 codes, zero point 128, one float
scale per block of a row), so a tied table is stored once: the lm_head's 8-bit MatMulNBits weight, read by
the lookup through a Reshape, the way genai's builder shares its 4-bit tied embeddings.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "com.microsoft"


def _initializers(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def shareable_width(model, gather_name: str, block_size: int) -> bool:
    """Whether the Gather's table has rows of whole blocks (the kernel's and the sharing's condition)."""
    node = next(n for n in model.graph.node if n.name == gather_name)
    table = _initializers(model).get(node.input[0])
    return table is not None and len(table.dims) == 2 and table.dims[1] % block_size == 0


def tied_heads(model, gathers: list[str], matmuls: list[str]) -> dict[str, str]:
    """Gather node name -> output name of the MatMul (among ``matmuls``) whose constant weight is that
    Gather's table transposed: the output layer of a tied model, exported with its own copy."""
    from onnx import numpy_helper

    inits = _initializers(model)
    nodes = {n.name: n for n in model.graph.node}
    heads = [nodes[m] for m in matmuls if m in nodes and nodes[m].input[1] in inits]
    out = {}
    for name in gathers:
        table = inits[nodes[name].input[0]]
        for head in heads:
            weight = inits[head.input[1]]
            if list(weight.dims) == list(reversed(table.dims)) and np.array_equal(
                    numpy_helper.to_array(weight).T, numpy_helper.to_array(table)):
                out[name] = head.output[0]
                break
    return out


def quantize_rows(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes [V, D], float32 scales [V, D / block_size]): symmetric 8-bit blocks rounded as
    MatMulNBits' RTN does (the signed value of largest magnitude becomes code -128), stored with zero point 128."""
    blocks = table.reshape(table.shape[0], -1, block_size).astype(np.float32)
    at = np.abs(blocks).argmax(-1)[..., None]
    scales = np.take_along_axis(blocks, at, -1) / -128.0
    scales = np.where(np.abs(scales) < 1e-12, np.float32(1e-12), scales).astype(np.float32)
    codes = np.clip(np.round(blocks / scales), -128, 127).astype(np.int16) + 128
    return codes.astype(np.uint8).reshape(table.shape), scales[..., 0]


def block_quantize(model, gathers: list[str], block_size: int, tied: dict[str, str]) -> list[str]:
    """Replace each of the ``gathers`` (embedding lookups of a float table whose width is whole blocks) by an
    8-bit GatherBlockQuantized, in place on ``model`` (after MatMulNBits quantization). A Gather in
    ``tied`` whose head became an 8-bit MatMulNBits of the same block size reads that head's codes and
    scales, and its own table is dropped; any other gets its own codes. Returns one note per kind."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = _initializers(model)
    by_output = {n.output[0]: n for n in graph.node if n.op_type == "MatMulNBits"}
    shared = own = 0
    for name in gathers:
        node = next(n for n in graph.node if n.name == name)
        table = inits[node.input[0]]
        rows, width = table.dims
        head = by_output.get(tied.get(name, ""))
        attrs = {a.name: a.i for a in head.attribute} if head is not None else {}
        if head is not None and (attrs.get("bits"), attrs.get("block_size"), attrs.get("K")) == (8, block_size, width):
            shape = numpy_helper.from_array(np.array([rows, width], np.int64), f"{name}_table_shape")
            graph.initializer.append(shape)
            codes = f"{name}_table_Q8"
            new = [helper.make_node("Reshape", [head.input[1], shape.name], [codes], name=f"{name}_reshape")]
            scales = head.input[2]
            shared += 1
        else:
            new = []
            q, s = quantize_rows(numpy_helper.to_array(table), block_size)
            codes, scales = f"{table.name}_Q8", f"{table.name}_scales"
            graph.initializer.extend([numpy_helper.from_array(q, codes), numpy_helper.from_array(s, scales)])
            own += 1
        new.append(helper.make_node("GatherBlockQuantized", [codes, node.input[1], scales], list(node.output),
                                    name=name, domain=DOMAIN, bits=8, block_size=block_size,
                                    gather_axis=0, quantize_axis=1))
        # In the Gather's place: its inputs are initializers or already produced, so the order stays topological.
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(at + offset, n)
        if not any(table.name in n.input for n in graph.node):
            graph.initializer.remove(table)
    if gathers and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    notes = []
    if shared:
        notes.append(f"{shared} embedding table: 8-bit blocks of {block_size} (GatherBlockQuantized), stored once "
                     "with the tied lm_head's codes and scales")
    if own:
        notes.append(f"{own} embedding tables: 8-bit blocks of {block_size} (GatherBlockQuantized)")
    return notes

