"""Normalized LSTM/GRU cells and sequence modules against torch.nn, hand-written formulas and each other."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normlab.layers.rnn import NORMS, NormGRU, NormGRUCell, NormLSTM, NormLSTMCell
from tests.helpers import assert_all_close, grad_like
from tests.tolerances import assert_close

IN, H = 3, 4
CELLS = {"lstm": (NormLSTMCell, nn.LSTMCell), "gru": (NormGRUCell, nn.GRUCell)}
SEQUENCES = {"lstm": (NormLSTM, nn.LSTM), "gru": (NormGRU, nn.GRU)}


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def flat(out):
    """Every tensor of a (possibly nested) cell or module output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def backward_all(module, inputs):
    """Outputs, gradients of the inputs given as leaves (None entries skipped) and of every parameter."""
    module.zero_grad(set_to_none=True)
    inputs = [leaves(*i) if isinstance(i, tuple) else leaves(i)[0] for i in inputs]
    outs = flat(module(*inputs))
    torch.autograd.backward(outs, [grad_like(o) for o in outs])
    grads = [t.grad for t in flat([i for i in inputs if i is not None])]
    return [o.detach() for o in outs] + grads + [p.grad for p in module.parameters()]


def cell_state(kind, n, batched=True):
    shape = (n, H) if batched else (H,)
    return (torch.randn(shape), torch.randn(shape)) if kind == "lstm" else torch.randn(shape)


# ---- norm="none" is torch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_none_cell_is_torch_cell(kind, bias, batched):
    ours_cls, torch_cls = CELLS[kind]
    ref = torch_cls(IN, H, bias=bias)
    ours = ours_cls.from_torch(ref)
    x = torch.randn(5, IN) if batched else torch.randn(IN)
    assert_all_close(backward_all(ours, [x]), backward_all(ref, [x]))
    state = cell_state(kind, 5, batched)
    assert_all_close(backward_all(ours, [x, state]), backward_all(ref, [x, state]))


@pytest.mark.parametrize("kind", CELLS)
def test_cell_parameters_names_shapes_and_init_are_torchs(kind):
    ours_cls, torch_cls = CELLS[kind]
    torch.manual_seed(3)
    ref = torch_cls(IN, H)
    torch.manual_seed(3)
    ours = ours_cls(IN, H, norm="ln")
    theirs = dict(ref.named_parameters())
    mine = dict(ours.named_parameters())
    for name, p in theirs.items():
        assert torch.equal(mine[name], p), name
    strict = ours_cls(IN, H, norm="none")
    strict.load_state_dict(ref.state_dict())  # strict: the same keys
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("norm_") for k in missing)


@pytest.mark.parametrize("kind", SEQUENCES)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_none_sequence_is_torch(kind, num_layers, batch_first, with_state):
    ours_cls, torch_cls = SEQUENCES[kind]
    ref = torch_cls(IN, H, num_layers, batch_first=batch_first)
    ours = ours_cls.from_torch(ref)
    assert ours.batch_first == batch_first and ours.norm == "none"
    x = torch.randn(5, 7, IN)
    state = None
    if with_state:
        h0 = torch.randn(num_layers, 5 if batch_first else 7, H)
        state = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
    inputs = [x] if state is None else [x, state]
    assert_all_close(backward_all(ours, inputs), backward_all(ref, inputs))


@pytest.mark.parametrize("kind", SEQUENCES)
def test_none_sequence_unbatched_and_without_bias_is_torch(kind):
    ours_cls, torch_cls = SEQUENCES[kind]
    ref = torch_cls(IN, H, 2, bias=False)
    ours = ours_cls.from_torch(ref)
    x = torch.randn(6, IN)  # (T, input_size)
    h0 = torch.randn(2, H)
    state = (h0, torch.randn(2, H)) if kind == "lstm" else h0
    assert_all_close(backward_all(ours, [x, state]), backward_all(ref, [x, state]))


@pytest.mark.parametrize("kind", SEQUENCES)
def test_sequence_state_dict_and_init_are_torchs(kind):
    ours_cls, torch_cls = SEQUENCES[kind]
    torch.manual_seed(5)
    ref = torch_cls(IN, H, 2)
    torch.manual_seed(5)
    ours = ours_cls(IN, H, 2, norm="none")
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name
    normed = ours_cls(IN, H, 2, norm="ln")
    missing, unexpected = normed.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("norm_") for k in missing)


