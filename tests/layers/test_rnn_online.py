"""norm="online" in the LSTM: the Online Normalization authors' arrangement (one norm over the summed
pre-activation, layer scaling per gate, no cell-state norm, their decays), checked against a float64 transcription
with back-propagation through time written out by hand, and the gradient norm over repeated training passes."""

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.layers.rnn import ONLINE_LSTM_ALPHA_BKW, ONLINE_LSTM_ALPHA_FWD, NormGRUCell, NormLSTM, NormLSTMCell
from tests.tolerances import assert_close

STATE = ("running_mean", "running_var", "control_mean", "control_proj")


def test_online_lstm_is_one_norm_over_the_summed_pre_activation():
    cell = NormLSTMCell(3, 5, norm="online")
    assert cell.norm_ih is None and cell.norm_hh is None and cell.norm_c is None
    online = cell.norm_gates.online
    assert online.num_features == 20 and not online.layer_scaling  # layer scaling is per gate, in norm_gates
    decays = (online.alpha_fwd, online.alpha_bkw)
    assert decays == (ONLINE_LSTM_ALPHA_FWD, ONLINE_LSTM_ALPHA_BKW) == (8191 / 8192, 31 / 32)  # the authors' LSTM
    lstm = NormLSTM(3, 5, num_layers=2, norm="online")
    names = {n for n, _ in lstm.named_modules()}
    assert {"norm_gates_l0", "norm_gates_l1"} <= names
    assert not any(n.startswith(("norm_ih", "norm_hh", "norm_c")) for n in names)
    # the GRU keeps the per-site arrangement (the authors have no GRU)
    gru = NormGRUCell(3, 5, norm="online")
    assert gru.norm_gates is None and gru.norm_ih.layer_scaling and gru.norm_hh.num_features == 15


def _per_gate_ls(s, hidden, eps):
    groups = s.reshape(s.shape[0], -1, hidden)
    return (groups / torch.sqrt(groups.square().mean(-1, keepdim=True) + eps)).reshape(s.shape)


def test_online_lstm_cell_eval_formula():
    """Eval: the fixed affine map of the running state, affine, layer scaling per gate, biases, plain LSTM."""
    torch.manual_seed(0)
    cell = NormLSTMCell(3, 4, norm="online").eval()
    online = cell.norm_gates.online
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-1, 1)
        online.running_mean.uniform_(-1, 1)
        online.running_var.uniform_(0.5, 2)
    x, h, c = torch.randn(6, 3), torch.randn(6, 4), torch.randn(6, 4)
    a = x @ cell.weight_ih.t() + h @ cell.weight_hh.t()
    y = (a - online.running_mean) / torch.sqrt(online.running_var + online.eps)
    gates = _per_gate_ls(online.weight * y + online.bias, 4, online.eps) + cell.bias_ih + cell.bias_hh
    i, f, g, o = gates.chunk(4, 1)
    c_want = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_want = torch.sigmoid(o) * torch.tanh(c_want)
    h_got, c_got = cell(x, (h, c))
    assert_close(h_got, h_want)
    assert_close(c_got, c_want)


# ---- training: a float64 transcription with BPTT by hand ---------------------------------------------------------


