"""Carry a quantized source's 4-bit blocks into an int4 artifact instead of re-quantizing them.

A model loaded from a GGUF is dequantized to float32 (transformers' GGUF loader), but its weights
still lie on the source's grid: a Q4_1 / Q4_K block of 32 weights is ``w = d * q + m`` with 4-bit
codes ``q`` and a float scale ``d`` and minimum ``m`` per block. Re-quantizing such a block onto a
fresh symmetric 4-bit grid (what every int4 quantizer does) rounds every weight a second time:
SmolLM2-135M's pte int4-weight lost 0.33 of top-1 agreement that way (README, "Measured").

No runtime's fast 4-bit kernel takes a float minimum per block (XNNPACK's blockwise int4 and
ai-edge-quantizer's are symmetric; onnxruntime's MatMulNBits with float zero points falls to a
slow kernel), so the block is split into what they do take plus a small float term:

    w = d * t + c,   t = q - q_min - 8 in [-8, 7] (each block holds -8),   c = m + d * (q_min + 8)

``x @ w.T`` is then a symmetric 4-bit matmul with scale ``d`` plus ``blocksum(x) @ C``, where
``blocksum`` sums each block of 32 inputs: a float matmul 1/32 the size of the layer (``GridLinear``).
Since every block holds the code -8 and no larger magnitude, a symmetric quantizer that maps the
block's largest magnitude to -8 (onnxruntime's MatMulNBits RTN, torchao's SYMMETRIC_NO_CLIPPING_ERR)
recovers ``d`` and ``t`` exactly: nothing is rounded twice. Detection reads the float weights
themselves, so it works whatever loader dequantized them and for any family.

Layers whose source blocks hold more than 16 levels (Q5_0, Q6_K, Q8_0) are reported as finer than
4 bits: an int4 plan keeps them at 8 bits rather than rounding them onto a coarser grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LEVELS_4BIT = 16
# A code is "on the grid" when the block rebuilt from it is within this fraction of a grid step of
# the weight: dequantization in float32 leaves ~1e-7 relative noise; off-grid weights miss by ~0.25.
_ON_GRID = 1e-3


@dataclass
class Grid:
    """A linear layer's weights as 4-bit blocks: ``weight == scale * codes + offset`` per block."""

    scale: torch.Tensor  # [out, in / group], float32, > 0
    codes: torch.Tensor  # [out, in], int8 in [-8, 7]; every block holds -8
    offset: torch.Tensor  # [out, in / group], float32
    group: int

    def weight(self) -> torch.Tensor:
        """The float weights the grid stands for, [out, in]."""
        blocks = self.codes.float().unflatten(-1, (-1, self.group)) * self.scale[..., None] + self.offset[..., None]
        return blocks.flatten(-2)


