"""An artifact's quantization, simulated layer by layer in PyTorch (for ``slm-export inspect``).

The runtimes do not expose what one layer computes (onnxruntime, LiteRT and ExecuTorch run fused,
delegated graphs), so ``exporter.divergence`` reproduces each format's quantization on the PyTorch
model: every linear (and embedding) gets a ``Scheme`` (its weights rounded as the format's quantizer
rounds them, its input quantized as the format's kernels quantize it at run time), which can be
switched on for all layers (to see where the hidden states drift) or for one layer at a time (to
see what that layer's quantization alone costs). Which scheme each layer gets is the format's
knowledge: each recipe module (``exporter/formats/*_quant.py``) has a ``simulated_schemes`` built on
``plan_schemes`` here. A test checks the simulation against each format's real artifact.

Fake quantization is written here rather than taken from torchao: torchao's quantized tensors model
its own (ExecuTorch) schemes only, and the simulation must also stand for MatMulNBits' per-block int8
activations and LiteRT's per-row dynamic range kernels, with one code path for the three formats.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

ACTIVATIONS = ("float", "token", "block", "tensor")  # none; int8 per token (asymmetric); per block (symmetric); per tensor
# How a symmetric quantizer maps a block's largest magnitude m: "half-range" (torchao: m / ((2**b - 1) / 2),
# codes clamped to [-2**(b-1), 2**(b-1) - 1]); "qmax" (ai-edge-quantizer, XNNPACK's pt2e: m / (2**(b-1) - 1));
# "signed-max" (onnxruntime's MatMulNBits RTN: the signed value v of largest magnitude becomes code -2**(b-1)).
ROUNDINGS = ("half-range", "qmax", "signed-max")


@dataclass(frozen=True)
class Scheme:
    """How one layer is quantized in the artifact.

    ``bits``: weight bits (None: float weights); ``group``: block of input weights sharing a scale
    (None: one scale per output channel, or per table for ``per_tensor``); ``activations``: how the
    layer's input is quantized at run time (ACTIVATIONS); ``exact``: the weights are kept as they are
    (a quantized source's own grid, exporter/source_grid.py); ``half``: float16 weights (compute is
    simulated in float32: LiteRT's fp16 recipe dequantizes at load, and onnxruntime accumulates fp16 in fp32).
    """

    bits: int | None = None
    group: int | None = None
    activations: str = "float"
    exact: bool = False
    half: bool = False
    per_tensor: bool = False
    rounding: str = "half-range"  # how the quantizer picks a symmetric scale: ROUNDINGS
    bf16_scales: bool = False  # block scales kept with bfloat16's 7-bit mantissa (XNNPACK, ai-edge-quantizer)

    def __post_init__(self):
        if self.activations not in ACTIVATIONS or self.rounding not in ROUNDINGS:
            raise ValueError(f"bad scheme {self}")

    def describe(self) -> str:
        if self.half:
            return "fp16"
        if self.bits is None and self.activations == "float":
            return "float"
        weights = "float" if self.bits is None else f"int{self.bits}"
        where = ("source grid" if self.exact else "per tensor" if self.per_tensor
                 else f"g{self.group}" if self.group else "per channel")
        acts = {"float": "", "token": " + int8 act/token", "block": f" + int8 act/{self.group or 32}",
                "tensor": " + int8 act/tensor"}[self.activations]
        return f"{weights} {where}{acts}" if self.bits else f"float{acts}"

    @property
    def quantizes(self) -> bool:
        return self.half or self.bits is not None or self.activations != "float"


def fake_quantize_weight(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``weight`` ([out, in] or an embedding table) rounded onto ``scheme``'s symmetric integer grid."""
    w = weight.detach().float()
    if scheme.half:
        return w.half().float()
    if scheme.bits is None or scheme.exact:
        return w.clone()
    qmin, qmax = -(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1
    if scheme.per_tensor:
        # one asymmetric range per table (onnxruntime's int8 Gather): 256 levels over [min, max]
        lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
        scale = max(hi - lo, 1e-12) / (2 ** scheme.bits - 1)
        zero = round(-lo / scale)
        return (torch.clamp(torch.round(w / scale) + zero, 0, 2 ** scheme.bits - 1) - zero) * scale
    shaped = w.unflatten(-1, (-1, scheme.group)) if scheme.group else w.unsqueeze(-2)
    if scheme.rounding == "signed-max":
        at = shaped.abs().argmax(-1, keepdim=True)
        scale = shaped.gather(-1, at) / qmin
        scale = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
    else:
        steps = (qmax - qmin) / 2 if scheme.rounding == "half-range" else qmax
        scale = shaped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / steps
    if scheme.bf16_scales and scheme.group:
        scale = scale.bfloat16().float()
    q = torch.clamp(torch.round(shaped / scale), qmin, qmax) * scale
    return q.flatten(-2) if scheme.group else q.squeeze(-2)


def fake_quantize_input(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """A layer's input as the format's kernels quantize it at run time (``scheme.activations``)."""
    mode = scheme.activations
    if mode == "float":
        return x
    if mode == "block":  # MatMulNBits accuracy_level 4: symmetric int8 per block of the weight's group
        g = scheme.group or 32
        if x.shape[-1] % g:
            return x
        blocks = x.unflatten(-1, (-1, g))
        scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return (torch.clamp(torch.round(blocks / scale), -127, 127) * scale).flatten(-2)
    # asymmetric int8: per token (XNNPACK's qd8, LiteRT's dynamic range kernels) or per tensor (pt2e dynamic)
    dims = (-1,) if mode == "token" else tuple(range(x.dim()))
    lo = x.amin(dim=dims, keepdim=True).clamp_max(0)
    hi = x.amax(dim=dims, keepdim=True).clamp_min(0)
    scale = (hi - lo).clamp_min(1e-12) / 255
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


class Simulation:
    """A private copy of a model whose layers can be switched to their simulated quantization.

    The copy unties shared weights (a tied embedding and LM head may get different schemes) and keeps
    each layer's original and fake-quantized weights, so switching a layer on or off is a pointer swap.
    """

    def __init__(self, model: torch.nn.Module, schemes: dict[str, Scheme]):
        self.model = copy.deepcopy(model).float().eval()
        seen = set()
        for _, module in self.model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter):
                if id(weight) in seen:
                    module.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
                seen.add(id(module.weight))
        modules = dict(self.model.named_modules())
        unknown = sorted(set(schemes) - set(modules))
        if unknown:
            raise KeyError(f"no such modules: {', '.join(unknown[:3])}")
        self.schemes: dict[str, Scheme] = {}
        self._modules = {n: modules[n] for n, s in schemes.items() if s.quantizes}
        self._original = {n: m.weight.data for n, m in self._modules.items()}
        self._quantized: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, list] = {}
        for name in self._modules:
            self._set(name, schemes[name])

    def _set(self, name: str, scheme: Scheme) -> None:
        """Layer ``name`` simulated with ``scheme`` (float weights and inputs when it quantizes nothing)."""
        self._offsets.pop(name, None)
        if not scheme.quantizes:
            self.schemes.pop(name, None)
            self._quantized[name] = self._original[name]
            return
        self.schemes[name] = scheme
        self._quantized[name] = fake_quantize_weight(self._original[name], scheme)
        # A carried source grid runs as a 4-bit matmul on the quantized input plus its block offsets on
        # the float input (exporter/source_grid.GridLinear): the offsets' share of the weights, per layer.
        if scheme.exact and scheme.activations != "float":
            offsets = _carried_offsets(self._original[name], scheme)
            if offsets is not None:
                self._offsets[name] = offsets

    def replace(self, schemes: dict[str, Scheme]) -> None:
        """Give the layers of ``schemes`` these schemes instead (only layers this simulation was built to
        quantize); call ``enable`` after. For trying a mixed-precision plan without a second copy of the model."""
        self.disable()
        for name, scheme in schemes.items():
            if name in self._modules:
                self._set(name, scheme)

    def enable(self, names=None) -> None:
        """Switch ``names`` (default: every simulated layer) to their quantization; the rest to float."""
        self.disable()
        for name in self.schemes if names is None else names:
            module, scheme = self._modules[name], self.schemes[name]
            module.weight.data = self._quantized[name]
            if isinstance(module, torch.nn.Linear) and scheme.activations != "float":
                self._hooks[name] = _input_hooks(module, scheme, self._offsets.get(name))

    def disable(self) -> None:
        """Every layer back to its float weights and inputs."""
        for name, module in self._modules.items():
            module.weight.data = self._original[name]
        for hooks in self._hooks.values():
            for hook in hooks:
                hook.remove()
        self._hooks.clear()

    def forward(self, ids: list[int], hidden_states: bool = False):
        """(logits (n, vocab) float32, [hidden states per layer] or None) for one sequence, no cache."""
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), output_hidden_states=hidden_states)
        hidden = [h[0].float() for h in out.hidden_states] if hidden_states else None
        return out.logits[0].float().numpy(), hidden