class Transcription:
    """The authors' LSTM with Online Normalization, written out: forward per sample in batch order within a step,
    backward per time step in reverse and per sample in batch order, as their ``norm_fwd``/``norm_bwd`` kernels."""

    def __init__(self, module: NormLSTM):
        p = {n: t.detach().clone().double() for n, t in module.state_dict().items()}
        self.w_ih, self.w_hh = p["weight_ih_l0"], p["weight_hh_l0"]
        self.bias = p["bias_ih_l0"] + p["bias_hh_l0"]
        self.gamma, self.beta = p["norm_gates_l0.online.weight"], p["norm_gates_l0.online.bias"]
        self.mu, self.var = p["norm_gates_l0.online.running_mean"], p["norm_gates_l0.online.running_var"]
        self.u, self.v = p["norm_gates_l0.online.control_mean"], p["norm_gates_l0.online.control_proj"]
        online = module.norm_gates_l0.online
        self.af, self.ab, self.eps = online.alpha_fwd, online.alpha_bkw, online.eps
        self.hidden = module.hidden_size

    def step(self, x, grad_out):
        """One training pass on x (T, N, I) with dL/d(output) = grad_out (T, N, H): outputs, dL/dx, parameter
        gradients (by name). Updates the stream state."""
        steps, n, _ = x.shape
        hs = self.hidden
        h, c = x.new_zeros(n, hs), x.new_zeros(n, hs)
        tape, outs = [], []
        for t in range(steps):
            a = x[t] @ self.w_ih.t() + h @ self.w_hh.t()
            y, scale = torch.empty_like(a), torch.empty_like(a)
            for i in range(n):  # the stream, in batch order
                scale[i] = torch.sqrt(self.var + self.eps)
                y[i] = (a[i] - self.mu) / scale[i]
                delta = a[i] - self.mu
                self.var = self.af * self.var + self.af * (1 - self.af) * delta**2
                self.mu = self.mu + (1 - self.af) * delta
            s = self.gamma * y + self.beta
            z = _per_gate_ls(s, hs, self.eps)
            gates = z + self.bias
            ig, fg, og = (torch.sigmoid(gates[:, k * hs : (k + 1) * hs]) for k in (0, 1, 3))
            gg = torch.tanh(gates[:, 2 * hs : 3 * hs])
            c_new = fg * c + ig * gg
            h_new = og * torch.tanh(c_new)
            tape.append((x[t], h, c, y, scale, s, z, ig, fg, gg, og, c_new))
            h, c = h_new, c_new
            outs.append(h)
        grads = {k: torch.zeros_like(v) for k, v in [("w_ih", self.w_ih), ("w_hh", self.w_hh), ("bias", self.bias)]}
        grads.update(gamma=torch.zeros_like(self.gamma), beta=torch.zeros_like(self.beta))
        dx = torch.zeros_like(x)
        dh_next, dc_next = x.new_zeros(n, hs), x.new_zeros(n, hs)
        for t in reversed(range(steps)):
            xt, h_prev, c_prev, y, scale, s, z, ig, fg, gg, og, c_t = tape[t]
            dh = grad_out[t] + dh_next
            tc = torch.tanh(c_t)
            dc = dc_next + dh * og * (1 - tc**2)
            dgates = torch.cat(
                [dc * gg * ig * (1 - ig), dc * c_prev * fg * (1 - fg), dc * ig * (1 - gg**2), dh * tc * og * (1 - og)],
                1,
            )
            dc_next = dc * fg
            grads["bias"] += dgates.sum(0)
            # layer scaling per gate: z = s / r, r = sqrt(mean(s^2) + eps) over the gate's H features
            zg, dzg = z.reshape(n, 4, hs), dgates.reshape(n, 4, hs)
            r = (s.reshape(n, 4, hs) / zg).mean(-1, keepdim=True)
            ds = ((dzg - zg * (dzg * zg).mean(-1, keepdim=True)) / r).reshape(n, 4 * hs)
            grads["gamma"] += (ds * y).sum(0)
            grads["beta"] += ds.sum(0)
            dy = ds * self.gamma
            da = torch.empty_like(dy)
            for i in range(n):  # the control process, in batch order
                g_tmp = dy[i] - (1 - self.ab) * self.v * y[i]
                self.v = self.v + g_tmp * y[i]
                g_tmp = g_tmp / scale[i]
                da[i] = g_tmp - (1 - self.ab) * self.u
                self.u = self.u + da[i]
            grads["w_ih"] += da.t() @ xt
            grads["w_hh"] += da.t() @ h_prev
            dx[t] = da @ self.w_ih
            dh_next = da @ self.w_hh
        return torch.stack(outs), dx, grads


@pytest.mark.parametrize("seed", [0, 1])
def test_online_lstm_training_matches_a_float64_transcription(seed):
    """Three training passes of T = 6 steps: outputs, input and parameter gradients, and the forward and backward
    stream state after each pass (so the control state carried from one backward into the next is checked too)."""
    torch.manual_seed(seed)
    module = NormLSTM(2, 3, norm="online", batch_first=False, dtype=torch.float64)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1, 1)
    ref = Transcription(module)
    online = module.norm_gates_l0.online
    for _ in range(3):
        x = torch.randn(6, 4, 2, dtype=torch.float64) * 2 + 0.5
        g = torch.randn(6, 4, 3, dtype=torch.float64)
        xa = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        out, _ = module(xa)
        out.backward(g)
        want_out, want_dx, want = ref.step(x, g)
        assert_close(out, want_out, msg="output")
        assert_close(xa.grad, want_dx, msg="input gradient")
        assert_close(module.weight_ih_l0.grad, want["w_ih"], msg="weight_ih")
        assert_close(module.weight_hh_l0.grad, want["w_hh"], msg="weight_hh")
        assert_close(module.bias_ih_l0.grad, want["bias"], msg="bias_ih")
        assert_close(online.weight.grad, want["gamma"], msg="norm weight")
        assert_close(online.bias.grad, want["beta"], msg="norm bias")
        for name, value in zip(STATE, (ref.mu, ref.var, ref.u, ref.v)):
            assert_close(getattr(online, name), value, msg=name)


# ---- gradient norm over training passes --------------------------------------------------------------------------


class _LastStep(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.rnn, self.head = NormLSTM(2, 8, norm=norm), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _grad_norms(norm, seed, passes=8):
    """The global gradient norm of ``passes`` training passes (fresh random batches, weights fixed)."""
    torch.manual_seed(seed)
    model = _LastStep(norm)
    data = torch.Generator().manual_seed(seed)
    norms = []
    for _ in range(passes):
        x, y = torch.randn(32, 30, 2, generator=data), torch.randint(0, 4, (32,), generator=data)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
    return norms


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_online_lstm_gradient_norm_stays_near_layer_norms(seed):
    """With the control process closing a loop through time (the per-site arrangement: projections and cell state
    normalized separately), these seeds' gradient norms grew 10-100 times per pass, to 5e5-2e7 by the 8th; LayerNorm
    stays at 0.5-300 and the authors' arrangement below 1."""
    online, ln = _grad_norms("online", seed), _grad_norms("ln", seed)
    assert max(online) <= 10 * statistics.median(ln), (online, ln)
    assert online[-1] <= 10 * online[0], online
