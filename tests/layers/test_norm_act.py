import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab import kernels
from tests.helpers import assert_all_close, in_format, randomize_affine, run
from tests.tolerances import assert_close

ACTS = {"relu": F.relu, "silu": F.silu, "none": lambda y: y}


def _pair(kind, act):
    if kind == "bn":
        fused, plain = normlab.BatchNormAct2d(6, act=act), normlab.BatchNorm2d(6)
    else:
        fused, plain = normlab.GroupNormAct(6, num_groups=3, act=act), normlab.GroupNorm(6, num_groups=3)
    randomize_affine(plain)
    fused.load_state_dict(plain.state_dict())  # the same state_dict: the two are interchangeable
    return fused, plain


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@pytest.mark.parametrize("act", ["relu", "silu", "none"])
@pytest.mark.parametrize("kind", ["bn", "gn"])
@pytest.mark.parametrize("training", [True, False])
def test_norm_act_equals_norm_then_activation(kind, act, backend, training):
    fused, plain = _pair(kind, act)
    fused.train(training)
    plain.train(training)
    x = in_format(torch.randn(4, 6, 5, 3), channels_last=True)
    with kernels.use_backend(backend):
        got = run(fused, x)
    with kernels.use_backend("reference"):
        plain_act = torch.nn.Sequential(plain, torch.nn.Identity())
        plain_act.forward = lambda t: ACTS[act](plain(t))
        expected = run(plain_act, x)
    assert_all_close(got, expected)
    if kind == "bn":
        assert_all_close([fused.running_mean, fused.running_var], [plain.running_mean, plain.running_var])


def test_the_triton_kernel_receives_the_activation(monkeypatch):
    seen = {}
    original = kernels._triton_ops.group_norm

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels._triton_ops, "group_norm", spy)
    fused = normlab.GroupNormAct(4, num_groups=2, act="silu")
    with kernels.use_backend("triton"):
        fused(torch.randn(2, 4, 3, 3))
    assert seen == {"act": "silu"}
    seen.clear()
    with kernels.use_backend("reference"):
        fused(torch.randn(2, 4, 3, 3))
    assert seen == {}


def test_activation_of_a_kernel_without_fusion_runs_after_it():
    x = torch.randn(2, 4, 3, 3)
    y = kernels.call("filter_response_norm", x, backend="triton", act="relu")
    assert "filter_response_norm" not in kernels._triton_ops.FUSES_ACT and (y >= 0).all()
    assert_close(y, F.relu(normlab.functional.filter_response_norm(x)))


@pytest.mark.parametrize("cls", [normlab.BatchNormAct2d, normlab.GroupNormAct])
def test_unknown_activation_is_refused(cls):
    with pytest.raises(ValueError, match="act 'gelu'"):
        cls(8, act="gelu") if cls is normlab.BatchNormAct2d else cls(8, num_groups=2, act="gelu")
    with pytest.raises(ValueError, match="unknown act 'tanh'"):
        kernels.call("group_norm", torch.randn(2, 4, 3), 2, act="tanh")


def test_repr_names_the_activation():
    assert "act=silu" in repr(normlab.BatchNormAct2d(4, act="silu"))
    assert "act=relu" in repr(normlab.GroupNormAct(4, num_groups=2))
