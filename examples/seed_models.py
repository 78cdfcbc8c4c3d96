"""Every model of the study note (../shared/seed/), built with fused_rnn.

Run: python examples/seed_models.py   (CPU: the reference path; CUDA: the Triton kernels)

The note writes the RNN as ``h_t = tanh(x_t U + b1 + h_{t-1} W + b2)``; that is nn.RNN's
``x W_ihᵀ + b_ih + h W_hhᵀ + b_hh`` with ``W_ih = Uᵀ, W_hh = Wᵀ``. Its LSTM cell's
``input_lin`` / ``hidden_lin`` are ``W_ih`` / ``W_hh`` with nn.LSTM's gate order i, f, g, o.
tests/test_seed_models.py checks each of these against the note's own code.
"""
import torch
from torch import nn

import fused_rnn

device = "cuda" if torch.cuda.is_available() else "cpu"
B, T, D_IN, D_H = 4, 12, 8, 16


class SeedRNN(nn.Module):
    """1-2. The tanh RNN over [batch, seq, dim] with the note's output head y_t = σ(V h_t)."""

    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.rnn = fused_rnn.RNN(input_dim, output_dim, batch_first=True)
        self.V = nn.Linear(output_dim, output_dim, bias=False)

    def forward(self, x):
        h_seq, h_n = self.rnn(x)  # h0 = 0, as in the note
        return torch.sigmoid(self.V(h_seq)), h_n[-1]


# 3. Bidirectional RNN: two independent directions, outputs concatenated (2q features).
birnn = fused_rnn.RNN(D_IN, D_H, batch_first=True, bidirectional=True)

# 4. Deep RNN: stacked layers, each layer's hidden sequence feeds the next.
deep_rnn = fused_rnn.RNN(D_IN, D_H, num_layers=3, batch_first=True)

# 5. LSTM cell, plain and with the note's layer norm (LayerNorm on each gate and on c_t).
cell = fused_rnn.LSTMCell(D_IN, D_H)
ln_cell = fused_rnn.LSTMCell(D_IN, D_H, layer_norm=True)

# 6. Multi-layer LSTM, input [seq, batch, in], optional state (h, c) each [n_layers, batch, hidden].
lstm = fused_rnn.LSTM(D_IN, D_H, num_layers=2)
ln_lstm = fused_rnn.LSTM(D_IN, D_H, num_layers=2, layer_norm=True)  # cuDNN has no such layer


def main():
    torch.manual_seed(0)
    x_bf = torch.randn(B, T, D_IN, device=device)  # batch first
    x_tm = x_bf.transpose(0, 1)  # time major
    rnn = SeedRNN(D_IN, D_H).to(device)
    y, h = rnn(x_bf)
    print(f"RNN + head      y {tuple(y.shape)}, h {tuple(h.shape)}")
    out, h_n = birnn.to(device)(x_bf)
    print(f"bidirectional   out {tuple(out.shape)} (2q = {2 * D_H}), h_n {tuple(h_n.shape)}")
    out, h_n = deep_rnn.to(device)(x_bf)
    print(f"deep RNN        out {tuple(out.shape)}, h_n {tuple(h_n.shape)}")
    h0 = torch.zeros(B, D_H, device=device)
    for name, c in (("LSTM cell", cell), ("LN-LSTM cell", ln_cell)):
        h1, c1 = c.to(device)(x_bf[:, 0], (h0, h0))
        print(f"{name:15s} h {tuple(h1.shape)}, c {tuple(c1.shape)}")
    state = (torch.zeros(2, B, D_H, device=device), torch.zeros(2, B, D_H, device=device))
    for name, m in (("LSTM", lstm), ("LN-LSTM", ln_lstm)):
        out, (h, c) = m.to(device)(x_tm, state)
        out.sum().backward()
        print(f"{name:15s} out {tuple(out.shape)}, h {tuple(h.shape)}, c {tuple(c.shape)}, "
              f"|dW_hh| = {m.weight_hh_l0.grad.norm():.3f}")


if __name__ == "__main__":
    main()
