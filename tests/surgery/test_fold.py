import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normlab
from normlab.surgery import fold_bn, fold_bn_weights
from tests.surgery.models import ZOO, FrozenBatchNorm2d, build, example_input, randomize_batch_norms
from tests.tolerances import assert_close

SPATIAL = {
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
}


def _random_bn_state(c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(c, generator=g, dtype=dtype) * 2 - 1,  # running_mean
        torch.rand(c, generator=g, dtype=dtype) * 1.5 + 0.5,  # running_var
        torch.rand(c, generator=g, dtype=dtype) + 0.5,  # gamma
        torch.rand(c, generator=g, dtype=dtype) - 0.5,  # beta
    )


def _bn_eval(y, mean, var, gamma, beta, eps):
    return F.batch_norm(y, mean, var, gamma, beta, training=False, eps=eps)


# ----------------------------------------------------------------------------------------------- pure function


@pytest.mark.parametrize("cls", list(SPATIAL))
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("has_bias", [True, False])
def test_fold_weights_equals_conv_then_bn_in_float64(cls, groups, has_bias):
    layer = cls(4, 6, 3, groups=groups, bias=has_bias).double()
    x = torch.randn((2, 4) + (5,) * SPATIAL[cls], dtype=torch.float64)
    mean, var, gamma, beta = _random_bn_state(6)
    transpose = cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    w, b = fold_bn_weights(layer.weight, layer.bias, mean, var, gamma, beta, 1e-3, transpose=transpose, groups=groups)
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        folded.weight.copy_(w)
        folded.bias = nn.Parameter(b)
    assert_close(folded(x), _bn_eval(layer(x), mean, var, gamma, beta, 1e-3))


def test_fold_weights_linear_closed_form():
    w, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    mean, var, gamma, beta = _random_bn_state(5)
    fw, fb = fold_bn_weights(w, b, mean, var, gamma, beta, 1e-5)
    scale = gamma / torch.sqrt(var + 1e-5)
    assert_close(fw, w * scale[:, None])
    assert_close(fb, (b - mean) * scale + beta)


@given(
    groups=st.sampled_from([1, 2, 3]),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 4),
)
def test_fold_weights_transposed_groups_closed_form(groups, in_per_group, out_per_group):
    # output channel g * out_per_group + j is column j of the rows of group g
    cin, cout = groups * in_per_group, groups * out_per_group
    w = torch.randn(cin, out_per_group, 2, 2, dtype=torch.float64)
    mean, var, gamma, beta = _random_bn_state(cout)
    fw, fb = fold_bn_weights(w, None, mean, var, gamma, beta, 1e-5, transpose=True, groups=groups)
    scale = gamma / torch.sqrt(var + 1e-5)
    expected = w.clone()
    for row in range(cin):
        g = row // in_per_group
        for j in range(out_per_group):
            expected[row, j] *= scale[g * out_per_group + j]
    assert_close(fw, expected)
    assert_close(fb, beta - mean * scale)


