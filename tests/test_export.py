"""ONNX export (normlab.export): every factory layer round-trips through onnxruntime at batch 1 and 8; batch-norm
folding changes the graph, not the numbers; a layer that cannot export is named; the ``normlab export`` command."""

import argparse
import copy
import inspect

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import normlab
from normlab.export import OnnxExportError, add_export_parser, export_onnx
from normlab.layers.centered_conv import CenteredConv2d
from normlab.layers.group_norm import GroupNorm
from normlab.surgery._match import is_batch_norm
from tests.layers.test_all_layers import C, make, randomize

ATOL = 1e-4  # max abs difference between onnxruntime and PyTorch
SPECS = normlab.list_norms()
CONVS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
SPATIAL = {2: (), 3: (7,), 4: (5, 6), 5: (3, 4, 5)}


class NormModel(nn.Module):
    """A tiny conv (a Linear for norms of 2-D input only) -> norm -> ReLU. A norm whose forward requires more than
    the input (RecurrentBatchNorm1d's time step) gets 0 for each further argument."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        dims = getattr(norm, "_input_dims", (4,))
        self.rank = 4 if 4 in dims else dims[-1]
        self.first = nn.Linear(3, C) if self.rank == 2 else CONVS[self.rank](3, C, 3, padding=1)
        self.norm = norm
        params = list(inspect.signature(norm.forward).parameters.values())[1:]
        self.extra = [0 for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL]

    def forward(self, x):
        return torch.relu(self.norm(self.first(x), *self.extra))

    def example(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, *SPATIAL[self.rank])


class Zoo(nn.Module):
    """One NormModel per spec, side by side: one export covers every layer. Takes one input per rank in use. (A
    ModuleList, not a ModuleDict keyed by spec: torch.export's generated code cannot name a module "in".)"""

    def __init__(self, specs) -> None:
        super().__init__()
        self.specs = list(specs)
        self.branches = nn.ModuleList(NormModel(randomize(make(spec))) for spec in self.specs)
        self.ranks = sorted({branch.rank for branch in self.branches})
        self.input_index = [self.ranks.index(branch.rank) for branch in self.branches]

    def forward(self, *xs):
        # plain indexing, so that torch.fx traces it and fold_bn finds the conv -> batch norm pairs
        return tuple(branch(xs[i]) for branch, i in zip(self.branches, self.input_index))

    def example(self, batch: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(batch, 3, *SPATIAL[rank]) for rank in self.ranks)


def onnxruntime_outputs(path, *xs: torch.Tensor) -> list[torch.Tensor]:
    """The file's outputs at ``xs``, from a session of our own (not the one export_onnx checked with)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)}
    return [torch.from_numpy(y) for y in session.run(None, feeds)]


def outputs_at_batch_1_and_8(zoo: Zoo, *paths) -> dict[int, tuple[list[torch.Tensor], ...]]:
    """{batch: (PyTorch's outputs, then each file's)} on the same random inputs."""
    outputs = {}
    for batch in (1, 8):
        xs = zoo.example(batch)
        with torch.no_grad():
            expected = list(zoo.eval()(*xs))
        outputs[batch] = (expected, *(onnxruntime_outputs(path, *xs) for path in paths))
    return outputs


@pytest.fixture(scope="module")
def zoo_export(tmp_path_factory):
    """Every factory layer in one model (random statistics and affine), exported without folding, so that each
    layer's own graph is what runs."""
    torch.manual_seed(0)
    zoo = Zoo(SPECS).eval()
    report = export_onnx(zoo, zoo.example(2), tmp_path_factory.mktemp("zoo") / "zoo.onnx", fold_bn=False)
    return zoo, report, outputs_at_batch_1_and_8(zoo, report.path)


def test_every_registered_norm_is_covered():
    assert len(SPECS) >= 20 and "gn" in SPECS


def test_zoo_export_report(zoo_export):
    _, report, _ = zoo_export
    assert sorted(report.max_abs_diff) == [1, 8] and max(report.max_abs_diff.values()) <= ATOL
    assert report.opset == 17 and report.dynamic_batch and report.fold is None
    assert report.input_names == [f"input{i}" for i in range(len(report.input_names))]


@pytest.mark.parametrize("spec", SPECS)
def test_every_layer_round_trips_through_onnxruntime(spec, zoo_export):
    zoo, _, outputs = zoo_export
    i = zoo.specs.index(spec)
    for batch, (expected, actual) in outputs.items():
        assert expected[i].shape[0] == batch
        torch.testing.assert_close(actual[i], expected[i], rtol=0, atol=ATOL, msg=f"{spec}, batch {batch}")


def test_weight_transforming_convs_export_with_a_fixed_batch(tmp_path):
    model = nn.Sequential(
        normlab.StdConv2d(3, 8, 3, padding=1),
        randomize(normlab.BatchNorm2d(8)),
        nn.ReLU(),
        normlab.ScaledStdConv2d(8, 4, 3, gamma=1.7),
        randomize(GroupNorm(4, num_groups=2)),
        CenteredConv2d(4, 4, 3, padding=1),
    ).eval()
    x = torch.randn(3, 3, 6, 7)
    path = tmp_path / "std.onnx"
    report = export_onnx(model, x, path, dynamic_batch=False)
    assert list(report.max_abs_diff) == [3] and report.max_abs_diff[3] <= ATOL
    # StdConv2d standardizes its weight in forward: the batch norm after it must not be folded into it
    assert [s.name for s in report.fold.skipped] == ["1"] and not report.fold.changed
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 3, 6, 7]
    with torch.no_grad():
        torch.testing.assert_close(onnxruntime_outputs(path, x)[0], model(x), rtol=0, atol=ATOL)


