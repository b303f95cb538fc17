"""A whole ResNet-50 through the Triton kernels (Triton's interpreter on CPU) equals the reference backend: the
kernels compose (layouts handed from layer to layer, fused ReLU, BatchNorm's fused NaN guard, running statistics,
backward through 53 norms). In float64, so that the comparison is not lost in the chaotic amplification of float32
rounding by batch statistics over few values (the last stage sees 1x1 maps)."""

import copy

import pytest
import torch

import normlab
from normlab import kernels
from normlab.lab.models import ResNet50

pytest.importorskip("normlab.kernels.triton_ops")


def _step(model, x, backend):
    with kernels.use_backend(backend):
        model.train()
        y = model(x)
        y.square().mean().backward()
        model.eval()
        y_eval = model(x)
    grads = [p.grad for p in model.parameters()]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return y.detach(), y_eval.detach(), grads, buffers


@pytest.mark.parametrize("norm", ["bn", "gn:32"])
def test_resnet50_on_the_triton_backend_equals_the_reference(norm):
    torch.manual_seed(0)
    model = ResNet50(norm, num_classes=10).double().to(memory_format=torch.channels_last)
    fused = (normlab.BatchNormAct2d, normlab.GroupNormAct)
    assert sum(isinstance(m, fused) for m in model.modules()) == 33
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y, y_eval, grads, buffers = _step(model, x, "triton")
    y_ref, y_eval_ref, grads_ref, buffers_ref = _step(ref, x, "reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_eval, y_eval_ref, rtol=1e-9, atol=1e-9)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9 * g_ref.abs().max().item())
    for b, b_ref in zip(buffers, buffers_ref):  # running statistics (BatchNorm; eps/momentum reach kernels as fp32)
        torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-9)