def test_fold_weights_defaults_are_identity_affine():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    mean, var, _, _ = _random_bn_state(3)
    fw, fb = fold_bn_weights(w, None, mean, var, eps=0.0)
    assert_close(fw, w / var.sqrt()[:, None, None, None])
    assert_close(fb, -mean / var.sqrt())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fold_weights_keeps_dtype_and_channels_last(dtype):
    w = torch.randn(8, 3, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    mean, var, gamma, beta = _random_bn_state(8, torch.float32)
    fw, fb = fold_bn_weights(w, None, mean, var, gamma, beta)
    assert fw.dtype == fb.dtype == dtype
    assert fw.is_contiguous(memory_format=torch.channels_last) and not fw.is_contiguous()
    # computed in float32 and rounded once: matches the float64 result to the dtype's tolerance
    ref_w, _ = fold_bn_weights(w.double(), None, mean.double(), var.double(), gamma.double(), beta.double())
    assert_close(fw, ref_w, scale=1)


def test_fold_weights_bad_arguments():
    w = torch.randn(4, 2, 3, 3)
    stats = torch.zeros(5), torch.ones(5)
    with pytest.raises(ValueError, match=r"fold_bn_weights: running_mean and running_var must have shape \(4,\)"):
        fold_bn_weights(w, None, *stats)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        fold_bn_weights(w, None, torch.zeros(6), torch.ones(6), transpose=True, groups=3)
    with pytest.raises(ValueError, match="groups=0 must be a positive integer"):
        fold_bn_weights(w, None, torch.zeros(4), torch.ones(4), groups=0)


# ------------------------------------------------------------------------------------------------- fold_bn


def _prepared(name, dtype=torch.float32):
    return randomize_batch_norms(build(name)).to(dtype).eval()


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_zoo_model_folds_to_the_same_function(name, dtype):
    model = _prepared(name, dtype)
    x = example_input(name, dtype)
    expected = model(x)
    convs_before = {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    folded, report = fold_bn(model)
    assert folded is model and type(folded) is type(build(name))
    assert_close(folded(x), expected)
    bns_left = [n for n, m in folded.named_modules() if normlab.surgery._match.is_batch_norm(m)]
    if name == "untraceable":
        assert bns_left == ["tail_bn"] and [s.name for s in report.skipped] == ["tail_bn"]
        assert "does not trace with torch.fx" in report.notes[0]
    else:
        assert bns_left == [] and report.skipped == []
        assert report.notes == ["pairs found by torch.fx symbolic tracing"]
    assert len(report.changed) == sum(isinstance(m, nn.Identity) for m in folded.modules())
    for n, weight in convs_before.items():  # folded in place: the same Parameter objects
        assert folded.get_submodule(n).weight is weight
    assert all(not m.training for m in folded.modules())


def test_float64_fold_is_much_tighter_than_float32():
    model = _prepared("resnet", torch.float64)
    x = example_input("resnet", torch.float64)
    expected = model(x)
    folded, _ = fold_bn(model)
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


def test_report_names_the_folded_pairs():
    model = _prepared("resnet")
    _, report = fold_bn(model)
    notes = {c.name: c.note for c in report.changed}
    assert notes["bn1"] == "folded into conv1 (Conv2d); bias added"
    assert notes["layer2.0.downsample.1"] == "folded into layer2.0.downsample.0 (Conv2d); bias added"
    assert report.changed[0].after == "Identity()"


def test_conv_without_bias_gets_a_trainable_bias_and_conv_with_bias_keeps_it():
    model = _prepared("conv_bn_relu")
    bias = model[0].bias
    fold_bn(model)
    assert model[0].bias is bias
    assert isinstance(model[3].bias, nn.Parameter) and model[3].bias.requires_grad
    assert model[3].bias.dtype == model[3].weight.dtype


def test_channels_last_weights_and_dtype_are_preserved():
    model = _prepared("conv_bn_relu", torch.float64).to(memory_format=torch.channels_last)
    x = example_input("conv_bn_relu", torch.float64).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    fold_bn(model)
    for conv in (model[0], model[3]):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        assert conv.weight.dtype == conv.bias.dtype == torch.float64
    assert_close(model(x), expected)


@pytest.mark.parametrize(
    "make_bn",
    [
        pytest.param(lambda c: normlab.BatchNorm2d(c), id="normlab.BatchNorm2d"),
        pytest.param(lambda c: normlab.GhostBatchNorm2d(c, virtual_batch_size=2), id="GhostBatchNorm2d"),
        pytest.param(lambda c: normlab.BatchRenorm2d(c), id="BatchRenorm2d"),
        pytest.param(lambda c: normlab.FrozenBatchNorm2d(c), id="normlab.FrozenBatchNorm2d"),
        pytest.param(FrozenBatchNorm2d, id="torchvision-style FrozenBatchNorm2d"),
        pytest.param(lambda c: nn.SyncBatchNorm(c), id="SyncBatchNorm"),
    ],
)
def test_batch_norms_of_every_origin_fold(make_bn):
    model = randomize_batch_norms(build("resnet", make_bn)).eval()
    x = example_input("resnet")
    expected = model(x)
    _, report = fold_bn(model)
    assert len(report.changed) == 6 and report.skipped == []
    assert_close(model(x), expected)


def test_training_mode_is_refused_before_anything_changes():
    model = randomize_batch_norms(build("conv_bn_relu"))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"fold_bn: model Sequential is in training mode.*model.eval\(\)"):
        fold_bn(model)
    model.eval()
    model[4].train()
    with pytest.raises(RuntimeError, match="fold_bn: batch norm 4 is in training mode"):
        fold_bn(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.BatchNorm2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("train", [False, True])
def test_model_without_batch_norm_gives_a_clean_report(train):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)).train(train)
    state = copy.deepcopy(model.state_dict())
    folded, report = fold_bn(model)
    assert folded is model and report.changed == [] and report.skipped == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _Residual(nn.Module):
    """conv -> bn, but the conv's output also feeds the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn2(self.conv(x * 2))


@pytest.mark.parametrize(
    "model, name, reason",
    [
        (_Residual(), "bn", "the output of conv is also used elsewhere (add())"),
        (_Twice(), "bn", "conv is called more than once in forward"),
        (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)), "0", "no preceding conv or linear: its input is the "),
        (nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)), "2", "its input is 1 (ReLU)"),
        (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)), "1", "track_running_stats"),
        (nn.Sequential(normlab.StdConv2d(3, 3, 1), nn.BatchNorm2d(3)), "1", "StdConv2d overrides forward"),
        (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)), "2", "its input is 1 (BatchNorm2d)"),
    ],
    ids=["output-used-elsewhere", "conv-called-twice", "first", "after-relu", "no-stats", "stdconv", "bn-after-bn"],
)
def test_unfoldable_batch_norms_are_reported_with_the_reason(model, name, reason):
    model = randomize_batch_norms(model).eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    _, report = fold_bn(model)
    skipped = {s.name: s.reason for s in report.skipped}
    assert reason in skipped[name]
    assert_close(model(x), expected)


def test_shared_conv_weight_is_not_folded():
    conv_a, conv_b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    conv_b.weight = conv_a.weight
    model = randomize_batch_norms(nn.Sequential(conv_a, nn.BatchNorm2d(3), conv_b)).eval()
    _, report = fold_bn(model)
    assert report.changed == [] and "its weight is shared (0.weight, 2.weight)" in report.skipped[0].reason


def test_include_exclude():
    model = _prepared("resnet")
    x = example_input("resnet")
    expected = model(x)
    _, report = fold_bn(model, include="layer*", exclude="*.downsample.*")
    assert sorted(c.name for c in report.changed) == ["layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2"]
    assert {s.name: s.reason for s in report.skipped} == {
        "bn1": "not selected by include/exclude",
        "layer2.0.downsample.1": "not selected by include/exclude",
    }
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert_close(model(x), expected)


def test_untraceable_model_folds_the_pairs_inside_its_traceable_parts():
    model = _prepared("untraceable")
    _, report = fold_bn(model)
    assert [c.name for c in report.changed] == ["body.1", "body.4"]
    assert report.skipped[0].reason == (
        "its forward does not trace with torch.fx, nor does a submodule that holds it and the layer before it"
    )
    assert "TraceError" in report.notes[0] and "submodules that trace" in report.notes[0]


class _Checked(nn.Module):
    """A model whose forward validates its input in Python (untraceable), around blocks that trace, one of which does
    not trace either but holds a Sequential and a traceable block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
        self.inner = _Inner()
        self.head = nn.Conv2d(4, 4, 1)
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("3 channels")
        return self.head_bn(self.head(self.inner(self.stem(x))))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: does not trace
            return x
        return self.block(self.seq(x))