@pytest.mark.parametrize("kind", SEQUENCES)
def test_dropout_between_layers_only_in_training(kind):
    ours_cls, torch_cls = SEQUENCES[kind]
    ref = torch_cls(IN, H, 2, dropout=0.5).eval()
    ours = ours_cls.from_torch(ref).eval()
    assert ours.dropout == 0.5 and not ours.training
    x = torch.randn(4, 5, IN)
    assert_all_close(flat(ours(x)), flat(ref(x)))
    ours.train()
    assert not torch.allclose(ours(x)[0], ref(x)[0])
    with pytest.warns(UserWarning, match=r"dropout=0.5 acts between layers only"):
        ours_cls(IN, H, 1, dropout=0.5)


# ---- the normalized formulas -------------------------------------------------------------------------------------


def _ln(x, module):
    return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)


def _bn_step(x, module):
    mean, var = x.mean(0), x.var(0, correction=0)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def manual_lstm(cell, x, h, c, norm):
    gates = norm(x @ cell.weight_ih.t(), cell.norm_ih) + norm(h @ cell.weight_hh.t(), cell.norm_hh)
    i, f, g, o = (gates + cell.bias_ih + cell.bias_hh).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(norm(c, cell.norm_c)), c


def manual_gru(cell, x, h, norm):
    def blocks(v, site):  # LayerNorm over [r, z] and over n separately (Ba et al.'s LN-GRU); per feature for BN
        if hasattr(site, "chunks"):
            ab, n = v.split([2 * H, H], 1)
            return torch.cat([norm(ab, site.chunks[0]), norm(n, site.chunks[1])], 1)
        return norm(v, site)

    ri, zi, ni = (blocks(x @ cell.weight_ih.t(), cell.norm_ih) + cell.bias_ih).chunk(3, 1)
    rh, zh, nh = (blocks(h @ cell.weight_hh.t(), cell.norm_hh) + cell.bias_hh).chunk(3, 1)
    r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
    n = torch.tanh(ni + r * nh)
    return (1 - z) * n + z * h


@pytest.mark.parametrize("norm,fn", [("ln", _ln), ("bn_step", _bn_step)])
def test_lstm_cell_formula(norm, fn):
    cell = NormLSTMCell(IN, H, norm=norm)
    for p in cell.parameters():
        torch.nn.init.uniform_(p, -1, 1)
    x, (h, c) = torch.randn(6, IN), cell_state("lstm", 6)
    for got, want in zip(cell(x, (h, c), step=2), manual_lstm(cell, x, h, c, fn)):
        assert_close(got, want)
    if norm == "ln":
        assert cell.norm_ih.num_features == 4 * H and cell.norm_c.num_features == H  # over all 4H, not per gate


@pytest.mark.parametrize("norm,fn", [("ln", _ln), ("bn_step", _bn_step)])
def test_gru_cell_formula(norm, fn):
    cell = NormGRUCell(IN, H, norm=norm)
    for p in cell.parameters():
        torch.nn.init.uniform_(p, -1, 1)
    x, h = torch.randn(6, IN), torch.randn(6, H)
    assert_close(cell(x, h, step=1), manual_gru(cell, x, h, fn))


def test_bn_norms_start_at_the_papers_gamma():
    for norm in ("bn_step", "bn_shared"):
        cell = NormLSTMCell(IN, H, norm=norm)
        for site in (cell.norm_ih, cell.norm_hh, cell.norm_c):
            assert torch.allclose(site.weight, torch.full_like(site.weight, 0.1))


# ---- sequence modules = the cell unrolled ------------------------------------------------------------------------


def cell_of_layer0(sequence, cell_cls):
    """A cell with the sequence module's layer-0 parameters and norm state (``weight_ih_l0`` -> ``weight_ih``)."""
    cell = cell_cls(sequence.input_size, sequence.hidden_size, norm=sequence.norm, max_steps=sequence.max_steps)
    cell.load_state_dict({re.sub(r"_l0(?=\.|$)", "", k): v for k, v in sequence.state_dict().items()})
    return cell


