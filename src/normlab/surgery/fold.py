"""Fold inference-mode batch norms into the convolution or linear layer before them."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..functional._stats import accumulation_dtype
from ..layers._base import NormBase
from ..layers.frozen_batch_norm import _FrozenBatchNorm
from ._match import is_batch_norm, name_selected
from ._report import SurgeryReport
from .swap import names_by_module, replace_module

__all__ = ["fold_bn", "fold_bn_weights"]

# Layers whose output is linear in their weight as stored, per output channel; the base class whose forward they
# must use (a subclass that transforms its weight in forward, like StdConv2d, cannot be folded into).
_FOLDABLE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def fold_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold an inference-mode batch norm into the weight and bias of the convolution or linear layer before it.

    .. math::
        s = \gamma / \sqrt{\mathrm{running\_var} + \epsilon}, \quad
        W'_{o} = s_o W_{o}, \quad b' = s\,(b - \mathrm{running\_mean}) + \beta

    where :math:`o` runs over output channels, so that ``bn(conv(x)) == conv'(x)`` for a batch norm in eval mode
    (Ioffe & Szegedy, 2015, "Batch Normalization", arXiv 1502.03167; folding as in Jacob et al., 2018,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", arXiv
    1712.05877). The output channel axis is dim 0 of a Conv*d or Linear weight (C_out, C_in / groups, *k) and
    dim 1 of a ConvTranspose*d weight (C_in, C_out / groups, *k), whose output channel ``g * C_out / groups + j``
    is column ``j`` of the rows of group ``g``.

    Computed in float32 (float64 when the weight or the statistics are float64); the results have the weight's
    dtype, device and memory format (a channels_last weight stays channels_last).

    Args:
        weight: the layer's weight.
        bias: its bias, or None (zero).
        running_mean, running_var: the batch norm's (C_out,) statistics.
        gamma, beta: its (C_out,) affine, or None (1 and 0).
        eps: its eps.
        transpose: the weight is a ConvTranspose*d weight.
        groups: the transposed convolution's groups (irrelevant otherwise).

    Returns:
        (weight, bias): the folded weight and a (C_out,) bias.

    Raises:
        ValueError: if the statistics' length is not the layer's output channel count, or ``groups`` does not divide
            a transposed weight's input channels.

    Example:
        >>> import torch
        >>> from normlab.surgery.fold import fold_bn_weights
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3).eval(), torch.nn.BatchNorm2d(4).eval()
        >>> _ = bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        >>> w, b = fold_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
        True
    """
    owner = "fold_bn_weights"
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"{owner}: groups={groups!r} must be a positive integer")
    out_channels = weight.shape[1] * groups if transpose else weight.shape[0]
    if transpose and weight.shape[0] % groups:
        raise ValueError(
            f"{owner}: groups={groups} must divide the transposed weight's input channels, weight.shape[0]="
            f"{weight.shape[0]}"
        )
    if running_mean.shape != (out_channels,) or running_var.shape != (out_channels,):
        raise ValueError(
            f"{owner}: running_mean and running_var must have shape ({out_channels},), the layer's output channels "
            f"(weight shape {tuple(weight.shape)}, transpose={transpose}, groups={groups}), got "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}"
        )
    acc = torch.promote_types(accumulation_dtype(weight.dtype), accumulation_dtype(running_var.dtype))
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if gamma is not None:
        scale = scale * gamma.to(acc)
    shift = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    shift = shift * scale
    if beta is not None:
        shift = shift + beta.to(acc)
    spatial = (1,) * (weight.dim() - 2)
    if transpose:
        per_group = out_channels // groups
        rows = weight.shape[0] // groups
        scale = scale.view(groups, 1, per_group).expand(groups, rows, per_group).reshape(weight.shape[:2] + spatial)
    else:
        scale = scale.view((out_channels,) + (1,) * (weight.dim() - 1))
    folded = torch.empty_like(weight).copy_(weight.to(acc) * scale)
    return folded, shift.to(dtype=weight.dtype if bias is None else bias.dtype, device=weight.device)


