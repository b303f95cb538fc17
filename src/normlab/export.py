"""ONNX deployment: export a model (batch norms folded into the convolutions first) and check the file in
onnxruntime against PyTorch.

Exporter. torch >= 2.9 makes ``torch.onnx.export(dynamo=True)`` the default: it captures the model with
``torch.export`` and translates the ATen graph with onnxscript's torchlib. It is the one used here, because the
TorchScript exporter (``dynamo=False``, deprecated) cannot export ``aten::rms_norm`` below opset 23 (RMSNorm,
RMSNorm2d) nor LayerNorm2d's permute/layer_norm with a dynamic batch. The capture is done here with
``torch.export.export(strict=False)`` (then ``strict=True``) and the ExportedProgram handed to ``torch.onnx.export``:
``torch.onnx.export`` given the module itself would, when the dynamic batch axis cannot be kept (a Python loop over
the batch, say), silently re-export with the batch size fixed to the example's, while ``torch.export`` raises.

Opset. torchlib writes opset 18. The default here is 17, the newest that older runtimes read, reached by rewriting
the few ops that changed in opset 18 (Reduce* take ``axes`` as an attribute again, Split loses ``num_outputs``, the
new optional inputs/attributes of Pad, Resize, Scatter*, LpPool must be unused) and refusing, with the node's name,
what opset 17 cannot express. The ONNX version converter is not used: it reads a Reduce op's axes only from a
Constant node (torchlib's optimizer makes them initializers), leaves ``noop_with_empty_axes`` behind (invalid at
17), and has no Split adapter (NormLSTM/NormGRU); torch.onnx.export's own conversion silently keeps opset 18 when
it fails. Higher opsets are written by torchlib directly.

Every failure names the layer: when the export, the translation, onnxruntime, or the numerical check fails, the
model is searched top-down (each submodule exported and run on the inputs it received) for the deepest submodule
that fails on its own, and the error names it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import inspect
import io
import logging
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._loading import load_weights, resolve_callable
from .surgery._report import SurgeryReport

__all__ = ["ExportReport", "OnnxExportError", "export_onnx", "add_export_parser", "export_command", "load_factory"]

_CHECK_BATCHES = (1, 8)
_MIN_TRACE_BATCH = 2  # torch.export specializes size-1 dimensions, so a batch-1 example is traced at batch 2
_NATIVE_OPSET = 18  # the opset torchlib writes; 17 is reached by _lower_to_opset_17
_EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file (protobuf's limit is 2 GiB)
# opset 18's changes (onnx.defs: the default-domain schemas with since_version 18) that torchlib may write
_REDUCE_OPS_CHANGED_IN_18 = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
}
_OPS_NEW_IN_18 = {
    "BitwiseAnd",
    "BitwiseNot",
    "BitwiseOr",
    "BitwiseXor",
    "CenterCropPad",
    "Col2Im",
    "GroupNormalization",
    "Mish",
    "OptionalGetElement",
    "OptionalHasElement",
}


class OnnxExportError(RuntimeError):
    """A model (or one of its layers) that does not export to ONNX or does not compute the same in onnxruntime."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and checked.

    Attributes:
        path: the .onnx file (weights above 1 GiB go to ``path + ".data"`` next to it).
        opset: the default-domain opset of the file.
        exporter: how the graph was captured and translated.
        dynamic_batch: whether the batch axis (dim 0 of every input and output) is symbolic ("batch").
        input_names, output_names: the graph's input and output names.
        fold: the report of ``normlab.surgery.fold.fold_bn`` (None with ``fold_bn=False``).
        max_abs_diff: batch size -> max |onnxruntime - PyTorch| over every output (empty with ``check=False``).
        op_counts: ONNX op type -> number of nodes.
        notes: anything else worth knowing (one sentence each).
    """

    path: str
    opset: int
    exporter: str
    dynamic_batch: bool
    input_names: list[str]
    output_names: list[str]
    fold: SurgeryReport | None = None
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"export_onnx: {self.path} (opset {self.opset}, {sum(self.op_counts.values())} nodes, "
            f"batch axis {'dynamic' if self.dynamic_batch else 'fixed'})",
            f"  exporter: {self.exporter}",
        ]
        if self.fold is not None:
            lines += ["  " + line for line in str(self.fold).splitlines()]
        lines += [f"  onnxruntime vs PyTorch at batch {b}: max abs diff {d:.3g}" for b, d in self.max_abs_diff.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export_onnx(
    model: nn.Module,
    example,
    path,
    *,
    fold_bn: bool = True,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
) -> ExportReport:
    """Export ``model`` to an ONNX file for inference, folding batch norms and checking the file in onnxruntime.

    The export works on a CPU deep copy of the model in eval mode: ``model`` itself, its training flag, device and
    weights are left unchanged, and a model in training mode is exported as it computes in eval mode (running
    statistics, no updates), which is what inference runs; the report notes it. With ``fold_bn`` the copy's batch
    norms are first folded into the preceding convolutions by :func:`normlab.surgery.fold.fold_bn`.

    With ``check``, the file is run in onnxruntime (CPU) at batch 1 and 8 (with ``dynamic_batch``; else at the
    example's batch size) on random inputs shaped like ``example`` (floating inputs: normal with the example's mean
    and std; other dtypes: the example's rows, repeated), and compared with the model as given (eval mode, not
    folded), so a wrong fold fails the check too.

    Args:
        model: the model; its ``forward`` takes the example's tensors positionally.
        example: an input tensor, or a tuple of them, with the batch along dim 0.
        path: the .onnx file to write.
        fold_bn: fold batch norms into the preceding convolutions first.
        opset: ONNX opset, >= 17 (18 and above are written by the exporter; 17 by rewriting the ops that
            changed in 18, see the module docstring).
        dynamic_batch: make dim 0 of every input and output symbolic ("batch"); the example is traced at batch 2
            or more.
        check: run the file in onnxruntime and compare with PyTorch.
        atol: the largest max abs difference the check accepts.

    Returns:
        ExportReport: the file, its opset, op counts, the fold report and the checked differences.

    Raises:
        ValueError: on a bad argument (opset < 17, an example that is not a tensor or tuple of tensors, inputs
            without a common batch dim with ``dynamic_batch``, atol <= 0).
        OnnxExportError: when the export fails, onnxruntime cannot load the file, or the outputs differ by more
            than ``atol``; the message names the deepest layer that fails on its own, and what failed.
        RuntimeError: from ``fold_bn`` when it refuses a model.
        ImportError: when onnx, onnxruntime or onnxscript is not installed (the ``onnx`` extra).

    Example:
        >>> import os, tempfile, torch
        >>> from normlab.export import export_onnx
        >>> from normlab.layers.group_norm import GroupNorm
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), GroupNorm(8, num_groups=2), torch.nn.ReLU())
        >>> with tempfile.TemporaryDirectory() as d:
        ...     report = export_onnx(model, torch.randn(1, 3, 8, 8), os.path.join(d, "m.onnx"), fold_bn=False)
        >>> sorted(report.max_abs_diff), report.max_abs_diff[8] < 1e-4, report.opset
        ([1, 8], True, 17)
    """
    args = _check_arguments(model, example, opset, atol, dynamic_batch)
    _require_onnx_packages()
    path = os.fspath(path)
    deployed = copy.deepcopy(model).cpu().eval()
    notes = []
    if model.training:
        notes.append("the model was in training mode: exported as it computes in eval mode (the model is unchanged)")
    trace_args = _with_batch(args, _MIN_TRACE_BATCH) if dynamic_batch and _batch(args) < _MIN_TRACE_BATCH else args
    batches = _CHECK_BATCHES if dynamic_batch else (_batch(args),)
    check_inputs = {b: _inputs_like(args, b, seed=b) for b in batches} if check else {}
    with torch.no_grad():
        expected = {b: _tensors(deployed(*xs)) for b, xs in check_inputs.items()}
        n_outputs = len(_tensors(deployed(*trace_args)))

    fold_report = None
    if fold_bn:
        from .surgery.fold import fold_bn as fold

        deployed, fold_report = fold(deployed)
        if fold_report.changed:
            _check_fold(deployed, check_inputs, expected, atol, fold_report)

    input_names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
    output_names = ["output"] if n_outputs == 1 else [f"output{i}" for i in range(n_outputs)]
    with _quiet():
        try:
            batch = _batch(trace_args) if dynamic_batch else None
            proto, capture = _to_onnx(deployed, trace_args, {}, opset, batch, input_names, output_names)
        except OnnxExportError as e:
            raise _localized(e, deployed, trace_args, opset, dynamic_batch, atol) from e
    report = ExportReport(
        path=path,
        opset=_default_opset(proto),
        exporter=f"torch.export.export({capture}) + torch.onnx.export(dynamo=True), torch {torch.__version__}",
        dynamic_batch=dynamic_batch,
        input_names=input_names,
        output_names=output_names,
        fold=fold_report,
        op_counts=dict(Counter(node.op_type for node in proto.graph.node)),
        notes=notes,
    )
    if not check:
        report.notes.append("not checked in onnxruntime (check=False)")
    # written under a temporary name, renamed once checked: a failed export leaves no file that looks finished
    partial, data = path + ".partial", path + ".data"
    large = _weight_bytes(deployed) > _EXTERNAL_DATA_BYTES
    try:
        _save(proto, partial, data if large else None)
        _validate_file(partial, deployed, trace_args, opset, dynamic_batch, atol)
        if check:
            report.max_abs_diff = _check_file(partial, deployed, check_inputs, expected, opset, dynamic_batch, atol)
    except BaseException:
        for leftover in [partial, data] if large else [partial]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        raise
    os.replace(partial, path)
    return report


def _require_onnx_packages() -> None:
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"export_onnx needs {', '.join(missing)}: pip install 'normlab[onnx]'")


def _check_arguments(model, example, opset, atol, dynamic_batch) -> tuple[torch.Tensor, ...]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"export_onnx: model={type(model).__name__} must be a torch.nn.Module")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise ValueError(f"export_onnx: opset={opset!r} must be an int >= 17")
    if not (isinstance(atol, (int, float)) and atol > 0):
        raise ValueError(f"export_onnx: atol={atol!r} must be > 0")
    args = (example,) if isinstance(example, torch.Tensor) else example
    if not isinstance(args, tuple) or not args or not all(isinstance(t, torch.Tensor) for t in args):
        raise ValueError(
            f"export_onnx: example={type(example).__name__} must be a tensor or a non-empty tuple of tensors"
        )
    args = tuple(t.detach().cpu() for t in args)
    if dynamic_batch and (any(t.dim() == 0 for t in args) or len({t.shape[0] for t in args}) != 1):
        shapes = [tuple(t.shape) for t in args]
        raise ValueError(
            f"export_onnx: example shapes {shapes} must share a batch size along dim 0 with dynamic_batch=True"
        )
    return args


# --- inputs and outputs -----------------------------------------------------------------------------------------


def _batch(args: tuple[torch.Tensor, ...]) -> int:
    return args[0].shape[0] if args[0].dim() else 1


def _with_batch(args: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """The example's rows repeated cyclically to ``batch`` rows."""
    return tuple(t[torch.arange(batch) % t.shape[0]] for t in args)