@pytest.mark.parametrize("kind", SEQUENCES)
@pytest.mark.parametrize("norm", NORMS)
def test_sequence_module_is_the_cell_unrolled(kind, norm):
    ours_cls = SEQUENCES[kind][0]
    module = ours_cls(IN, H, norm=norm, max_steps=3, batch_first=False)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1, 1)
    cell = cell_of_layer0(module, CELLS[kind][0])
    x = torch.randn(5, 6, IN)  # T = 5 > max_steps

    def unrolled(x):
        state, outputs = None, []
        for t in range(x.shape[0]):
            state = cell(x[t], state, step=t)
            outputs.append(state[0] if kind == "lstm" else state)
        final = (state[0].unsqueeze(0), state[1].unsqueeze(0)) if kind == "lstm" else state.unsqueeze(0)
        return torch.stack(outputs), final

    xa, xb = leaves(x, x)
    outs_a, outs_b = flat(module(xa)), flat(unrolled(xb))
    assert_all_close(outs_a, outs_b)
    torch.autograd.backward(outs_a, [grad_like(o) for o in outs_a])
    torch.autograd.backward(outs_b, [grad_like(o) for o in outs_b])
    assert_close(xa.grad, xb.grad)
    cell_params, cell_buffers = dict(cell.named_parameters()), dict(cell.named_buffers())
    for name, p in module.named_parameters():
        assert_close(p.grad, cell_params[re.sub(r"_l0(?=\.|$)", "", name)].grad, msg=name)
    for name, b in module.named_buffers():
        torch.testing.assert_close(b, cell_buffers[re.sub(r"_l0(?=\.|$)", "", name)], rtol=1e-5, atol=1e-5, msg=name)


def test_bn_step_statistics_per_step_and_beyond_max_steps():
    module = NormLSTM(IN, H, norm="bn_step", max_steps=3)
    x = torch.randn(8, 5, IN)
    module(x)
    for site in (module.norm_ih_l0, module.norm_hh_l0, module.norm_c_l0):
        assert site.num_batches_tracked.tolist() == [1, 1, 3]  # steps 2, 3, 4 share the last row
    hh = module.norm_hh_l0.running_mean
    assert torch.equal(hh[0], torch.zeros(4 * H))  # h_0 = 0: step 0's recurrent term is exactly zero
    assert not torch.allclose(hh[1], hh[2])
    module.eval()
    out, (h, c) = module(torch.randn(8, 9, IN))  # longer than any training sequence
    assert out.shape == (8, 9, H) and torch.isfinite(out).all()
    assert module.norm_ih_l0.num_batches_tracked.tolist() == [1, 1, 3]


def test_bn_shared_is_one_batch_norm_reused_at_every_step():
    module = NormGRU(IN, H, norm="bn_shared")
    module(torch.randn(8, 6, IN))
    assert int(module.norm_ih_l0.num_batches_tracked) == 6 and int(module.norm_hh_l0.num_batches_tracked) == 6
    assert module.norm_ih_l0.running_mean.shape == (3 * H,)


@pytest.mark.parametrize("kind", SEQUENCES)
def test_shared_statistics_break_eval_where_per_step_statistics_do_not(kind):
    """Why "bn_shared" is naive: the pre-activations' distribution changes over the first steps (with h_0 = 0 the
    recurrent term of step 0 is exactly 0), so one set of running statistics for every step normalizes in eval what
    training normalized differently. Per-step statistics keep eval close to training."""
    gaps = {}
    for norm in ("bn_step", "bn_shared"):
        torch.manual_seed(0)
        module = SEQUENCES[kind][0](IN, H, norm=norm, max_steps=5)
        with torch.no_grad():
            for _ in range(100):  # momentum 0.1: the running statistics forget their initial values
                module(torch.randn(32, 5, IN))
            x = torch.randn(256, 5, IN)
            training_output = module(x)[0]
            gaps[norm] = (module.eval()(x)[0] - training_output).abs().mean()
    assert gaps["bn_shared"] > 5 * gaps["bn_step"], gaps