class _PairTracer(fx.Tracer):
    """Keeps norms, convolutions and linear layers as single graph nodes (normlab's check their input's rank in
    Python, which symbolic tracing cannot run)."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        leaf = (NormBase, _FrozenBatchNorm, nn.modules.conv._ConvNd, nn.Linear)
        return isinstance(module, leaf) or is_batch_norm(module) or super().is_leaf_module(module, qualname)


def _describe_input(node) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        return node.target
    if node.op == "call_method":
        return f"a .{node.target}() call"
    return f"{getattr(node.target, '__name__', str(node.target))}()"


def _pairs_from_graph(model: nn.Module, graph: fx.Graph, candidates: dict[int, str]) -> tuple[dict, dict]:
    """({id(bn): name of the conv/linear it folds into}, {id(bn): why it has none}) from the traced graph."""
    calls = Counter(id(model.get_submodule(n.target)) for n in graph.nodes if n.op == "call_module")
    read_attrs = [n.target for n in graph.nodes if n.op == "get_attr"]
    found: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or id(model.get_submodule(node.target)) not in candidates:
            continue
        bn_id = id(model.get_submodule(node.target))
        prev = node.args[0] if node.args else None
        if calls[bn_id] > 1:
            reasons[bn_id] = "called more than once in forward (folding would change every call)"
        elif len(node.args) != 1 or node.kwargs:
            reasons[bn_id] = "called with other arguments than a single input"
        elif not (isinstance(prev, fx.Node) and prev.op == "call_module"):
            reasons[bn_id] = f"no preceding conv or linear: its input is {_describe_input(prev)}"
        elif not isinstance(model.get_submodule(prev.target), _FOLDABLE):
            layer = model.get_submodule(prev.target)
            reasons[bn_id] = f"no preceding conv or linear: its input is {prev.target} ({type(layer).__name__})"
        elif calls[id(model.get_submodule(prev.target))] > 1:
            reasons[bn_id] = f"{prev.target} is called more than once in forward"
        elif len(prev.users) > 1:
            others = ", ".join(_describe_input(u) for u in prev.users if u is not node)
            reasons[bn_id] = f"the output of {prev.target} is also used elsewhere ({others})"
        elif any(a == prev.target or a.startswith(prev.target + ".") for a in read_attrs):
            reasons[bn_id] = f"the parameters of {prev.target} are also read directly in forward"
        else:
            found[bn_id] = prev.target
    unreached = {i: "not called as a module in the traced forward" for i in candidates if i not in found}
    return found, {**unreached, **reasons}


def _pairs_by_parts(
    module: nn.Module, prefix: str, candidates: dict[int, str], names: dict[int, list[str]]
) -> tuple[dict, dict]:
    """For a ``module`` whose own forward does not trace: ({id(bn): name of the conv/linear it folds into},
    {id(bn): why it has none}) from tracing each child that holds candidates (recursively where a child does not
    trace either), plus nn.Sequential adjacency among the direct children of a plain nn.Sequential."""
    found: dict[int, str] = {}
    reasons = {
        i: "its forward does not trace with torch.fx, nor does a submodule that holds it and the layer before it"
        for i in candidates
    }
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        children = list(module.named_children())
        for (layer_name, layer), (_, bn) in zip(children, children[1:]):
            if id(bn) in candidates and isinstance(layer, _FOLDABLE):
                found[id(bn)] = prefix + layer_name
    for child_name, child in module.named_children():
        qualified = prefix + child_name
        inside = {i: n for i, n in candidates.items() if n.startswith(qualified + ".") and i not in found}
        if not inside or id(child) in candidates:
            continue
        try:
            graph = _PairTracer().trace(child)
        except Exception:  # user code that does not trace: look inside
            sub_found, sub_reasons = _pairs_by_parts(child, qualified + ".", inside, names)
        else:
            sub_found, sub_reasons = _pairs_from_graph(child, graph, inside)
            sub_found = {i: f"{qualified}.{target}" for i, target in sub_found.items()}
        found.update(sub_found)
        reasons.update(sub_reasons)
    # the untraced code around the traced parts may use a layer or a norm through another name: refuse those
    for bn_id, layer_name in list(found.items()):
        layer_id = id(module.get_submodule(layer_name[len(prefix) :]))
        if len(names[layer_id]) > 1 or len(names[bn_id]) > 1:
            reasons[bn_id] = (
                f"{layer_name} or the batch norm is registered under several names and may be used elsewhere "
                "(the model's forward does not trace: cannot check)"
            )
            del found[bn_id]
    return found, {i: r for i, r in reasons.items() if i not in found}


def _why_not_into(layer: nn.Module, bn: nn.Module, model: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (None if it can)."""
    base = next(cls for cls in _FOLDABLE if isinstance(layer, cls))
    kind = type(layer).__name__
    if type(layer).forward is not base.forward or getattr(type(layer), "_conv_forward", None) is not getattr(
        base, "_conv_forward", None
    ):
        return f"{kind} overrides forward, so its stored weight is not what it applies"
    if parametrize.is_parametrized(layer):
        return f"{kind} has a parametrized weight"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"{kind} has forward hooks, which may depend on its output or change its weight"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{kind} is a lazy module not initialized yet"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.running_mean.numel():
        return f"{kind} has {out} output channels, the batch norm {bn.running_mean.numel()}"
    sharing = [n for n, p in model.named_parameters(remove_duplicate=False) if p is layer.weight]
    if len(sharing) > 1:
        return f"its weight is shared ({', '.join(sharing)})"
    return None