def _block_grid(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(lowest value, step, codes from 0) per block, or None when some block lies on no grid.

    The step is the smallest gap between a block's distinct values divided by 1..4: a block that uses
    only some of its grid's codes (Q4_K's search for a scale leaves some unused) can show no two
    adjacent codes, so its smallest gap is a multiple of the step.
    """
    lo = blocks.amin(-1)
    spread = blocks.amax(-1) - lo
    gaps = torch.sort(blocks, -1).values.diff(dim=-1)
    # gaps below float32 noise are repeats of one value, not a step
    gaps = torch.where(gaps > 1e-5 * spread[..., None], gaps, torch.full_like(gaps, float("inf")))
    gap = gaps.amin(-1)
    gap = torch.where(torch.isfinite(gap), gap, torch.ones_like(gap))  # one repeated value: any step
    step = torch.full_like(gap, float("nan"))
    for divisor in (1, 2, 3, 4):
        trial = gap / divisor
        q = torch.round((blocks - lo[..., None]) / trial[..., None])
        fits = ((lo[..., None] + q * trial[..., None] - blocks).abs() / trial[..., None]).amax(-1) <= _ON_GRID
        step = torch.where(torch.isnan(step) & fits, trial, step)
    if torch.isnan(step).any():
        return None
    return lo, step, torch.round((blocks - lo[..., None]) / step[..., None])


def _blocks(weight: torch.Tensor, group: int) -> torch.Tensor | None:
    out_features, in_features = weight.shape
    if in_features % group:
        return None
    return weight.detach().float().reshape(out_features, in_features // group, group)


def source_levels(weight: torch.Tensor, group: int) -> int | None:
    """How many levels the block grid of ``weight`` spans (16 for a 4-bit source), or None when the
    weights lie on no grid of blocks of ``group`` (a float source, or blocks of another size)."""
    blocks = _blocks(weight, group)
    found = None if blocks is None else _block_grid(blocks)
    return None if found is None else int(found[2].amax().item()) + 1


def find_grid(weight: torch.Tensor, group: int) -> Grid | None:
    """The 4-bit block grid of ``weight`` (None when its blocks hold more than 16 levels or none)."""
    blocks = _blocks(weight, group)
    found = None if blocks is None else _block_grid(blocks)
    if found is None or found[2].amax() >= LEVELS_4BIT:
        return None
    lo, step, q = found  # codes 0 .. 15 from each block's lowest value
    # Q4_1 blocks span all 16 codes, so the step is the block's scale d; a block using fewer codes
    # (Q4_K) gets the step its values show, which rebuilds it just as exactly.
    return Grid(scale=step, codes=(q - 8).to(torch.int8).flatten(-2), offset=lo + 8 * step, group=group)


OFFSETS = "block_offsets"  # the attribute of a GridLinear holding its BlockOffsets (quantizers skip it)


class BlockOffsets(torch.nn.Module):
    """``blocksum(x) @ offsets``: the float term of a source grid's per-block offsets.

    Two float linears: ``block_sum`` ([in/group, in], 1 where input k lies in block b) sums each
    block, ``offsets`` ([out, in/group]) weighs the sums; 2/group of the 4-bit matmul's work. Linears
    rather than a reshape + sum: ExecuTorch's XNNPACK delegate takes linears whole, while the reshapes
    of a dynamic sequence stay outside it and split the program into pieces (8 -> 22 delegates on a
    2-layer model). A module of its own, so that every exporter names its ops apart from the 4-bit
    matmul's (litert-torch names tensors by module chain, torch.onnx by scope) and every format's
    quantizer leaves them float (see ``OFFSETS``).
    """

    def __init__(self, offsets: torch.Tensor, block_sum: torch.Tensor):
        super().__init__()
        self.offsets = torch.nn.Parameter(offsets, requires_grad=False)
        shared = isinstance(block_sum, torch.nn.Parameter)  # one per input width, kept as the same object
        self.block_sum = block_sum if shared else torch.nn.Parameter(block_sum, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = torch.nn.functional.linear(x, self.block_sum)
        return torch.nn.functional.linear(sums, self.offsets)


def block_sum_matrix(in_features: int, group: int) -> torch.Tensor:
    """[in/group, in]: row b is 1 over block b's inputs."""
    return torch.eye(in_features // group).repeat_interleave(group, dim=1)


class GridLinear(torch.nn.Linear):
    """An nn.Linear whose weight is a source grid's ``scale * codes`` (what the int4 quantizer takes)
    plus ``BlockOffsets``, the float term of the blocks' offsets."""

    def __init__(self, linear: torch.nn.Linear, grid: Grid, block_sum: torch.Tensor | None = None):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            blocks = grid.codes.float().unflatten(-1, (-1, grid.group)) * grid.scale[..., None]
            self.weight.copy_(blocks.flatten(-2))
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        if block_sum is None:
            block_sum = block_sum_matrix(linear.in_features, grid.group)
        setattr(self, OFFSETS, BlockOffsets(grid.offset.contiguous(), block_sum))
        self.group = grid.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias) + self.block_offsets(x)

    def source_weight(self) -> torch.Tensor:
        """The weights this layer computes with, as float: ``weight`` + each block's offset."""
        return self.weight + self.block_offsets.offsets.repeat_interleave(self.group, -1)


