"""torch.compile(fullgraph=True) over models using fused_rnn layers: no graph break, and the
same outputs and gradients as eager."""
import pytest
import torch
from torch import nn

import fused_rnn
from conftest import kernel_device, rel_err

B, T, I, H = 3, 6, 5, 11


class Model(nn.Module):
    def __init__(self, backend, layer_norm=False, proj_size=0, nonlinearity="tanh"):
        super().__init__()
        self.lstm = fused_rnn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True,
                                   layer_norm=layer_norm, backend=backend, proj_size=proj_size)
        self.rnn = fused_rnn.RNN(2 * (proj_size or H), H, batch_first=True, backend=backend,
                                 nonlinearity=nonlinearity)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        z, h2 = self.rnn(y)
        return self.head(z).sum() + h.sum() + c.sum() + h2.sum()


class CellModel(nn.Module):
    """The cells stepped over time in Python, as a user writes it."""

    def __init__(self, backend, layer_norm=False, nonlinearity="tanh"):
        super().__init__()
        self.lstm = fused_rnn.LSTMCell(I, H, layer_norm=layer_norm, backend=backend)
        self.rnn = fused_rnn.RNNCell(H, H, nonlinearity=nonlinearity, backend=backend)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        hc = h2 = None
        for t in range(x.shape[1]):
            hc = self.lstm(x[:, t], hc)
            h2 = self.rnn(hc[0], h2)
        return self.head(h2).sum() + hc[1].sum()


def _check(model, x, compile_backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (model, compiled):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        loss = fn(xi)
        loss.backward()
        results.append([loss, xi.grad] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-5


# every layer: LSTM plain, layer-norm, projected; RNN tanh, relu; and both cells in each variant
LAYERS = [pytest.param(Model, dict(), id="lstm-rnn_tanh"),
          pytest.param(Model, dict(layer_norm=True, nonlinearity="relu"), id="lnlstm-rnn_relu"),
          pytest.param(Model, dict(proj_size=4), id="lstm_proj-rnn_tanh"),
          pytest.param(CellModel, dict(), id="lstm_cell-rnn_cell_tanh"),
          pytest.param(CellModel, dict(layer_norm=True, nonlinearity="relu"),
                       id="lnlstm_cell-rnn_cell_relu")]


@pytest.mark.parametrize("cls, kw", LAYERS)
def test_compile_reference_path_fullgraph(cls, kw):
    model = cls("reference", **kw)
    _check(model, torch.randn(B, T, I), "aot_eager")


def test_compile_inductor_cpu():
    model = Model("auto")
    _check(model, torch.randn(B, T, I), "inductor")


@pytest.mark.skipif(kernel_device() is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("cls, kw", LAYERS)
def test_compile_triton_path_fullgraph(cls, kw):
    dev = kernel_device()
    model = cls("triton", **kw).to(dev)
    _check(model, torch.randn(B, T, I, device=dev), "aot_eager")
