"""Cross-cutting checks for every layer the factory builds: compile, gradcheck, dtype/layout, bad input."""

import copy
import os

import pytest
import torch
from torch.func import functional_call

import normlab

C = 8
SPECS = [name for name in normlab.list_norms() if name != "none"]
# small groups so that C = 8 divides; every other spec uses its defaults
OVERRIDES = {"gn": {"num_groups": 4}, "evo_s0": {"num_groups": 4}, "ghost_bn": {"virtual_batch_size": 2}}


def make(spec, **kw):
    return normlab.create_norm_layer(spec, C, **{**OVERRIDES.get(spec, {}), **kw})


def input_for(module, n=4, dtype=torch.float32):
    dims = getattr(module, "_input_dims", (4,))
    shape = {2: (n, C), 3: (n, C, 5), 4: (n, C, 3, 5), 5: (n, C, 2, 3, 2)}[4 if 4 in dims else dims[-1]]
    return torch.randn(shape, dtype=torch.float64).mul(1.5).add(0.3).to(dtype)


def randomize(module):
    """Non-trivial parameters and running statistics so that every path matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5) if "var" in name else b.uniform_(-0.5, 0.5)
    return module


def test_every_registered_spec_is_covered():
    assert len(SPECS) >= 20


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("training", [True, False])
def test_float64_gradcheck(spec, training):
    module = randomize(make(spec, dtype=torch.float64)).train(training)
    if training and spec in ("online", "online1d"):
        pytest.skip("Online Normalization's training backward is the paper's online estimate, not the derivative")
    if spec == "brn":
        # Batch Renorm's r and d are stop-gradient by design, so its gradient is the true derivative only where
        # both are clipped: running statistics far from the batch's make them constant (r = 1/r_max, d = d_max).
        module.running_mean.fill_(-1e3)
        module.running_var.fill_(1e4)
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    names = [n for n, _ in module.named_parameters()]
    x = input_for(module, dtype=torch.float64).requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(x, *params):
        # fresh copies of the buffers each call: running statistics must not drift between evaluations
        state = {**{n: b.clone() for n, b in buffers.items()}, **dict(zip(names, params))}
        return functional_call(module, state, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_compile_fullgraph_train_and_eval(spec):
    torch._dynamo.reset()
    eager = randomize(make(spec))
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(
        compiled_module, fullgraph=True, backend=os.environ.get("NORMLAB_COMPILE_BACKEND", "inductor")
    )
    for training in (True, False):
        eager.train(training)
        compiled_module.train(training)
        for _ in range(2):
            x = input_for(eager)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = compiled(x1), eager(x2)
            torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(y1)
            (y1 * g).sum().backward()
            (y2 * g).sum().backward()
            torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
        for (name, a), b in zip(eager.named_buffers(), compiled_module.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_dtype_and_memory_format_preserved(spec, dtype, channels_last):
    module = make(spec, dtype=dtype)
    x = input_for(module, dtype=dtype)
    if channels_last:
        if x.dim() != 4:
            pytest.skip("channels_last applies to 4-D inputs")
        x = x.to(memory_format=torch.channels_last)
    y = module(x)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("spec", SPECS)
def test_module_on_meta_device_and_reset(spec):
    module = make(spec, device="meta")
    assert all(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("spec", SPECS)
def test_num_features_must_be_positive(spec):
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"num_features={bad}\b"):
            normlab.create_norm_layer(spec, bad)


@pytest.mark.parametrize("spec", SPECS)
def test_eps_must_be_positive(spec):
    for bad in (0.0, -1e-5):
        with pytest.raises(ValueError, match=rf"eps={bad!r}"):
            make(spec, eps=bad)


@pytest.mark.parametrize("spec", SPECS)
def test_channel_mismatch_and_wrong_rank_raise(spec):
    module = make(spec)
    x = input_for(module)
    wrong_c = torch.randn(x.shape[0], C + 1, *x.shape[2:])
    with pytest.raises(ValueError, match=rf"{C + 1} channels.*num_features={C}"):
        module(wrong_c)
    with pytest.raises(ValueError, match=r"expected .*D input.*got input of shape \(4, 8, 1, 1, 1, 1\)"):
        module(torch.randn(4, C, 1, 1, 1, 1))


CONVS = [
    pytest.param(lambda **kw: normlab.StdConv2d(3, 4, 3, padding=1, **kw), id="StdConv2d"),
    pytest.param(lambda **kw: normlab.ScaledStdConv2d(3, 4, 3, padding=1, gamma=1.7, **kw), id="ScaledStdConv2d"),
    pytest.param(lambda **kw: normlab.layers.CenteredConv2d(3, 4, 3, padding=1, **kw), id="CenteredConv2d"),
]


@pytest.mark.parametrize("make_conv", CONVS)
def test_weight_standardized_convs_gradcheck(make_conv):
    conv = make_conv(dtype=torch.float64)
    names = [n for n, _ in conv.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in conv.parameters())
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return functional_call(conv, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("make_conv", CONVS)
def test_weight_standardized_convs_compile_fullgraph(make_conv):
    torch._dynamo.reset()
    eager = make_conv()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    for training in (True, False):
        eager.train(training)
        compiled.train(training)
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_conv", CONVS[:2])
def test_weight_standardized_convs_reject_bad_eps(make_conv):
    with pytest.raises(ValueError, match=r"eps=0.0"):
        make_conv(eps=0.0)
