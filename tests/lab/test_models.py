"""The lab's models: every norm spec of the studies builds, trains a step and evaluates; specs map to layers as
documented (GN groups, +ws convolutions, norms with their own activation); sequence models and task names."""

import pytest
import torch
from torch import nn

import normlab
from normlab.lab.models import (
    MLP,
    SEQUENCE_NORMS,
    TASKS,
    CNN1d,
    SequenceClassifier,
    SmallResNet,
    build_model,
    check_norm,
    default_num_groups,
)

# the batch-size study's norms (issue 5)
SPECS = ["bn", "brn", "mabn", "gn", "gn+ws", "ln", "in", "frn", "evo_s0", "online", "none"]


def _train_step_then_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward/backward in training mode (every parameter must get a finite gradient), then eval output."""
    model.train()
    out = model(x)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all()
    return y


@pytest.mark.parametrize("spec", SPECS)
def test_small_resnet_every_spec(spec):
    torch.manual_seed(0)
    model = SmallResNet(spec, widths=(16, 32, 64), blocks=(1, 1, 1))
    y = _train_step_then_eval(model, torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 10)


@pytest.mark.parametrize("spec", SPECS)
def test_cnn1d_every_spec(spec):
    torch.manual_seed(0)
    y = _train_step_then_eval(CNN1d(spec), torch.randn(3, 1, 40))
    assert y.shape == (3, 10)


@pytest.mark.parametrize("spec", [s for s in SPECS if s not in ("in", "gn+ws")])
def test_mlp_every_vector_spec(spec):
    torch.manual_seed(0)
    y = _train_step_then_eval(MLP(spec, in_features=8, hidden=(32, 16), num_classes=3), torch.randn(4, 8))
    assert y.shape == (4, 3)


def test_mlp_refuses_instance_norm_and_weight_standardization():
    with pytest.raises(ValueError, match=r"MLP: norm='in'.*InstanceNorm"):
        MLP("in", in_features=8)
    with pytest.raises(ValueError, match=r"MLP: norm='gn\+ws'.*convolutions"):
        MLP("gn+ws", in_features=8)


def test_mlp_batch_norm_is_batch_norm_over_features():
    torch.manual_seed(0)
    model = MLP("bn", in_features=5, hidden=(7,), num_classes=2)
    x = torch.randn(6, 5)
    h = model.features[0](x)
    ref = nn.functional.batch_norm(h, None, None, training=True, eps=model.features[1].norm.eps)
    torch.testing.assert_close(model.features[1](h), ref)


def test_gn_default_groups_follow_the_documented_rule():
    assert [default_num_groups(c) for c in (2, 3, 16, 32, 64, 128, 512, 40, 7)] == [1, 1, 8, 16, 32, 32, 32, 20, 1]
    model = SmallResNet("gn", widths=(16, 32, 64))
    groups = {m.num_features: m.num_groups for m in model.modules() if isinstance(m, normlab.GroupNorm)}
    assert groups == {16: 8, 32: 16, 64: 32}
    explicit = SmallResNet("gn:4", widths=(16, 32, 64))
    assert {m.num_groups for m in explicit.modules() if isinstance(m, normlab.GroupNorm)} == {4}
    per_group = SmallResNet("gn:gs8", widths=(16, 32, 64))
    assert {m.num_features // m.num_groups for m in per_group.modules() if isinstance(m, normlab.GroupNorm)} == {8}
    evo = CNN1d("evo_s0", widths=(16, 64))
    assert [m.num_groups for m in evo.modules() if isinstance(m, normlab.EvoNorm2dS0)] == [8, 32]


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_ws_suffix_builds_standardized_convolutions():
    ws = SmallResNet("gn+ws")
    assert _convs(ws) and all(isinstance(c, normlab.StdConv2d) for c in _convs(ws))
    assert any(isinstance(m, normlab.GroupNorm) for m in ws.modules())
    plain = SmallResNet("gn")
    assert not any(isinstance(c, normlab.StdConv2d) for c in _convs(plain))
    bn_ws = CNN1d("bn+ws")
    assert all(isinstance(c, normlab.StdConv2d) for c in _convs(bn_ws))
    assert any(isinstance(m, normlab.BatchNorm2d) for m in bn_ws.modules())
    # the conv factory switch works for any spec
    custom = SmallResNet("ln", conv_layer=normlab.StdConv2d)
    assert all(isinstance(c, normlab.StdConv2d) for c in _convs(custom))


def test_convs_have_a_bias_only_without_norm():
    assert all(c.bias is None for c in _convs(SmallResNet("bn")))
    assert all(c.bias is not None for c in _convs(SmallResNet("none")))


def test_norms_with_their_own_activation_replace_norm_and_relu():
    block = SmallResNet("frn").stages[0][0]
    assert isinstance(block.act1, nn.Identity) and block.norm1.tlu and not block.norm2.tlu
    evo_block = SmallResNet("evo_s0").stages[1][0]
    assert evo_block.norm1.nonlinearity and not evo_block.norm2.nonlinearity
    assert not evo_block.shortcut[1].nonlinearity  # the projected shortcut's norm: no activation before the sum
    bn_block = SmallResNet("bn").stages[0][0]
    assert isinstance(bn_block.act1, nn.ReLU)


def test_resnet_stages_and_zero_init_residual():
    model = SmallResNet("bn", widths=(8, 16), blocks=(2, 1), zero_init_residual=True)
    assert len(model.stages[0]) == 2 and len(model.stages[1]) == 1
    assert all(not b.norm2.weight.detach().any() for stage in model.stages for b in stage)
    assert model.fc.in_features == 16
    # a zero-initialised block is the identity followed by ReLU on its (non-negative) input
    block = model.stages[0][0].eval()
    x = torch.relu(torch.randn(2, 8, 6, 6))
    torch.testing.assert_close(block(x), x)


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = SmallResNet("gn+ws").state_dict()
    torch.manual_seed(3)
    b = SmallResNet("gn+ws").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("norm", SEQUENCE_NORMS)
def test_sequence_classifier_every_norm(kind, norm):
    torch.manual_seed(0)
    model = SequenceClassifier(kind, norm, input_size=1, hidden_size=8, num_layers=2, layout="ncl", max_steps=40)
    y = _train_step_then_eval(model, torch.randn(3, 1, 40))
    assert y.shape == (3, 10)
    with torch.no_grad():  # longer sequences than trained on (the rnn study's generalisation test)
        assert model(torch.randn(3, 1, 60)).shape == (3, 10)


def test_vertical_bn_is_batch_norm_between_layers_only():
    model = SequenceClassifier("lstm", "vertical_bn", input_size=1, hidden_size=8, num_layers=3)
    assert model.rnn.norm == "none"
    between = [m for n, m in model.rnn.named_children() if n.startswith("norm_between")]
    assert len(between) == 2 and all(isinstance(m, normlab.BatchNorm1d) for m in between)
    with pytest.raises(ValueError, match=r"vertical_bn.*num_layers=1 must be >= 2"):
        SequenceClassifier("lstm", "vertical_bn", input_size=1, num_layers=1)


def test_norm_between_layers_is_passed_through():
    model = SequenceClassifier("gru", "ln", input_size=4, hidden_size=8, num_layers=2, norm_between_layers="ln")
    assert isinstance(model.rnn.norm_between_l0, normlab.LayerNorm)


def test_sequence_layouts_read_the_same_sequence():
    torch.manual_seed(0)
    images = torch.randn(2, 1, 5, 7)
    rows = SequenceClassifier("lstm", "ln", input_size=7, hidden_size=6, layout="rows")
    ntf = SequenceClassifier("lstm", "ln", input_size=7, hidden_size=6, layout="ntf")
    ntf.load_state_dict(rows.state_dict())
    torch.testing.assert_close(rows(images), ntf(images[:, 0]))
    signal = torch.randn(2, 1, 9)
    ncl = SequenceClassifier("gru", "none", input_size=1, hidden_size=6, layout="ncl")
    as_steps = SequenceClassifier("gru", "none", input_size=1, hidden_size=6, layout="ntf")
    as_steps.load_state_dict(ncl.state_dict())
    torch.testing.assert_close(ncl(signal), as_steps(signal.transpose(1, 2)))


def test_sequence_classifier_classifies_from_the_last_step():
    torch.manual_seed(0)
    model = SequenceClassifier("lstm", "none", input_size=2, hidden_size=4)
    x = torch.randn(3, 6, 2)
    out, _ = model.rnn(x)
    torch.testing.assert_close(model(x), model.fc(out[:, -1]))


@pytest.mark.parametrize(
    "task,x",
    [
        ("fashion", torch.randn(2, 1, 28, 28)),
        ("mnist1d", torch.randn(2, 1, 40)),
        ("mnist1d-seq", torch.randn(2, 1, 40)),
        ("fashion-seq", torch.randn(2, 1, 28, 28)),
        ("stream-mlp", torch.randn(2, 12)),
    ],
)
def test_build_model_per_task(task, x):
    norm = "ln"
    kwargs = {"in_features": 12} if task == "stream-mlp" else {}
    if task.endswith("-seq"):
        kwargs["hidden_size"] = 8
    torch.manual_seed(0)
    model = build_model(task, norm, **kwargs)
    assert model(x).shape == (2, 10)
    assert set(TASKS) == {"fashion", "fashion-cnn", "mnist1d", "mnist1d-seq", "fashion-seq", "stream-mlp"}


def test_build_model_options_and_kinds():
    assert isinstance(build_model("fashion-seq", "ln", kind="gru", hidden_size=8).rnn, normlab.NormGRU)
    assert build_model("mnist1d-seq", "ln", hidden_size=8).rnn.num_layers == 2
    assert build_model("fashion", "bn", widths=(8, 8), blocks=(1, 1)).fc.in_features == 8


def test_unknown_task_and_norm_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"task.*'cifar'.*fashion"):
        build_model("cifar", "bn")
    with pytest.raises(ValueError, match=r"SmallResNet: norm='batchnrom'"):
        SmallResNet("batchnrom")
    with pytest.raises(ValueError, match=r"fashion: norm='gm\+ws'"):
        check_norm("fashion", "gm+ws")
    with pytest.raises(ValueError, match=r"mnist1d-seq.*'bn'.*bn_step"):
        check_norm("mnist1d-seq", "bn")
    with pytest.raises(ValueError, match=r"kind.*'rnn'"):
        SequenceClassifier("rnn", "ln")
    with pytest.raises(ValueError, match=r"layout.*'nlc'"):
        SequenceClassifier("lstm", "ln", layout="nlc")
    for task in TASKS:
        check_norm(task, "ln")


def test_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match=r"blocks=\(1, 1\) must have 3 entries"):
        SmallResNet("bn", blocks=(1, 1))
    with pytest.raises(ValueError, match=r"widths=\(\) must be a non-empty"):
        CNN1d("bn", widths=())
    with pytest.raises(ValueError, match=r"kernel_size=4 must be odd"):
        CNN1d("bn", kernel_size=4)
    with pytest.raises(ValueError, match=r"SmallResNet: expected input \(N, C, H, W\) with 1 channels, got shape"):
        SmallResNet("bn")(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"CNN1d: expected signals of length=40, got shape \(2, 1, 41\)"):
        CNN1d("bn")(torch.randn(2, 1, 41))
    with pytest.raises(ValueError, match=r"MLP: expected input \(N, F\) with 8 channels"):
        MLP("bn", in_features=8)(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"layout='rows' expects input .* got shape \(2, 28, 28\)"):
        SequenceClassifier("lstm", "ln", input_size=28, layout="rows")(torch.randn(2, 28, 28))


def test_small_cnn_layers_and_resolution():
    from normlab.lab.models import SmallCNN

    model = SmallCNN("bn", widths=(4, 8, 8, 16))
    norms = [m for m in model.modules() if isinstance(m, normlab.BatchNorm2d)]
    assert [n.num_features for n in norms] == [4, 8, 8, 16]
    seen = []
    norms[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen == [(2, 16, 3, 3)]  # 28 -> 14 -> 7 -> 3 positions a side
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert isinstance(SmallCNN("gn+ws").features[0], normlab.StdConv2d)
    with pytest.raises(ValueError, match="widths"):
        SmallCNN("bn", widths=())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        SmallCNN("bn")(torch.randn(2, 28, 28))


@pytest.mark.parametrize("norm", ["bn", "gn:32"])
def test_resnet50_fuses_relu_into_normlab_bn_and_gn_with_the_same_outputs(norm):
    from normlab.lab.models import ResNet50

    torch.manual_seed(0)
    plain = ResNet50(norm, num_classes=10, fuse_act=False)
    fused = ResNet50(norm, num_classes=10)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    act_norms = [m for m in fused.modules() if isinstance(m, (normlab.BatchNormAct2d, normlab.GroupNormAct))]
    assert len(act_norms) == 33 and all(m.act == "relu" for m in act_norms)  # stem + 2 per bottleneck
    assert not any(isinstance(m, (normlab.BatchNormAct2d, normlab.GroupNormAct)) for m in plain.modules())
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        plain.train(training)
        fused.train(training)
        torch.testing.assert_close(fused(x), plain(x))
    torch_bn = ResNet50(nn.BatchNorm2d, num_classes=10)
    assert not any(isinstance(m, normlab.BatchNormAct2d) for m in torch_bn.modules())
