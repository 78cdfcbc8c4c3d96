"""torch.export.export of models holding fused_rnn layers: the export traces (on the triton
backend, through the custom ops' fake implementations) and the exported program gives the eager
outputs. The triton backend runs in the interpreter lane; the others in both."""
import pytest
import torch
from torch import nn

import fused_rnn
from conftest import kernel_device

T, B, I, H = 4, 3, 5, 6


class Model(nn.Module):
    def __init__(self, kind, backend):
        super().__init__()
        if kind in ("rnn", "gru"):
            self.rnn = (fused_rnn.RNN if kind == "rnn" else fused_rnn.GRU)(I, H, backend=backend)
        else:
            kw = dict(layer_norm=kind == "lstm_ln", proj_size=3 if kind == "lstm_proj" else 0,
                      num_layers=2 if kind == "lstm_2l_bidir" else 1, bidirectional=kind == "lstm_2l_bidir")
            self.rnn = fused_rnn.LSTM(I, H, backend=backend, **kw)
        self.head = nn.Linear(self.rnn.proj_size or H * (2 if self.rnn.bidirectional else 1), 2)

    def forward(self, x):
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(out), h


KINDS = ["lstm", "lstm_ln", "lstm_proj", "lstm_2l_bidir", "rnn", "gru"]
BACKENDS = ["auto", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    kernel_device() is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_export_matches_eager(kind, backend):
    dev = kernel_device() if backend == "triton" else torch.device("cpu")
    model = Model(kind, backend).to(dev).eval()
    x = torch.randn(T, B, I, device=dev)
    program = torch.export.export(model, (x,))
    if backend == "triton":  # the kernels are in the graph as fused_rnn's custom ops
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any(o.startswith("fused_rnn.") for o in ops), ops
    x2 = torch.randn(T, B, I, device=dev)  # not the input it was traced with
    for got, want in zip(program.module()(x2), model(x2)):
        torch.testing.assert_close(got, want)