BN_SPECS = [spec for spec in SPECS if is_batch_norm(make(spec))]


@pytest.fixture(scope="module")
def bn_zoo_exports(tmp_path_factory):
    """Every batch-norm spec after a conv, passed in training mode, exported with and without folding."""
    torch.manual_seed(0)
    zoo = Zoo(BN_SPECS).train()
    before = {k: v.clone() for k, v in zoo.state_dict().items()}
    folder = tmp_path_factory.mktemp("fold")
    folded = export_onnx(zoo, zoo.example(2), folder / "folded.onnx", fold_bn=True)
    plain = export_onnx(zoo, zoo.example(2), folder / "plain.onnx", fold_bn=False)
    outputs = outputs_at_batch_1_and_8(copy.deepcopy(zoo), folded.path, plain.path)
    return zoo, before, folded, plain, outputs


def test_export_leaves_the_model_unchanged(bn_zoo_exports):
    zoo, before, folded, _, _ = bn_zoo_exports
    assert all(m.training for m in zoo.modules())
    assert [type(branch.norm) for branch in zoo.branches] == [type(make(spec)) for spec in BN_SPECS]
    for key, value in zoo.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any("training mode" in note for note in folded.notes)


def test_fold_bn_true_and_false_give_the_same_numbers(bn_zoo_exports):
    _, _, folded, plain, outputs = bn_zoo_exports
    assert [c.name for c in folded.fold.changed] == [f"branches.{i}.norm" for i in range(len(BN_SPECS))]
    assert plain.fold is None
    for batch, (expected, with_fold, without_fold) in outputs.items():
        for spec, e, a, b in zip(BN_SPECS, expected, with_fold, without_fold, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=f"{spec}, batch {batch}")
            torch.testing.assert_close(a, e, rtol=0, atol=ATOL, msg=f"{spec}, batch {batch}")


