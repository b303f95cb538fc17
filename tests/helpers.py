"""Helpers shared by the test modules: fixed output gradients, forward and backward runs, checks over lists of
tensors, memory formats and parameter initialization."""

import torch

from tests.tolerances import assert_close

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def grad_like(y: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random output gradient, the same for every implementation compared."""
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return g.to(device=y.device, dtype=y.dtype)


def forward_backward(fn, x, *params, g=None):
    """``fn(x, *params)`` on fresh leaves, back-propagated with output gradient ``g`` (default ``grad_like(y)``):
    ``[y, x.grad, *param_grads]``, with the gradient of each non-None parameter."""
    x = x.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    y = fn(x, *params)
    y.backward(grad_like(y) if g is None else g.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in params if p is not None]


def run(module, x):
    """Output, input gradient and parameter gradients of ``module`` at ``x`` (parameter gradients reset first)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_like(y))
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


def output_and_input_grad(module, x, g):
    """Forward and backward with output gradient ``g`` on a fresh leaf: (output, input grad). Parameter gradients
    accumulate across calls."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (y * g).sum().backward()
    return y, x.grad


def assert_same_step(ours, ref, x, g):
    """One forward and backward of both modules: outputs, input gradients and weight/bias gradients agree."""
    for a, b in zip(output_and_input_grad(ours, x, g), output_and_input_grad(ref, x, g), strict=True):
        assert_close(a, b)
    if ref.weight is not None:
        assert_close(ours.weight.grad, ref.weight.grad)
        assert_close(ours.bias.grad, ref.bias.grad)


def assert_same_training(ours, ref, shapes, scale=3.0, shift=1.0):
    """Several training steps: outputs, input/parameter gradients, running statistics and step counts agree."""
    for step, shape in enumerate(shapes):
        x, g = torch.randn(shape) * scale + shift + step, torch.randn(shape)
        assert_same_step(ours, ref, x, g)
        assert_close(ours.running_mean, ref.running_mean)
        assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


def assert_all_close(actual, expected, dtype=None, scale=1.0):
    """``assert_close`` pairwise over two equally long lists of tensors."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, dtype=dtype, scale=scale, msg=f"tensor {i}")


def randomize_affine(module):
    """Every parameter uniform in [-1.5, 1.5]."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1.5, 1.5)
    return module


def randomize_weight_and_bias(module):
    """weight uniform in [0.5, 1.5] and bias in [-0.5, 0.5], as after some training; nothing without affine."""
    if module.weight is not None:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
    return module


def seeded_randn(shape, dtype) -> torch.Tensor:
    """Standard normal values that depend only on the arguments (hypothesis examples must be reproducible)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def in_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()]) if channels_last else x


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` as given ("nchw") or channels-last ("channels_last"): channels_last(_3d) for 4-D / 5-D, (N, L, C)
    storage for 3-D."""
    if layout == "nchw":
        return x
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()])


def assert_same_memory_format(y: torch.Tensor, x: torch.Tensor):
    formats = [torch.contiguous_format] + ([CHANNELS_LAST[x.dim()]] if x.dim() in CHANNELS_LAST else [])
    assert [y.is_contiguous(memory_format=f) for f in formats] == [x.is_contiguous(memory_format=f) for f in formats]
