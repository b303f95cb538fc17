"""Calls that need no gradient (torch.no_grad, inputs and parameters without requires_grad) run the kernels' forward
directly, without their autograd.Function, and compute what the autograd path computes."""

import pytest
import torch

pytest.importorskip("normlab.kernels.triton_ops")

from normlab.kernels import batch_norm, channel_norm, frn, group_norm  # noqa: E402

C = 6
FUNCTIONS = {  # op -> (its eager autograd.Function, a call on x and per-channel parameters w, b)
    "group_norm": (group_norm._GroupStatsNorm, lambda x, w, b: group_norm.group_norm(x, 3, w, b)),
    "layer_norm2d": (channel_norm._ChannelNorm, lambda x, w, b: channel_norm.layer_norm2d(x, w, b)),
    "filter_response_norm": (frn._FilterResponseNorm, lambda x, w, b: frn.filter_response_norm(x, w, b)),
    "frozen_batch_norm": (
        batch_norm._BatchNormAffine,
        lambda x, w, b: batch_norm.frozen_batch_norm(x, torch.zeros(C), torch.ones(C), w, b),
    ),
    "batch_norm (train)": (
        batch_norm._BatchNormTrain,
        lambda x, w, b: batch_norm.batch_norm(x, torch.zeros(C), torch.ones(C), w, b, training=True),
    ),
}


def _refuse(*args):
    raise AssertionError("autograd.Function.apply called")


@pytest.mark.parametrize("op", FUNCTIONS)
def test_no_grad_calls_skip_the_autograd_function(op, monkeypatch):
    function, call = FUNCTIONS[op]
    x = torch.randn(2, C, 3, 4).requires_grad_()
    w, b = (torch.randn(C).requires_grad_() for _ in range(2))
    y_autograd = call(x, w, b)
    assert y_autograd.grad_fn is not None
    monkeypatch.setattr(function, "apply", _refuse)
    with torch.no_grad():
        y = call(x, w, b)
    assert y.grad_fn is None
    torch.testing.assert_close(y, y_autograd.detach(), rtol=0, atol=0)
    y = call(x.detach(), w.detach(), b.detach())  # grad mode on, nothing requires grad
    torch.testing.assert_close(y, y_autograd.detach(), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="apply called"):  # a gradient needed: the Function runs
        call(x, w, b)


def test_no_grad_batch_norm_training_updates_the_running_statistics_alike():
    x = torch.randn(4, C, 3, 3) * 2 + 1
    buffers = []
    for grad in (True, False):
        running = torch.zeros(C), torch.ones(C)
        with torch.set_grad_enabled(grad):
            batch_norm.batch_norm(x.requires_grad_(grad), *running, training=True, momentum=0.3)
        buffers.append(running)
    for with_grad, without in zip(*buffers):
        torch.testing.assert_close(without, with_grad, rtol=0, atol=0)
    assert not torch.equal(buffers[0][0], torch.zeros(C))