def _why_not_batch_norm(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded whatever precedes it (None if it can)."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "track_running_stats=False: it normalizes with batch statistics even in eval"
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return "lazy module not initialized yet"
    if not isinstance(getattr(bn, "eps", None), (int, float)):
        return f"{type(bn).__name__} has no eps attribute"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "it has forward hooks, which would be lost"
    return None


def _check_eval(model: nn.Module, candidates: dict[int, str], bns: dict[int, nn.Module]) -> None:
    training = [name for i, name in candidates.items() if bns[i].training]
    if model.training or training:
        what = f"model {type(model).__name__}" if model.training else f"batch norm {training[0] or '(root)'}"
        raise RuntimeError(
            f"fold_bn: {what} is in training mode. Folding bakes the running statistics into the preceding layer, "
            "which matches eval mode only (training normalizes with batch statistics and keeps learning); call "
            "model.eval() first"
        )


def fold_bn(model: nn.Module, *, include=None, exclude=None) -> tuple[nn.Module, SurgeryReport]:
    """Fold each inference-mode batch norm into the Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear before it.

    The batch norm (torch.nn, SyncBatchNorm, normlab, or a frozen one of any origin) is replaced by nn.Identity
    and the layer's weight and bias are rewritten with :func:`fold_bn_weights`, in place: the model stays an
    instance of its own class, parameters keep their identity, dtype, device and memory format, and a layer
    without bias gets one. The output equals the original's up to rounding (about 1e-6 relative in float32).

    Pairs are found by torch.fx symbolic tracing (norms, convolutions and linear layers kept as leaves); a batch
    norm is folded only when its single input is the output of a conv/linear module, that output feeds nothing
    else, and neither module is called twice. When the model's own forward does not trace (data-dependent control
    flow, input checks, ...), each submodule is traced instead (recursively, where one does not trace either), plus
    nn.Sequential adjacency, and the report notes the fallback: pairs inside a part that traces are folded, a pair
    split across untraced code is not; a layer or norm registered under several names is then refused, since the
    untraced code could use it elsewhere. Linear -> BatchNorm1d assumes (N, C) activations, the case in which
    BatchNorm1d's channels are the Linear's outputs.

    Every batch norm not folded is reported with the reason: no preceding conv or linear, output used elsewhere,
    untraceable and not in an nn.Sequential, track_running_stats=False, a layer that transforms its weight in
    forward (StdConv2d, parametrizations), hooks, shared weights, a channel mismatch, ...

    Args:
        model: the model, in eval mode.
        include, exclude: fnmatch patterns on the batch norms' qualified names; exclude wins.

    Returns:
        (model, report): the same model object, changed in place, and the report (one change per folded batch
        norm, naming the layer it went into).

    Raises:
        RuntimeError: if the model or a selected batch norm is in training mode (checked before anything changes).

    Note:
        For inference only: the folded model no longer normalizes, so training it further is not training the
        original. A model without batch norms comes back unchanged with an empty report.

    Example:
        >>> import torch, normlab
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> before = model(x)
        >>> model, report = normlab.surgery.fold_bn(model)
        >>> type(model[1]).__name__, torch.allclose(model(x), before, atol=1e-6), report.changed[0].note
        ('Identity', True, 'folded into 0 (Conv2d); bias added')
    """
    report = SurgeryReport("fold_bn")
    names = names_by_module(model)
    bns: dict[int, nn.Module] = {}
    candidates: dict[int, str] = {}
    for name, module in model.named_modules():
        if not is_batch_norm(module) or id(module) in bns:
            continue
        bns[id(module)] = module
        if not name_selected(name, include, exclude):
            report.skip(name, "not selected by include/exclude")
        else:
            candidates[id(module)] = name
    if not candidates:
        return model, report
    _check_eval(model, candidates, bns)

    if id(model) in candidates:
        report.skip("", "the model is a batch norm itself: nothing precedes it")
        return model, report
    try:
        graph = _PairTracer().trace(model)
    except Exception as e:  # user code that does not trace, for whatever reason: trace its parts
        found, reasons = _pairs_by_parts(model, "", candidates, names)
        first_line = (str(e).splitlines() or [""])[0][:200]
        report.notes.append(
            f"the model does not trace with torch.fx ({type(e).__name__}: {first_line}); pairs taken from the "
            "submodules that trace (and nn.Sequential adjacency)"
        )
    else:
        found, reasons = _pairs_from_graph(model, graph, candidates)
        report.notes.append("pairs found by torch.fx symbolic tracing")

    for bn_id, name in candidates.items():
        bn = bns[bn_id]
        reason = _why_not_batch_norm(bn) or reasons.get(bn_id)
        if reason is None:
            reason = _why_not_into(model.get_submodule(found[bn_id]), bn, model)
        if reason is not None:
            report.skip(name, reason)
            continue
        note = _fold_pair(model.get_submodule(found[bn_id]), bn, found[bn_id])
        model = replace_module(model, names[bn_id], nn.Identity().train(bn.training))
        report.change(name, bn, "Identity()", note)
    return model, report


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module, layer_name: str) -> str:
    """Fold ``bn`` into ``layer`` in place; returns the report's note."""
    transpose = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    weight, bias = fold_bn_weights(
        layer.weight,
        layer.bias,
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        bn.eps,
        transpose=transpose,
        groups=layer.groups if transpose else 1,
    )
    layer.weight.copy_(weight)
    note = f"folded into {layer_name} ({type(layer).__name__})"
    if layer.bias is None:
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        return note + "; bias added"
    layer.bias.copy_(bias)
    return note