def _ops_after_conv(path) -> list[str]:
    graph = onnx.load(str(path)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    return [n.op_type for n in graph.node if n.op_type != "Relu" and any(producer.get(i) == "Conv" for i in n.input)]


def test_folded_graph_has_no_normalization_after_a_conv(bn_zoo_exports):
    _, _, folded, plain, _ = bn_zoo_exports
    assert "BatchNormalization" not in folded.op_counts
    assert _ops_after_conv(folded.path) == []
    # without folding, the frozen batch norms are still there as a Mul and an Add on the conv's output
    assert "Mul" in _ops_after_conv(plain.path)


class DataDependentBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


class LoopOverBatch(nn.Module):
    """torch.onnx.export given this model would silently fix the batch size at the example's."""

    def forward(self, x):
        return torch.stack([x[i] * (i + 1) for i in range(x.shape[0])])


class ExportOnlyPath(nn.Module):
    """A layer whose traced graph computes something else than its eager forward (as a wrong symbolic would):
    the export succeeds and only the numerical check can tell."""

    def forward(self, x):
        return x if torch.compiler.is_exporting() else 2 * x


@pytest.mark.parametrize(
    "bad, what",
    [
        (DataDependentBranch, "torch.export failed: .*data-dependent"),
        (LoopOverBatch, "torch.export failed: .*specialized it to be a constant"),
        (ExportOnlyPath, "onnxruntime and PyTorch differ by"),
    ],
)
def test_a_layer_that_cannot_export_is_named(bad, what, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bad(), nn.ReLU()).eval()
    with pytest.raises(OnnxExportError, match=rf"layer '1' \({bad.__name__}\) cannot be exported to ONNX: {what}"):
        export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing left that looks like an exported model


class ChunkMean(nn.Module):
    """torch.chunk and a mean: opset 18's Split(num_outputs) and ReduceMean(axes as an input)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return a.mean((2, 3), keepdim=True) * b


def test_opset_17_rewrites_the_ops_changed_in_opset_18(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ChunkMean()).eval()
    report = export_onnx(model, torch.randn(2, 3, 4, 5), tmp_path / "m.onnx", fold_bn=False)
    assert report.opset == 17 and max(report.max_abs_diff.values()) <= ATOL
    proto = onnx.load(str(tmp_path / "m.onnx"))
    nodes = {n.op_type: n for n in proto.graph.node}
    assert "num_outputs" not in [a.name for a in nodes["Split"].attribute]
    reduce_mean = nodes["ReduceMean"]
    assert len(reduce_mean.input) == 1 and onnx.helper.get_attribute_value(reduce_mean.attribute[-1]) == [2, 3]
    onnx.checker.check_model(proto, full_check=True)


def opset_18_model(node: onnx.NodeProto) -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    axes = onnx.helper.make_tensor_value_info("axes", onnx.TensorProto.INT64, [1])
    graph = onnx.helper.make_graph([node], "g", [x, axes], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "node, reason",
    [
        (onnx.helper.make_node("Mish", ["x"], ["y"], name="m"), "the op is new in opset 18"),
        (onnx.helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="m"), "its axes are computed at run time"),
        (onnx.helper.make_node("Pad", ["x", "axes", "", "axes"], ["y"], name="m"), "it pads along given axes"),
    ],
)
def test_opset_18_features_without_an_opset_17_form_are_refused(node, reason):
    from normlab.export import _lower_to_opset_17

    with pytest.raises(OnnxExportError, match=rf"{node.op_type} node 'm' has no opset-17 form: {reason}.*opset=18"):
        _lower_to_opset_17(opset_18_model(node))


def test_bad_arguments_raise():
    model = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"opset=16 must be an int >= 17"):
        export_onnx(model, x, "unused.onnx", opset=16)
    with pytest.raises(ValueError, match=r"example=list must be a tensor"):
        export_onnx(model, [x], "unused.onnx")
    with pytest.raises(ValueError, match=r"must share a batch size"):
        export_onnx(model, (x, torch.randn(3, 1)), "unused.onnx")
    with pytest.raises(ValueError, match=r"atol=0 must be > 0"):
        export_onnx(model, x, "unused.onnx", atol=0)


def tiny_factory() -> nn.Module:
    """The model factory the CLI test imports as ``tests.test_export:tiny_factory``."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), normlab.BatchNorm2d(4), nn.ReLU())


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="normlab")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_exports_a_factory_model_with_weights(tmp_path, capsys):
    trained = tiny_factory()
    randomize(trained[1])
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "tiny.onnx"
    argv = ["export", "tests.test_export:tiny_factory", "--onnx", str(out), "--input-shape", "1,3,8,8"]
    assert run_cli([*argv, "--weights", str(tmp_path / "weights.pt"), "--opset", "18"]) == 0
    printed = capsys.readouterr().out
    assert "fold_bn: 1 changed" in printed and "at batch 8: max abs diff" in printed
    assert onnx.load(str(out)).opset_import[0].version == 18
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(onnxruntime_outputs(out, x)[0], trained.eval()(x), rtol=0, atol=ATOL)


def test_cli_options_and_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="normlab")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", "m:f", "--onnx", "o.onnx", "--no-fold-bn", "--input-shape", "2,4"])
    assert args.fold_bn is False and args.input_shape == (2, 4) and args.check and args.dynamic_batch
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "m:f", "--onnx", "o.onnx", "--input-shape", "1,x"])
    assert run_cli(["export", "tests.test_export:no_such_factory", "--onnx", str(tmp_path / "o.onnx")]) == 1
    assert "has no attribute 'no_such_factory'" in capsys.readouterr().err
    assert run_cli(["export", "tests.test_export", "--onnx", str(tmp_path / "o.onnx")]) == 1
    assert "is not of an accepted form: 'package.module:factory'" in capsys.readouterr().err
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    argv = ["export", "tests.test_export:tiny_factory", "--onnx", str(tmp_path / "o.onnx")]
    assert run_cli([*argv, "--weights", str(tmp_path / "wrong.pt")]) == 1
    assert "does not fit the model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "wrong.pt"]