def carry(model: torch.nn.Module, grids: dict[str, Grid]) -> None:
    """Replace the nn.Linear of ``model`` at each path of ``grids`` by a ``GridLinear`` of its grid (in place)."""
    block_sums = {}  # one block-sum matrix per input width, shared (the exporters keep one copy)
    for name, grid in grids.items():
        module = model.get_submodule(name)
        width = module.in_features
        if width not in block_sums:
            block_sums[width] = torch.nn.Parameter(block_sum_matrix(width, grid.group), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, GridLinear(module, grid, block_sums[width]))


@dataclass
class SourcePlan:
    """How an int4 plan meets a quantized source: which linears keep the source's 4-bit blocks
    (``carried``) and which the plan would have put at 4 bits but the source holds finer (``finer``:
    they get 8 bits, as the source's own quantizer chose more bits for them)."""

    carried: list[str]
    finer: list[str]
    group: int
    # the grids found while planning, for ``carry_plan`` (released once carried: codes of every layer)
    grids: dict[str, Grid] = field(default_factory=dict, repr=False)

    def note(self) -> str | None:
        if not self.carried:
            return None
        text = (f"source grid: {len(self.carried)} linears keep the source's 4-bit blocks of {self.group} exactly "
                f"(w = d*t + c: symmetric int4 codes and scales + a float block-offset term)")
        if self.finer:
            text += f"; {len(self.finer)} linears the source holds at more than 4 bits get 8 bits"
        return text

    def as_dict(self) -> dict:
        return {"group": self.group, "carried": self.carried, "finer_than_4bit": self.finer}


def plan_for_source(model: torch.nn.Module, quantized: list[str], four_bit: list[str], group: int) -> SourcePlan:
    """Which of the ``quantized`` linears (the plan gives them int8 or int4; ``four_bit`` int4) lie on a
    4-bit grid of ``group`` and are carried, and which int4 ones then move to 8 bits.

    A layer on a 4-bit source grid is carried whatever bits the plan gave it: the plan's 8-bit rules
    exist because re-quantizing costs accuracy, and carrying costs none. When nothing is on a grid (a
    float source), the plan stands unchanged.
    """
    modules = dict(model.named_modules())
    grids = {n: find_grid(modules[n].weight, group) for n in quantized if type(modules[n]) is torch.nn.Linear}
    grids = {n: g for n, g in grids.items() if g is not None}
    finer = [n for n in four_bit if n not in grids] if grids else []
    return SourcePlan(carried=list(grids), finer=finer, group=group, grids=grids)


def plan_for_format(model: torch.nn.Module, family, recipe: str, fmt: str, group: int) -> SourcePlan | None:
    """``plan_for_source`` under ``recipe``'s ``fmt`` plan (exporter/recipes.py) for ``model``'s linears;
    None when no linear lies on a 4-bit grid (a float source: the plan stands as it is)."""
    from exporter.recipes import get_recipe, layer_rules

    rules = layer_rules(get_recipe(recipe), fmt, family, model, embeddings=False)
    # A layer an accuracy budget keeps finer (``Rule.modules``) is not carried: the budget chose its rule.
    quantized = [n for n, (_, rule, _) in rules.items()
                 if rule is not None and rule.weights != "float" and not rule.modules]
    four = [n for n, (_, rule, _) in rules.items() if rule is not None and rule.weights == "int4"]
    plan = plan_for_source(model, quantized, four, group)
    return plan if plan.carried else None


def carry_plan(model: torch.nn.Module, plan: SourcePlan) -> None:
    """Replace the plan's carried linears of ``model`` (the planned model or a copy of it) by
    ``GridLinear`` (in place)."""
    carry(model, plan.grids)
    plan.grids = {}
