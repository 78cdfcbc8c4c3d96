"""The study note's models (../shared/seed/), transcribed, reproduced by fused_rnn.

The seed classes below are copied from the note's code (comments translated, layout unchanged
where it matters). Each test maps the seed's weights onto a fused_rnn module and checks outputs
(and, for the LSTMs, gradients) agree:

- seed ``x @ U + b1 + h @ W + b2``  ->  ``W_ih = Uᵀ, W_hh = Wᵀ, b_ih = b1, b_hh = b2``;
- seed LSTM ``input_lin`` (no bias) / ``hidden_lin`` -> ``W_ih`` / ``W_hh, b_hh`` (``b_ih = 0``),
  gate order i, f, g, o as in nn.LSTM; the layer norms -> ``ln_gate_*`` (the four gate
  LayerNorms concatenated) and ``ln_cell_*``.
"""
from typing import Optional, Tuple

import pytest
import torch
from torch import nn

import fused_rnn
from conftest import kernel_device, rel_err


# ----------------------------------------------------------------------------- the seed's code
class RNNCell(nn.Module):
    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.U = nn.Parameter(torch.randn(size=(input_dim, output_dim), dtype=torch.float32))
        self.W = nn.Parameter(torch.randn(size=(output_dim, output_dim), dtype=torch.float32))
        self.V = nn.Parameter(torch.randn(size=(output_dim, output_dim), dtype=torch.float32))
        self.b1 = nn.Parameter(torch.randn(size=(1, output_dim), dtype=torch.float32))
        self.b2 = nn.Parameter(torch.randn(size=(1, output_dim), dtype=torch.float32))
        self.act1 = nn.Tanh()
        self.act2 = nn.Sigmoid()

    def forward(self, input, h0):
        h = self.act1(torch.matmul(input, self.U) + torch.matmul(h0, self.W) + self.b1 + self.b2)
        output = self.act2(torch.matmul(h, self.V))
        return output, h


class RNN(RNNCell):
    def __init__(self, input_dim, output_dim):
        RNNCell.__init__(self, input_dim, output_dim)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.rnncell = RNNCell(self.input_dim, self.output_dim)

    def forward(self, input):
        b, l, h = input.shape
        h0 = torch.zeros(size=(b, self.output_dim), dtype=torch.float32)
        input1 = input[:, 0, :]
        out1, h1 = self.rnncell(input1, h0)
        output = []
        output.append(out1)
        for i in range(l - 1):
            out, h2 = self.rnncell(input[:, i + 1, :], h1)
            h1 = h2
            output.append(out)
        output = torch.stack([i for i in output]).permute(1, 0, 2)
        return output, h1


class LSTMCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, layer_norm: bool = False):
        super().__init__()
        self.hidden_lin = nn.Linear(hidden_size, 4 * hidden_size)
        self.input_lin = nn.Linear(input_size, 4 * hidden_size, bias=False)
        if layer_norm:
            self.layer_norm = nn.ModuleList([nn.LayerNorm(hidden_size) for _ in range(4)])
            self.layer_norm_c = nn.LayerNorm(hidden_size)
        else:
            self.layer_norm = nn.ModuleList([nn.Identity() for _ in range(4)])
            self.layer_norm_c = nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        ifgo = self.hidden_lin(h) + self.input_lin(x)
        ifgo = ifgo.chunk(4, dim=-1)
        ifgo = [self.layer_norm[i](ifgo[i]) for i in range(4)]
        i, f, g, o = ifgo
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(self.layer_norm_c(c_next))
        return h_next, c_next


