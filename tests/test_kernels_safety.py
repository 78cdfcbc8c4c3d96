"""Kernel safety on a GPU: int64 offsets where T·B·4H (LSTM) or T·B·H (RNN) passes 2³¹.

CUDA only (skipped elsewhere): each case allocates ~25-35 GB. The last K steps are the ones whose
offsets pass 2³¹; their outputs, the final states and their input gradients are checked against
the reference run over the same steps from the reference state at T − K.
"""
import fcntl
import os
import tempfile

import pytest
import torch

from conftest import rel_err, requires_cuda
from fused_rnn.lstm import LSTMFunction
from fused_rnn.kernels import config
from fused_rnn.reference import lstm_sequence_ref, rnn_sequence_ref
from fused_rnn.rnn import RNNFunction

pytestmark = requires_cuda


@pytest.fixture(autouse=True)
def _one_big_case_at_a_time():
    """Under pytest-xdist (bench/gpu_check.sh runs 4 workers) two of these ~30 GB cases at once
    could run an 80 GB card out of memory: a file lock serialises them across workers."""
    with open(os.path.join(tempfile.gettempdir(), "fused_rnn_bigmem.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(f, fcntl.LOCK_UN)
K = 4  # checked tail steps
TOL = 2e-2  # bf16 storage


def _tail_lengths(L, t0, n):
    return (L - t0).clamp(0, n)


@torch.no_grad()
def _ref_prefix_state(step, x, state, L, t_end, chunk=512):
    """The reference state after steps [0, t_end), run in chunks to bound memory."""
    for t0 in range(0, t_end, chunk):
        n = min(chunk, t_end - t0)
        state = step(x[t0:t0 + n], state, _tail_lengths(L, t0, n))
    return state


@pytest.mark.parametrize("cell,fused", [("lstm", True), ("lnlstm", True), ("lnlstm", False)],
                         ids=["lstm-fused", "lnlstm-fused", "lnlstm-unfused"])
def test_lstm_int64_offsets(cell, fused):
    dev, dt = torch.device("cuda"), torch.bfloat16
    T, B, I, H = 4100, 512, 8, 256  # T·B·4H = 2.15e9 > 2³¹ from step 4096 on
    assert T * B * 4 * H > 2 ** 31 and (T - K) * B * 4 * H <= 2 ** 31
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=dev) * scale).to(dt)

    k = 1.0 / H ** 0.5
    x, h0, c0 = r(T, B, I), r(B, H), r(B, H)
    w_ih, w_hh, b_ih, b_hh = r(4 * H, I, scale=k), r(4 * H, H, scale=k), r(4 * H, scale=k), r(4 * H, scale=k)
    ln = (r(4 * H, scale=0.1) + 1, r(4 * H, scale=0.1), r(H, scale=0.1) + 1, r(H, scale=0.1)) if cell == "lnlstm" \
        else None
    L = torch.full((B,), T, dtype=torch.int64, device=dev)
    L[::3] = T - 2  # some sequences end inside the checked tail
    xg = x.clone().requires_grad_()
    lnp = ln if ln is not None else (None,) * 4
    out, h_n, c_n = LSTMFunction.apply(xg, h0, c0, w_ih, w_hh, b_ih, b_hh, *lnp, L, config.LN_EPS, False, fused, True)
    dout = torch.zeros_like(out)
    dout[T - K:] = r(K, B, H)
    dh_n, dc_n = r(B, H), r(B, H)
    ((out * dout).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum()).backward()

    # the reference in fp32 (its state is returned in the input's dtype)
    w32 = [t.float() for t in (w_ih, w_hh, b_ih, b_hh)]
    ln32 = None if ln is None else tuple(p.float() for p in ln)

    def step(xc, state, Lc):
        _, h, c = lstm_sequence_ref(xc.float(), state[0], state[1], *w32, ln32, Lc)
        return h, c

    h, c = _ref_prefix_state(step, x, (h0.float(), c0.float()), L, T - K)
    xt = x[T - K:].float().requires_grad_()
    ro, rh, rc = lstm_sequence_ref(xt, h, c, *w32, ln32, _tail_lengths(L, T - K, K))
    ((ro * dout[T - K:].float()).sum() + (rh * dh_n.float()).sum() + (rc * dc_n.float()).sum()).backward()
    assert rel_err(out[T - K:], ro) < TOL
    assert rel_err(h_n, rh) < TOL
    assert rel_err(c_n, rc) < TOL
    assert rel_err(xg.grad[T - K:], xt.grad) < TOL
    assert not torch.isnan(xg.grad).any()
    del out, xg, dout
    torch.cuda.empty_cache()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_rnn_int64_offsets(fused):
    dev, dt = torch.device("cuda"), torch.bfloat16
    T, B, I, H = 2052, 1024, 8, 1024  # T·B·H = 2.15e9 > 2³¹ from step 2048 on
    assert T * B * H > 2 ** 31 and (T - K) * B * H <= 2 ** 31
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=dev) * scale).to(dt)

    k = 1.0 / H ** 0.5
    x, h0 = r(T, B, I), r(B, H)
    w_ih, w_hh, b_ih, b_hh = r(H, I, scale=k), r(H, H, scale=k), r(H, scale=k), r(H, scale=k)
    L = torch.full((B,), T, dtype=torch.int64, device=dev)
    L[::3] = T - 2
    xg = x.clone().requires_grad_()
    out, h_n = RNNFunction.apply(xg, h0, w_ih, w_hh, b_ih, b_hh, L, "tanh", False, fused)
    dout = torch.zeros_like(out)
    dout[T - K:] = r(K, B, H)
    dh_n = r(B, H)
    ((out * dout).sum() + (h_n * dh_n).sum()).backward()

    w32 = [t.float() for t in (w_ih, w_hh, b_ih, b_hh)]

    def step(xc, state, Lc):
        return rnn_sequence_ref(xc.float(), state, *w32, Lc, "tanh")[1]

    h = _ref_prefix_state(step, x, h0.float(), L, T - K)
    xt = x[T - K:].float().requires_grad_()
    ro, rh = rnn_sequence_ref(xt, h, *w32, _tail_lengths(L, T - K, K), "tanh")
    ((ro * dout[T - K:].float()).sum() + (rh * dh_n.float()).sum()).backward()
    assert rel_err(out[T - K:], ro) < TOL
    assert rel_err(h_n, rh) < TOL
    assert rel_err(xg.grad[T - K:], xt.grad) < TOL
    assert not torch.isnan(xg.grad).any()
    del out, xg, dout
    torch.cuda.empty_cache()