def _randomized_eval(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_untraceable_models_are_traced_part_by_part():
    model = _randomized_eval(_Checked())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    folded, report = fold_bn(model)
    assert sorted(c.name for c in report.changed) == ["inner.block.1", "inner.seq.1", "stem.1.0"]
    assert [s.name for s in report.skipped] == ["head_bn"]  # its pair is split by the untraced root forward
    assert_close(folded(x), expected)


def test_part_by_part_refuses_a_layer_registered_twice():
    model = _randomized_eval(_Checked())
    model.alias = model.inner.seq[0]  # the untraced root could call it directly
    _, report = fold_bn(model)
    assert "inner.seq.1" not in [c.name for c in report.changed]
    assert "registered under several names" in {s.name: s.reason for s in report.skipped}["inner.seq.1"]


def test_root_batch_norm_is_skipped():
    bn = nn.BatchNorm2d(3).eval()
    model, report = fold_bn(bn)
    assert model is bn and report.skipped[0].name == "(root)" and "nothing precedes it" in report.skipped[0].reason


def test_timm_resnet18():
    timm = pytest.importorskip("timm")
    model = randomize_batch_norms(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    _, report = fold_bn(model)
    assert len(report.changed) == 20 and report.skipped == []
    assert_close(model(x), expected, scale=10)