@pytest.mark.parametrize("kind", SEQUENCES)
def test_norm_between_layers_normalizes_each_sample_and_step(kind):
    ours_cls = SEQUENCES[kind][0]
    module = ours_cls(IN, H, 2, norm="ln", norm_between_layers="bn1d")
    first = ours_cls(IN, H, 1, norm="ln")
    second = ours_cls(H, H, 1, norm="ln")
    layers = {k: v for k, v in module.state_dict().items() if not k.startswith("norm_between")}
    first.load_state_dict({k: v for k, v in layers.items() if re.search(r"_l0(\.|$)", k)})
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in layers.items() if re.search(r"_l1(\.|$)", k)})
    x = torch.randn(6, 5, IN)
    y0 = first(x)[0]
    mean, var = y0.mean((0, 1)), y0.var((0, 1), correction=0)  # statistics over batch and time together
    expected = second((y0 - mean) / torch.sqrt(var + 1e-5))[0]
    assert_close(module(x)[0], expected)
    between = module.norm_between_l0
    assert int(between.num_batches_tracked) == 1
    assert_close(between.running_mean, 0.1 * mean)
    assert not hasattr(module, "norm_between_l1")


def test_norm_between_layers_rejects_a_layer_without_2d_input():
    with pytest.raises(ValueError, match=r"norm_between_layers='bn' builds BatchNorm2d.*'bn1d'"):
        NormLSTM(IN, H, 2, norm_between_layers="bn")


# ---- gradients ---------------------------------------------------------------------------------------------------


def gradcheck_module(module, inputs, fast_mode=False):
    """float64 gradcheck w.r.t. the inputs and every parameter, buffers restored before each evaluation."""
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    n_in = len(inputs)

    def fn(*args):
        state = {**{n: b.clone() for n, b in buffers.items()}, **dict(zip(names, args[n_in:]))}
        return tuple(flat(functional_call(module, state, args[:n_in])))

    return torch.autograd.gradcheck(fn, (*inputs, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast_mode)


def gradcheck_mode(module, norm):
    # OnlineNorm's training backward is the paper's control process, not the derivative; its eval backward is
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1, 1)
    return module.train(norm != "online")


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("norm", NORMS)
def test_cell_float64_gradcheck(kind, norm):
    cell = gradcheck_mode(CELLS[kind][0](2, 2, norm=norm, max_steps=2, dtype=torch.float64), norm)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    if kind == "lstm":
        c = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

        class Wrapped(nn.Module):  # gradcheck wants tensors as positional inputs
            def __init__(self):
                super().__init__()
                self.cell = cell

            def forward(self, x, h, c):
                return self.cell(x, (h, c), step=3)

        assert gradcheck_module(Wrapped(), (x, h, c))
    else:
        assert gradcheck_module(cell, (x, h))


@pytest.mark.parametrize("kind", SEQUENCES)
@pytest.mark.parametrize("norm", NORMS)
def test_sequence_float64_gradcheck(kind, norm):
    module = gradcheck_mode(SEQUENCES[kind][0](2, 2, norm=norm, max_steps=2, dtype=torch.float64), norm)
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    # fast mode (random projections of the Jacobian): the cells above get the full check
    assert gradcheck_module(module, (x,), fast_mode=True)


# ---- training ----------------------------------------------------------------------------------------------------


