"""torch.compile(fullgraph=True) over models using fused_rnn layers: no graph break, and the
same outputs and gradients as eager."""
import pytest
import torch
from torch import nn

import fused_rnn
from conftest import kernel_device, rel_err

B, T, I, H = 3, 6, 5, 11


class Model(nn.Module):
    def __init__(self, backend, layer_norm=False, proj_size=0):
        super().__init__()
        self.lstm = fused_rnn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True,
                                   layer_norm=layer_norm, backend=backend, proj_size=proj_size)
        self.rnn = fused_rnn.RNN(2 * (proj_size or H), H, batch_first=True, backend=backend)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        z, h2 = self.rnn(y)
        return self.head(z).sum() + h.sum() + c.sum() + h2.sum()


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


@pytest.mark.parametrize("layer_norm, proj_size", [(False, 0), (True, 0), (False, 4)],
                         ids=["lstm", "lnlstm", "lstm_proj"])
def test_compile_reference_path_fullgraph(layer_norm, proj_size):
    model = Model("reference", layer_norm, proj_size)
    _check(model, torch.randn(B, T, I), "aot_eager")


def test_compile_inductor_cpu():
    model = Model("auto")
    _check(model, torch.randn(B, T, I), "inductor")


@pytest.mark.skipif(kernel_device() is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("layer_norm, proj_size", [(False, 0), (True, 0), (False, 4)],
                         ids=["lstm", "lnlstm", "lstm_proj"])
def test_compile_triton_path_fullgraph(layer_norm, proj_size):
    dev = kernel_device()
    model = Model("triton", layer_norm, proj_size).to(dev)
    _check(model, torch.randn(B, T, I, device=dev), "aot_eager")
