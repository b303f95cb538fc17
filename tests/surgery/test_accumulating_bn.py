import copy

import pytest
import torch
from torch import nn

import normlab
from tests.tolerances import assert_close

BNS = [
    pytest.param(lambda c, **kw: nn.BatchNorm2d(c, **kw), id="torch.BatchNorm2d"),
    pytest.param(lambda c, **kw: normlab.BatchNorm2d(c, **kw), id="normlab.BatchNorm2d"),
    pytest.param(lambda c, **kw: normlab.BatchRenorm2d(c, **kw), id="normlab.BatchRenorm2d"),
]


def _stream(rounds, batch, c=5):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(batch, c, 3, 4, generator=g) * (1 + r) + r for r in range(rounds)]


@pytest.mark.parametrize("make", BNS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_eight_micro_batches_of_four_equal_one_batch_of_32(make, momentum):
    acc_bn, big_bn = make(5, momentum=momentum), make(5, momentum=momentum)
    batches = _stream(3, 32)
    with normlab.accumulating_bn(acc_bn, steps=8) as acc:
        for x in batches:
            for micro in x.split(4):
                acc_bn(micro)
    for x in batches:
        big_bn(x)
    assert acc.updates == 3 and acc.tracked == [""]
    assert_close(acc_bn.running_mean, big_bn.running_mean)
    assert_close(acc_bn.running_var, big_bn.running_var)
    assert int(acc_bn.num_batches_tracked) == int(big_bn.num_batches_tracked) == 3
    assert acc_bn.momentum == momentum


def test_micro_batch_forward_outputs_are_unchanged():
    bn, ref = nn.BatchNorm2d(5), nn.BatchNorm2d(5)
    x = _stream(1, 8)[0]
    with normlab.accumulating_bn(bn, steps=2):
        outs = [bn(m) for m in x.split(4)]
    for out, m in zip(outs, x.split(4)):
        assert_close(out, ref(m))


def test_partial_group_is_applied_on_exit_and_hooks_removed():
    bn, ref = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    x = torch.randn(12, 3)
    with normlab.accumulating_bn(bn, steps=8) as acc:
        for m in x.split(4):
            bn(m)
        assert acc.updates == 0 and int(bn.num_batches_tracked) == 0
    ref(x)
    assert acc.updates == 1
    assert_close(bn.running_var, ref.running_var)
    assert not bn._forward_pre_hooks and not bn._forward_hooks
    bn(x)  # back to plain BatchNorm
    assert int(bn.num_batches_tracked) == 2


def test_state_restored_when_the_block_raises():
    bn = normlab.BatchNorm2d(3, momentum=0.3)
    with pytest.raises(RuntimeError, match="boom"), normlab.accumulating_bn(bn, steps=4):
        bn(torch.randn(2, 3, 2, 2))
        raise RuntimeError("boom")
    assert bn.momentum == 0.3 and not bn._forward_pre_hooks
    assert int(bn.num_batches_tracked) == 1  # the partial group was applied


def test_eval_forwards_are_untouched():
    bn = nn.BatchNorm2d(3).eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with normlab.accumulating_bn(bn, steps=2) as acc:
        for _ in range(4):
            bn(torch.randn(4, 3, 2, 2))
    assert acc.updates == 0
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k])


def test_model_tracks_batch_norms_and_skips_others_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        normlab.GhostBatchNorm2d(4, virtual_batch_size=2),
        nn.BatchNorm2d(4, track_running_stats=False),
        normlab.GroupNorm(4, num_groups=2),
    )
    with normlab.accumulating_bn(model, steps=2) as acc:
        for _ in range(2):
            model(torch.randn(4, 3, 5, 5))
    assert acc.tracked == ["1"]
    assert set(acc.skipped) == {"2", "3"}
    assert "ghost" in acc.skipped["2"].lower() and "track_running_stats" in acc.skipped["3"]
    assert int(model[1].num_batches_tracked) == 1


def test_first_batch_norm_of_a_network_matches_the_large_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6))
    big = copy.deepcopy(model)
    x = torch.randn(32, 3, 8, 8)
    with normlab.accumulating_bn(model, steps=4):
        for m in x.split(8):
            model(m)
    big(x)
    assert_close(model[1].running_var, big[1].running_var)
    assert_close(model[1].running_mean, big[1].running_mean)


def test_nonfinite_accumulated_batch_is_not_applied():
    bn = nn.BatchNorm1d(2)
    x = torch.randn(8, 2)
    x[0, 0] = float("nan")
    with normlab.accumulating_bn(bn, steps=2) as acc:
        for m in x.split(4):
            bn(m)
    assert acc.nonfinite == 1 and acc.updates == 0
    assert torch.equal(bn.running_mean, torch.zeros(2))


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match=rf"steps={steps!r} must be a positive integer"):
        with normlab.accumulating_bn(nn.BatchNorm1d(2), steps=steps):
            pass


@pytest.mark.parametrize("make", BNS[:2])
def test_gradients_inside_the_block_equal_plain_training(make):
    """(Not Batch Renorm: its r and d read the running statistics, which now change once per accumulated batch, as
    they would for the large batch.)"""
    bn, ref = make(5), make(5)
    x = _stream(1, 8)[0]
    with normlab.accumulating_bn(bn, steps=2):
        for m in x.split(4):
            bn(m).square().sum().backward()
    for m in x.split(4):
        ref(m).square().sum().backward()
    assert_close(bn.weight.grad, ref.weight.grad)
    assert_close(bn.bias.grad, ref.bias.grad)