class Regressor(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(rnn.hidden_size, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(1)


@pytest.mark.parametrize("kind", SEQUENCES)
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_trains_a_tiny_sequence_task(kind, norm):
    """Predict the mean of the first feature over a sequence: the recurrence has to integrate."""
    torch.manual_seed(0)
    x = torch.randn(32, 6, 2)
    y = x[:, :, 0].mean(1) * 2
    model = Regressor(SEQUENCES[kind][0](2, 12, norm=norm, max_steps=6))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    losses = []
    for _ in range(25):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0], losses[::8]


@pytest.mark.parametrize("cell_cls", [NormLSTMCell, NormGRUCell])
@pytest.mark.parametrize("norm", ["ln", "online"])
def test_batch_of_one_trains(cell_cls, norm):
    cell = cell_cls(IN, H, norm=norm)
    opt = torch.optim.SGD(cell.parameters(), lr=0.1)
    before = copy.deepcopy(cell.state_dict())
    for _ in range(2):
        state = None
        for t, x in enumerate(torch.randn(4, 1, IN)):
            state = cell(x, state, step=t)
        loss = flat(state)[0].square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(cell.weight_hh, before["weight_hh"])


# ---- compile -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """The per-step path (bn_step, steps beyond max_steps) and a between-layer norm under fullgraph compile."""
    torch._dynamo.reset()
    eager = NormLSTM(IN, H, 2, norm="bn_step", max_steps=1, norm_between_layers="ln")
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        eager.train(training), compiled_module.train(training)
        x = torch.randn(3, 2, IN)
        xa, xb = leaves(x, x)
        ya, yb = compiled(xa)[0], eager(xb)[0]
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    for (name, a), b in zip(eager.named_buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b, a, msg=name)


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [NormLSTMCell, NormGRUCell, NormLSTM, NormGRU])
def test_unknown_norm_lists_the_valid_names(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: unknown norm 'bn-step'. Did you mean 'bn_step'\?.*"):
        cls(IN, H, norm="bn-step")
    with pytest.raises(ValueError, match=r"Valid names: bn_shared, bn_step, ln, none, online.*norm=None"):
        cls(IN, H, norm=None)


@pytest.mark.parametrize("cls", [NormLSTMCell, NormGRUCell, NormLSTM, NormGRU])
@pytest.mark.parametrize("arg", ["input_size", "hidden_size", "max_steps"])
def test_sizes_must_be_positive(cls, arg):
    kwargs = {"input_size": IN, "hidden_size": H, "max_steps": 4, arg: 0}
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {arg}=0 must be a positive integer"):
        cls(kwargs.pop("input_size"), kwargs.pop("hidden_size"), **kwargs)


@pytest.mark.parametrize("cls", [NormLSTM, NormGRU])
def test_sequence_bad_input(cls):
    module = cls(IN, H)
    with pytest.raises(ValueError, match=r"input of shape \(4, 0, 3\) has no time steps"):
        module(torch.randn(4, 0, IN))
    with pytest.raises(ValueError, match=r"input of shape \(0, 3\) has no time steps"):
        module(torch.randn(0, IN))
    with pytest.raises(ValueError, match=r"input has 5 features \(shape \(4, 6, 5\)\), expected input_size=3"):
        module(torch.randn(4, 6, 5))
    with pytest.raises(ValueError, match=r"expected input \(N, T, input_size\).*\(2, 4, 6, 3\)"):
        module(torch.randn(2, 4, 6, IN))
    with pytest.raises(ValueError, match=r"num_layers=0 must be a positive integer"):
        cls(IN, H, 0)
    with pytest.raises(ValueError, match=r"dropout=1.5 must be a number in \[0, 1\]"):
        cls(IN, H, 2, dropout=1.5)
    bad_h = torch.randn(2, 4, H)
    with pytest.raises(ValueError, match=r"h_0\) has shape \(2, 4, 4\), expected \(1, 4, 4\)"):
        module(torch.randn(4, 6, IN), (bad_h, bad_h) if cls is NormLSTM else bad_h)
    time_major = cls(IN, H, batch_first=False)
    with pytest.raises(ValueError, match=r"input of shape \(0, 4, 3\) has no time steps"):
        time_major(torch.randn(0, 4, IN))


@pytest.mark.parametrize("cls", [NormLSTMCell, NormGRUCell])
def test_cell_bad_input(cls):
    cell = cls(IN, H)
    with pytest.raises(ValueError, match=r"input has 5 features \(shape \(2, 5\)\), expected input_size=3"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"expected input \(N, input_size\).*\(2, 3, 1\)"):
        cell(torch.randn(2, IN, 1))
    with pytest.raises(ValueError, match=r"step=-1 must be a non-negative Python int"):
        cell(torch.randn(2, IN), step=-1)
    bad = torch.randn(3, H)
    with pytest.raises(ValueError, match=r"has shape \(3, 4\), expected \(2, 4\)"):
        cell(torch.randn(2, IN), (bad, bad) if cls is NormLSTMCell else bad)


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match=r"NormLSTM.from_torch: bidirectional=True is not supported"):
        NormLSTM.from_torch(nn.LSTM(IN, H, bidirectional=True))
    with pytest.raises(ValueError, match=r"proj_size=2 is not supported"):
        NormLSTM.from_torch(nn.LSTM(IN, H, proj_size=2))
    with pytest.raises(ValueError, match=r"expected a torch.nn.GRU, got LSTM"):
        NormGRU.from_torch(nn.LSTM(IN, H))
    with pytest.raises(ValueError, match=r"expected a torch.nn.LSTMCell, got GRUCell"):
        NormLSTMCell.from_torch(nn.GRUCell(IN, H))