def _carried_offsets(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor | None:
    """[out, in]: each block's float offset of ``weight``'s source grid (None when it lies on none)."""
    from .source_grid import find_grid

    grid = find_grid(weight, scheme.group or 32)
    return None if grid is None else grid.offset.repeat_interleave(grid.group, -1)


def _input_hooks(module: torch.nn.Linear, scheme: Scheme, offsets: torch.Tensor | None) -> list:
    """Hooks that quantize ``module``'s input as ``scheme`` says; with ``offsets`` (a carried grid) the
    offsets' part of the weights sees the float input: y = W x_q + offsets (x - x_q)."""
    if offsets is None:
        return [module.register_forward_pre_hook(lambda m, args: (fake_quantize_input(args[0], scheme), *args[1:]))]
    seen = {}

    def quantize(m, args):
        seen["x"], seen["q"] = args[0], fake_quantize_input(args[0], scheme)
        return (seen["q"], *args[1:])

    def correct(m, args, out):
        return out + torch.nn.functional.linear(seen.pop("x") - seen.pop("q"), offsets)

    return [module.register_forward_pre_hook(quantize), module.register_forward_hook(correct)]


def plan_schemes(recipe: str, fmt: str, loaded, group_size: int, activation: str, *, eight_group: int | None = None,
                 embed: Scheme | None = None, source: dict | None = None, **style) -> dict[str, Scheme]:
    """module path -> Scheme for every linear the ``fmt`` plan of ``recipe`` quantizes (and the
    embedding tables when ``embed`` is given): int4 rules become groups of ``group_size``, int8 rules
    per channel (or groups of ``eight_group``), dynamic inputs are quantized as ``activation``; layers of
    a carried source grid (runtime.json ``source_grid``) keep their weights, those it holds finer get 8 bits;
    ``style`` (``rounding``, ``bf16_scales``) is the format quantizer's way of rounding, for every layer."""
    from exporter.recipes import get_recipe, layer_rules

    carried = set((source or {}).get("carried", ()))
    finer = set((source or {}).get("finer_than_4bit", ()))
    eight = Scheme(8, eight_group, activation, **style)
    out = {}
    for name, (role, rule, is_linear) in layer_rules(get_recipe(recipe), fmt, loaded.family, loaded.model).items():
        kept = rule is not None and bool(rule.modules)  # an accuracy budget's rule (exporter/mixed_precision.py)
        if not is_linear:
            if embed is not None and not (kept and rule.weights == "float"):
                out[name] = embed
            continue
        if name in carried and not kept:
            out[name] = Scheme(4, group_size, activation, exact=True, **style)
        elif name in finer:
            out[name] = eight
        elif rule is not None and rule.weights != "float":
            acts = activation if rule.activations == "dynamic" else "float"
            out[name] = (Scheme(4, group_size, acts, **style) if rule.weights == "int4"
                         else Scheme(8, eight_group if rule.granularity == "group" else None, acts, **style))
    return out


def half_schemes(loaded) -> dict[str, Scheme]:
    """fp16: every linear and embedding in float16."""
    return {n: Scheme(half=True) for n, m in loaded.model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