def _inputs_like(args: tuple[torch.Tensor, ...], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Inputs of batch size ``batch`` like the example: floating ones normal with its mean and std (seeded),
    others its rows repeated."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for t in args:
        if not t.is_floating_point():
            out.append(_with_batch((t,), batch)[0] if t.dim() else t.clone())
            continue
        shape = (batch, *t.shape[1:]) if t.dim() else ()
        stats = t.double()
        std = float(stats.std()) if t.numel() > 1 else 1.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        out.append((noise * std + float(stats.mean())).to(t.dtype))
    return tuple(out)


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _max_abs_diff(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    if len(actual) != len(expected):
        return math.inf
    diff = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return math.inf
        if a.numel():
            diff = max(diff, float((a.double() - e.double()).abs().max()))
    return diff


# --- export ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's and onnxscript's logging while exporting: progress notices (torchvision ops not registered,
    opset conversion) and the tracebacks torch.export logs for the failures this module reports itself."""
    names = ["torch", "onnxscript"]
    names += [n for n in logging.root.manager.loggerDict if n.startswith(("torch.", "onnxscript."))]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    # torch.export prints the partial graph of a failed capture to stderr (torch/export/_trace.py)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", module=r"torch\.onnx.*|onnxscript.*")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _summary(exc: BaseException) -> str:
    """The exception's type and first lines, and those of its root cause (torch.onnx wraps the real error)."""

    def lines(e: BaseException, n: int) -> str:
        text = " | ".join([line.strip() for line in str(e).splitlines() if line.strip()][:n])
        return f"{type(e).__name__}: {text[:400]}"

    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return lines(exc, 3) if root is exc else f"{lines(exc, 1)} (caused by {lines(root, 3)})"


def _dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, batch: int | None) -> dict | None:
    """torch.export dynamic_shapes by argument name: dim 0 of every tensor with ``batch`` rows is "batch"."""
    if batch is None:
        return None
    dim = torch.export.Dim("batch")
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments

    def spec(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.dim() and leaf.shape[0] == batch:
            return {0: dim}
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _to_onnx(module, args, kwargs, opset, batch, input_names=None, output_names=None):
    """(ONNX ModelProto, "strict=False" | "strict=True"): torch.export (non-strict, then strict), then
    torch.onnx.export; dim 0 of the tensors with ``batch`` rows is dynamic (nothing is with ``batch=None``)."""
    try:
        shapes = _dynamic_shapes(module, args, kwargs, batch)
    except TypeError as e:
        raise OnnxExportError(f"the example does not fit forward(): {e}") from e
    errors = []
    for strict in (False, True):
        try:
            program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=strict)
            break
        except Exception as e:  # noqa: BLE001 - any capture failure is reported, with its type
            errors.append(e)
    else:
        raise OnnxExportError(f"torch.export failed: {_summary(errors[0])}") from errors[0]
    try:
        onnx_program = torch.onnx.export(
            program,
            f=None,
            dynamo=True,
            opset_version=max(opset, _NATIVE_OPSET),
            input_names=input_names,
            output_names=output_names,
            optimize=True,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001
        raise OnnxExportError(f"ONNX translation failed: {_summary(e)}") from e
    if batch is not None:
        _name_batch_axis(onnx_program)
    proto = onnx_program.model_proto
    if opset < _NATIVE_OPSET:
        proto = _lower_to_opset_17(proto)
    return proto, f"strict={strict}"


def _name_batch_axis(onnx_program) -> None:
    import onnx_ir as ir

    symbols = {value.shape[0] for value in onnx_program.model.graph.inputs if value.shape and len(value.shape)}
    symbols = {s for s in symbols if isinstance(s, ir.SymbolicDim)}
    if len(symbols) == 1:
        onnx_program.rename_axes({symbols.pop(): "batch"})


def _lower_to_opset_17(proto):
    """Rewrite torchlib's opset-18 graph as opset 17, op by op (see the module docstring); raises OnnxExportError
    naming the node when an op uses an opset-18 feature that opset 17 cannot express."""
    constants = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            constants[node.output[0]] = node.attribute[0].t
    graphs = [proto.graph, *proto.functions]
    for node in (n for g in graphs for n in _all_nodes(g)):
        if node.domain not in ("", "ai.onnx"):
            continue
        problem = _lower_node(node, constants)
        if problem:
            raise OnnxExportError(
                f"{node.op_type} node {node.name!r} has no opset-17 form: {problem}; export with opset={_NATIVE_OPSET}"
            )
    for imports in [proto.opset_import, *(f.opset_import for f in proto.functions)]:
        for entry in imports:
            if entry.domain in ("", "ai.onnx"):
                entry.version = 17
    _drop_unused_constants(proto)
    return proto


def _lower_node(node, constants: dict) -> str | None:
    """Make one opset-18 node valid at opset 17 in place; the reason it cannot be, or None."""
    from onnx import helper, numpy_helper

    attrs = {a.name: a for a in node.attribute}
    op = node.op_type
    if op in _REDUCE_OPS_CHANGED_IN_18:
        axes = []
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                return "its axes are computed at run time (opset 17 takes them as an attribute)"
            axes = [int(a) for a in numpy_helper.to_array(constants[node.input[1]]).reshape(-1)]
            del node.input[1:]
        if "noop_with_empty_axes" in attrs:
            if attrs["noop_with_empty_axes"].i and not axes:
                return "noop_with_empty_axes=1 with no axes"
            node.attribute.remove(attrs["noop_with_empty_axes"])
        if axes:
            node.attribute.append(helper.make_attribute("axes", axes))
        return None
    if op == "Split":
        if "num_outputs" in attrs:  # Split-13 without a split input cuts into len(outputs) equal parts
            node.attribute.remove(attrs["num_outputs"])
        return None
    if op == "Pad":
        return "it pads along given axes" if len(node.input) > 3 and node.input[3] else None
    if op == "Resize":
        for name, default in (("antialias", 0), ("keep_aspect_ratio_policy", b"stretch")):
            if name in attrs and helper.get_attribute_value(attrs[name]) != default:
                return f"{name} is set"
            if name in attrs:
                node.attribute.remove(attrs[name])
        return "it resizes along given axes" if "axes" in attrs else None
    if op in ("ScatterElements", "ScatterND"):
        reduction = helper.get_attribute_value(attrs["reduction"]) if "reduction" in attrs else b"none"
        return f"reduction={reduction.decode()}" if reduction in (b"max", b"min") else None
    if op == "LpPool":
        if "ceil_mode" in attrs:
            if attrs["ceil_mode"].i:
                return "ceil_mode=1"
            node.attribute.remove(attrs["ceil_mode"])
        return None
    if op in _OPS_NEW_IN_18:
        return "the op is new in opset 18"
    return None


def _drop_unused_constants(proto) -> None:
    """Remove the initializers and Constant nodes that the axes moved to attributes left unused."""
    used = {name for g in [proto.graph, *proto.functions] for node in _all_nodes(g) for name in node.input}
    used |= {o.name for o in proto.graph.output}
    for tensor in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(tensor)
    for node in [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        proto.graph.node.remove(node)


def _all_nodes(graph) -> Iterator:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def _default_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _save(proto, path: str, data: str | None) -> None:
    """Write ``proto`` to ``path``; with ``data``, the weights go to that file (next to ``path``)."""
    import onnx

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if data is None:
        onnx.save_model(proto, path)
    else:
        location = os.path.basename(data)
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location)


# --- checks ------------------------------------------------------------------------------------------------------


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _run(session, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    feeds = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    inputs = {i.name: t.numpy() for i, t in zip(session.get_inputs(), feeds)}
    return [torch.from_numpy(out) for out in session.run(None, inputs)]


def _validate_file(path, deployed, trace_args, opset, dynamic_batch, atol) -> None:
    import onnx

    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        err = OnnxExportError(f"the exported graph is not valid ONNX: {_summary(e)}")
        raise _localized(err, deployed, trace_args, opset, dynamic_batch, atol) from e


def _check_fold(deployed, check_inputs, expected, atol, fold_report) -> None:
    with torch.no_grad():
        for b, xs in check_inputs.items():
            diff = _max_abs_diff(_tensors(deployed(*xs)), expected[b])
            if not diff <= atol:
                raise OnnxExportError(
                    f"export_onnx: folding batch norms changed the model's outputs by {diff:.3g} (> atol={atol}) at "
                    f"batch {b}; export with fold_bn=False, and report this. {fold_report}"
                )


def _check_file(path, deployed, check_inputs, expected, opset, dynamic_batch, atol) -> dict[int, float]:
    try:
        session = _session(path)
    except Exception as e:  # noqa: BLE001
        hint = (
            f" (opset {opset} is rewritten from opset {_NATIVE_OPSET}: try opset={_NATIVE_OPSET})" if opset < 18 else ""
        )
        err = OnnxExportError(f"onnxruntime cannot load the exported graph{hint}: {_summary(e)}")
        raise _localized(err, deployed, check_inputs[max(check_inputs)], opset, dynamic_batch, atol) from e
    diffs = {}
    for b, xs in check_inputs.items():
        diffs[b] = _max_abs_diff(_run(session, xs, {}), expected[b])
        if not diffs[b] <= atol:
            err = OnnxExportError(
                f"onnxruntime and PyTorch differ by {diffs[b]:.3g} (> atol={atol}) at batch {b}; the graph is wrong"
            )
            raise _localized(err, deployed, check_inputs[max(check_inputs)], opset, dynamic_batch, atol)
    return diffs


# --- finding the layer that fails ------------------------------------------------------------------------------


def _capture_inputs(model: nn.Module, args: tuple) -> dict[str, tuple[tuple, dict]]:
    """(args, kwargs) of the first call of every submodule in one forward pass, cloned."""
    captured: dict[str, tuple[tuple, dict]] = {}
    clone = lambda tree: pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tree)

    def hook_for(name):
        def hook(module, margs, mkwargs):
            captured.setdefault(name, (clone(margs), clone(mkwargs)))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(*args)
    except Exception:  # noqa: BLE001 - the inputs captured before the failure are still worth probing
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _roundtrip_error(module, args, kwargs, opset, batch, atol) -> str | None:
    """Why ``module`` alone does not round-trip through ONNX on these inputs, or None if it does."""
    try:
        proto, _ = _to_onnx(module, args, kwargs, opset, batch)
    except OnnxExportError as e:
        return str(e)
    import onnx

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        return f"its graph is not valid ONNX: {_summary(e)}"
    try:
        session = _session(proto.SerializeToString())
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime cannot load its graph: {_summary(e)}"
    try:
        with torch.no_grad():
            expected = _tensors(module(*copy.deepcopy(args), **copy.deepcopy(kwargs)))
    except Exception:  # noqa: BLE001 - not this module's export to blame
        return None
    try:
        diff = _max_abs_diff(_run(session, args, kwargs), expected)
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime cannot run its graph: {_summary(e)}"
    return None if diff <= atol else f"onnxruntime and PyTorch differ by {diff:.3g} (> atol={atol})"


def _find_culprit(model: nn.Module, captured: dict, fails: Callable) -> tuple[str, nn.Module, str | None]:
    """Top-down: the deepest submodule (name, module, reason) that ``fails`` on the inputs it received, descending
    into the first failing child at each level; the model itself when no child fails."""
    name, module, reason = "", model, None
    while True:
        for qualified, child in _called_children(module, name, captured):
            child_reason = fails(child, *captured[qualified])
            if child_reason is not None:
                name, module, reason = qualified, child, child_reason
                break
        else:
            return name, module, reason


def _called_children(module: nn.Module, prefix: str, captured: dict) -> Iterator[tuple[str, nn.Module]]:
    """The nearest descendants of ``module`` that were called, looking through containers never called themselves
    (ModuleList, ModuleDict)."""
    for child_name, child in module.named_children():
        qualified = f"{prefix}.{child_name}" if prefix else child_name
        if qualified in captured:
            yield qualified, child
        else:
            yield from _called_children(child, qualified, captured)


def _localized(err: OnnxExportError, model, args, opset, dynamic_batch, atol) -> OnnxExportError:
    captured = _capture_inputs(model, args)
    batch = _batch(args) if dynamic_batch and _batch(args) >= _MIN_TRACE_BATCH else None
    with _quiet():
        name, module, reason = _find_culprit(
            model, captured, lambda m, a, k: _roundtrip_error(m, a, k, opset, batch, atol)
        )
    if not name:
        return OnnxExportError(
            f"export_onnx: the model ({type(model).__name__}) cannot be exported to ONNX: {err}. No single "
            "submodule fails on its own: look at the model's own forward(), or at Python state that changes "
            "from call to call"
        )
    whole = "" if str(err) == reason else f" (the whole model: {err})"
    return OnnxExportError(
        f"export_onnx: layer {name!r} ({type(module).__name__}) cannot be exported to ONNX: {reason}{whole}"
    )


# --- command line ------------------------------------------------------------------------------------------------


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``"package.module:factory"`` -> the callable ``factory`` (a dotted attribute path is allowed after ':').

    Raises:
        ValueError: on a spec without ':', a module that cannot be imported, a missing or non-callable attribute.
    """
    return resolve_callable(spec, "MODEL", "'package.module:factory'")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"--input-shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``normlab export MODEL --onnx out.onnx ...`` to a ``parser.add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX (batch norms folded) and check it in onnxruntime",
        description="Export MODEL (a 'package.module:factory' called with no arguments) to ONNX in eval mode, "
        "fold its batch norms into the convolutions, and check the file in onnxruntime at batch 1 and 8.",
    )
    parser.add_argument("model", metavar="MODEL", help="'package.module:factory', called with no arguments")
    parser.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True, help="fold batch norms")
    parser.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="example input shape")
    parser.add_argument("--weights", metavar="FILE", help="a state_dict (torch.save) loaded with weights_only=True")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    parser.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True, help="check in onnxruntime")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest max abs difference the check accepts")
    parser.set_defaults(func=export_command)
    return parser


def export_command(args: argparse.Namespace) -> int:
    """Run ``normlab export``: print the report and return 0, or print the error and return 1."""
    try:
        model = load_factory(args.model)()
        if not isinstance(model, nn.Module):
            raise ValueError(f"normlab export: MODEL={args.model!r} returned {type(model).__name__}, not an nn.Module")
        if args.weights:
            load_weights(model, args.weights)
        example = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
        report = export_onnx(
            model,
            example,
            args.onnx,
            fold_bn=args.fold_bn,
            opset=args.opset,
            dynamic_batch=args.dynamic_batch,
            check=args.check,
            atol=args.atol,
        )
    except (ValueError, ImportError, OnnxExportError, OSError) as e:
        print(f"normlab export: error: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0