class LSTM(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, n_layers: int):
        super().__init__()
        self.n_layers = n_layers
        self.hidden_size = hidden_size
        self.cells = nn.ModuleList([LSTMCell(input_size, hidden_size)] +
                                   [LSTMCell(hidden_size, hidden_size) for _ in range(n_layers - 1)])

    def forward(self, x: torch.Tensor, state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        n_steps, batch_size = x.shape[:2]
        if state is None:
            h = [x.new_zeros(batch_size, self.hidden_size) for _ in range(self.n_layers)]
            c = [x.new_zeros(batch_size, self.hidden_size) for _ in range(self.n_layers)]
        else:
            (h, c) = state
            h, c = list(torch.unbind(h)), list(torch.unbind(c))
        out = []
        for t in range(n_steps):
            inp = x[t]
            for layer in range(self.n_layers):
                h[layer], c[layer] = self.cells[layer](inp, h[layer], c[layer])
                inp = h[layer]
            out.append(h[-1])
        out = torch.stack(out)
        h = torch.stack(h)
        c = torch.stack(c)
        return out, (h, c)


# ----------------------------------------------------------------------------- weight mapping
def _load_rnn_cell(layer, seed_cell: RNNCell, sfx: str) -> None:
    with torch.no_grad():
        getattr(layer, "weight_ih" + sfx).copy_(seed_cell.U.t())
        getattr(layer, "weight_hh" + sfx).copy_(seed_cell.W.t())
        getattr(layer, "bias_ih" + sfx).copy_(seed_cell.b1[0])
        getattr(layer, "bias_hh" + sfx).copy_(seed_cell.b2[0])


def _load_lstm_cell(layer, seed_cell: LSTMCell, sfx: str) -> None:
    with torch.no_grad():
        getattr(layer, "weight_ih" + sfx).copy_(seed_cell.input_lin.weight)
        getattr(layer, "weight_hh" + sfx).copy_(seed_cell.hidden_lin.weight)
        getattr(layer, "bias_ih" + sfx).zero_()
        getattr(layer, "bias_hh" + sfx).copy_(seed_cell.hidden_lin.bias)
        if getattr(layer, "layer_norm", False):
            getattr(layer, "ln_gate_weight" + sfx).copy_(torch.cat([ln.weight for ln in seed_cell.layer_norm]))
            getattr(layer, "ln_gate_bias" + sfx).copy_(torch.cat([ln.bias for ln in seed_cell.layer_norm]))
            getattr(layer, "ln_cell_weight" + sfx).copy_(seed_cell.layer_norm_c.weight)
            getattr(layer, "ln_cell_bias" + sfx).copy_(seed_cell.layer_norm_c.bias)


def _randomize_layer_norms(seed_cell: LSTMCell) -> None:
    """LayerNorm starts at weight 1, bias 0; move it so a mix-up of the gates would show."""
    with torch.no_grad():
        for ln in list(seed_cell.layer_norm) + [seed_cell.layer_norm_c]:
            ln.weight.normal_(1.0, 0.3)
            ln.bias.normal_(0.0, 0.3)


BACKENDS = ["reference"] + (["triton"] if kernel_device() is not None else [])
B, T, I, H = 3, 7, 5, 11
TOL = 1e-5  # fp32, as the seed computes


def _dev(backend):
    return torch.device("cpu") if backend == "reference" else kernel_device()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_with_output_head(backend):
    seed = RNN(I, H)
    ours = fused_rnn.RNN(I, H, batch_first=True, backend=backend)
    _load_rnn_cell(ours, seed.rnncell, "_l0")
    V = seed.rnncell.V.detach()
    x = torch.randn(B, T, I)
    y_seed, h_seed = seed(x)
    dev = _dev(backend)
    hs, h_n = ours.to(dev)(x.to(dev))
    y = torch.sigmoid(hs @ V.to(dev))  # the seed's head y = σ(hV)
    assert y.shape == y_seed.shape == (B, T, H)
    assert rel_err(y.cpu(), y_seed) < TOL
    assert rel_err(h_n[0].cpu(), h_seed) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_cell(backend):
    seed = RNNCell(I, H)
    ours = fused_rnn.RNNCell(I, H, backend=backend)
    _load_rnn_cell(ours, seed, "")
    x, h0 = torch.randn(B, I), torch.randn(B, H)
    y_seed, h_seed = seed(x, h0)
    dev = _dev(backend)
    h = ours.to(dev)(x.to(dev), h0.to(dev)).cpu()
    assert rel_err(h, h_seed) < TOL
    assert rel_err(torch.sigmoid(h @ seed.V.detach()), y_seed) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_rnn(backend):
    """Two independent seed RNNs, one over the reversed sequence; outputs concatenated (2q)."""
    fwd, bwd = RNNCell(I, H), RNNCell(I, H)
    x = torch.randn(B, T, I)

    def run(cell, xs):
        h, hs = torch.zeros(B, H), []
        for t in range(xs.shape[1]):
            _, h = cell(xs[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)

    seed_out = torch.cat([run(fwd, x), run(bwd, x.flip(1)).flip(1)], dim=-1)
    ours = fused_rnn.RNN(I, H, batch_first=True, bidirectional=True, backend=backend)
    _load_rnn_cell(ours, fwd, "_l0")
    _load_rnn_cell(ours, bwd, "_l0_reverse")
    dev = _dev(backend)
    out, h_n = ours.to(dev)(x.to(dev))
    assert out.shape == (B, T, 2 * H)
    assert rel_err(out.cpu(), seed_out) < TOL
    assert rel_err(h_n[1].cpu(), seed_out[:, 0, H:]) < TOL  # the reverse direction ends at t=0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_rnn(backend):
    """Stacked seed cells: each layer's hidden sequence feeds the next."""
    n_layers = 3
    cells = [RNNCell(I if k == 0 else H, H) for k in range(n_layers)]
    x = torch.randn(B, T, I)
    inp = x
    for cell in cells:
        h, hs = torch.zeros(B, H), []
        for t in range(T):
            _, h = cell(inp[:, t], h)
            hs.append(h)
        inp = torch.stack(hs, 1)
    ours = fused_rnn.RNN(I, H, num_layers=n_layers, batch_first=True, backend=backend)
    for k, cell in enumerate(cells):
        _load_rnn_cell(ours, cell, f"_l{k}")
    dev = _dev(backend)
    out, _ = ours.to(dev)(x.to(dev))
    assert rel_err(out.cpu(), inp) < TOL


def _lstm_grads(module, leaves):
    return [t.grad for t in leaves] + [p.grad for p in module.parameters()]


def _seed_and_ours(cls, layer_norm: bool, backend: str, sfx: str):
    """The seed's LSTMCell (random LayerNorm parameters) and a fused_rnn ``cls`` holding its weights."""
    seed = LSTMCell(I, H, layer_norm=layer_norm)
    if layer_norm:
        _randomize_layer_norms(seed)
    ours = cls(I, H, layer_norm=layer_norm, backend=backend)
    _load_lstm_cell(ours, seed, sfx)
    return seed, ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layernorm"])
def test_lstm_cell(layer_norm, backend):
    seed, ours = _seed_and_ours(fused_rnn.LSTMCell, layer_norm, backend, "")
    x, h0, c0 = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    h_s, c_s = seed(x, h0, c0)
    dev = _dev(backend)
    h, c = ours.to(dev)(x.to(dev), (h0.to(dev), c0.to(dev)))
    assert rel_err(h.cpu(), h_s) < TOL and rel_err(c.cpu(), c_s) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layernorm"])
def test_layer_norm_lstm_sequence_with_gradients(layer_norm, backend):
    """The seed's LSTMCell looped over time vs fused_rnn.LSTM(layer_norm=...), with gradients."""
    seed, ours = _seed_and_ours(fused_rnn.LSTM, layer_norm, backend, "_l0")
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    dout = torch.randn(T, B, H)

    leaves = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
    h, c, outs = leaves[1], leaves[2], []
    for t in range(T):
        h, c = seed(leaves[0][t], h, c)
        outs.append(h)
    seed_out = torch.stack(outs)
    ((seed_out * dout).sum() + h.sum() + c.sum()).backward()

    dev = _dev(backend)
    ours = ours.to(dev)
    mine = [t.clone().to(dev).requires_grad_(True) for t in (x, h0, c0)]
    out, (h_n, c_n) = ours(mine[0], (mine[1][None], mine[2][None]))
    ((out * dout.to(dev)).sum() + h_n.sum() + c_n.sum()).backward()

    assert rel_err(out.cpu(), seed_out) < TOL
    assert rel_err(c_n[0].cpu(), c) < TOL
    for a, b in zip([t.grad for t in mine], [t.grad for t in leaves]):
        assert rel_err(a.cpu(), b) < 1e-4
    g = {n: p.grad.cpu() for n, p in ours.named_parameters()}
    assert rel_err(g["weight_ih_l0"], seed.input_lin.weight.grad) < 1e-4
    assert rel_err(g["weight_hh_l0"], seed.hidden_lin.weight.grad) < 1e-4
    assert rel_err(g["bias_hh_l0"], seed.hidden_lin.bias.grad) < 1e-4
    if layer_norm:
        seed_gw = torch.cat([ln.weight.grad for ln in seed.layer_norm])
        assert rel_err(g["ln_gate_weight_l0"], seed_gw) < 1e-4
        assert rel_err(g["ln_cell_bias_l0"], seed.layer_norm_c.bias.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_multilayer_lstm(with_state, backend):
    n_layers = 3
    seed = LSTM(I, H, n_layers)
    ours = fused_rnn.LSTM(I, H, num_layers=n_layers, backend=backend)
    for k, cell in enumerate(seed.cells):
        _load_lstm_cell(ours, cell, f"_l{k}")
    x = torch.randn(T, B, I)
    state = (torch.randn(n_layers, B, H), torch.randn(n_layers, B, H)) if with_state else None
    out_s, (h_s, c_s) = seed(x, state)
    dev = _dev(backend)
    st = None if state is None else tuple(s.to(dev) for s in state)
    out, (h, c) = ours.to(dev)(x.to(dev), st)
    assert out.shape == out_s.shape and h.shape == h_s.shape == (n_layers, B, H)
    assert rel_err(out.cpu(), out_s) < TOL
    assert rel_err(h.cpu(), h_s) < TOL and rel_err(c.cpu(), c_s) < TOL
