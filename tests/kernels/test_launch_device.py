"""The kernels launch on their input's GPU: Triton launches on the current device, so every launching function
makes the input's device current first (normlab.kernels._triton_utils.on_input_device)."""

import contextlib

import pytest
import torch

pytest.importorskip("normlab.kernels.triton_ops")

from normlab import functional as F  # noqa: E402
from normlab.kernels import _triton_utils, batch_norm, channel_norm, frn, group_norm  # noqa: E402
from normlab.kernels import triton_ops as T  # noqa: E402

LAUNCHERS = [
    group_norm._forward,
    group_norm._backward,
    channel_norm._fwd_impl,
    channel_norm._bwd_impl,
    frn._fwd_impl,
    frn._bwd_impl,
    batch_norm._train_forward,
    batch_norm._backward,
    batch_norm._affine_forward,
    batch_norm.commit_if_finite,
]


class _OnGpu:
    """Stands for a CUDA tensor on GPU ``index`` (this machine may have none)."""

    is_cuda = True

    def __init__(self, index):
        self.device = torch.device("cuda", index)


@pytest.fixture
def switches(monkeypatch):
    """The devices made current, with GPU 0 current to begin with."""
    made_current = []

    @contextlib.contextmanager
    def device(d):
        made_current.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return made_current


def test_a_tensor_on_another_gpu_runs_with_that_gpu_current(switches):
    seen = []
    launch = _triton_utils.on_input_device(lambda x, *a, **k: seen.append((switches[:], a, k)) or "done")
    assert launch(_OnGpu(1), 2, k=3) == "done"
    assert seen == [([torch.device("cuda", 1)], (2,), {"k": 3})]


def test_no_switch_on_the_current_gpu_or_for_cpu_tensors(switches, monkeypatch):
    launch = _triton_utils.on_input_device(lambda x: x)
    launch(_OnGpu(0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("queried the device of a CPU tensor"))
    x = torch.zeros(1)
    assert launch(x) is x
    assert switches == []


@pytest.mark.parametrize("fn", LAUNCHERS, ids=lambda f: f"{f.__module__.rsplit('.', 1)[-1]}.{f.__name__}")
def test_every_launching_function_switches_to_its_input_device(fn):
    assert fn.__code__ is _triton_utils.on_input_device(lambda x: x).__code__, fn  # the decorator's wrapper


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    x = torch.randn(4, 64, 8, 8, device="cuda:1").requires_grad_()
    w, b = torch.rand(64, device="cuda:1") + 0.5, torch.randn(64, device="cuda:1")
    rm, rv = torch.zeros(64, device="cuda:1"), torch.ones(64, device="cuda:1")
    cases = [
        (T.group_norm, F.group_norm, (8, w, b)),
        (T.layer_norm2d, F.layer_norm2d, (w, b)),
        (T.filter_response_norm, F.filter_response_norm, (w, b, torch.zeros(64, device="cuda:1"))),
        (T.batch_norm, F.batch_norm, (rm.clone(), rv.clone(), w, b, True)),
    ]
    for kernel, reference, args in cases:
        y = kernel(x, *args)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        y_ref = reference(x, *args)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-3, atol=1e-3)
    assert torch.cuda.current_device() == 0
