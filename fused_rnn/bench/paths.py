"""What a benchmark row runs: fused_rnn's paths (registered by name, selected by ``--paths``)
and the baselines (torch.nn / cuDNN, the reference loop, torch.compile of the reference cell).

A path's ``build(problem)`` returns the forward callable; a baseline's returns the callable and
the leaves whose grads are reset between runs. Everything that reaches into the kernels sits in
the small functions of the first section.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._backend import interpreter_broken, interpreter_on, triton_available
from ..gru import gru_sequence
from ..kernels import config
from ..lstm import lstm_sequence
from ..reference import gru_cell_ref, lstm_cell_ref, rnn_cell_ref
from ..rnn import rnn_sequence
from .cases import LSTM_CELLS, Build, Case, Problem, proj_size, register_path


# ------------------------------------------------- kernel internals (each in one small function)
def _allow_tf32(p: Problem) -> bool:
    """TF32 as the launchers take it (torch's matmul flag, for fp32 on CUDA)."""
    from .._backend import allow_tf32

    return allow_tf32(p.x)


def _default_fused(p: Problem) -> bool:
    """Whether the LSTM launchers take the fused step kernels here (the RNN's and GRU's always are)."""
    return p.cell in ("rnn", "gru") or config.default_fused(p.H, p.ln, p.dtype)


def _step_tiles(p: Problem, direction: str, fused: bool) -> tuple:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) of the step kernels, as the launchers choose them."""
    from ..kernels import tiles  # imports triton

    n_sm = tiles.sm_count(p.device)
    if p.cell == "rnn":
        return tiles.rnn_blocks(p.B, p.H, direction, True, p.dtype, n_sm)
    if p.cell == "gru":
        return tiles.gru_blocks(p.B, p.H, direction, p.dtype, n_sm)
    return tiles.lstm_blocks(p.B, p.H, direction, fused, p.ln is not None, p.dtype, n_sm)


def _persistent_plans(p: Problem, allow_tf32: bool) -> list:
    """[(plan or None, why not)] of the persistent path, forward and backward, as the launchers
    plan them for this problem (the layer-norm LSTM has its own planner)."""
    from ..kernels import tiles  # imports triton

    if p.cell == "lnlstm":
        return [tiles.plan_ln(d, p.B, p.H, p.dtype, p.device, allow_tf32=allow_tf32)
                for d in ("fwd", "bwd")]
    return [tiles.plan(p.cell, d, p.B, p.H, p.dtype, p.device, allow_tf32=allow_tf32)
            for d in ("fwd", "bwd")]


def _save_gates() -> bool:
    return config.options().save_gates


def _without_saved_gates(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with options().save_gates off: backward recomputes the gate pre-activations."""
    with config.using(save_gates=False):
        return fn()


# ---------------------------------------------------------------------------- paths (fused_rnn)
def functional_path(backend: str, **kwargs) -> Build:
    """A path that calls the functional entry points with ``backend=backend`` (and ``kwargs``)."""

    def build(p: Problem) -> Callable[[], torch.Tensor]:
        if p.cell in LSTM_CELLS:
            def fwd():
                return lstm_sequence(p.x, p.h0, p.c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh,
                                     ln=p.ln, backend=backend, w_hr=p.w_hr, **kwargs)[0]
        elif p.cell == "gru":
            def fwd():
                return gru_sequence(p.x, p.h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, backend=backend, **kwargs)[0]
        else:
            def fwd():
                return rnn_sequence(p.x, p.h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh,
                                    nonlinearity="tanh", backend=backend, **kwargs)[0]
        return fwd

    return build


def _triton_ready(device: torch.device) -> Optional[str]:
    if not triton_available():
        return "the triton package is not importable"
    if device.type == "cpu" and not interpreter_on():
        return "Triton on CPU tensors needs TRITON_INTERPRET=1 (set before Python starts)"
    if device.type == "cpu":
        return interpreter_broken()
    return None


register_path("triton", functional_path("triton"), _triton_ready,
              "fused_rnn's Triton kernels: lstm_sequence / rnn_sequence / gru_sequence(backend='triton')")


def kernel_note(c: Case, p: Problem) -> Optional[str]:
    """What a fused row's kernels take, so its time can be read against what ran: the step
    kernels' tiles (BLOCK_B x BLOCK_H x BLOCK_K / warps) or the persistent plans (programs x row
    blocks, rows, units, the exchange), as the launchers choose them; None for other rows."""
    if c.kind != "fused":
        return None
    fused = _default_fused(p) if p.cell != "lstm_proj" else False
    parts = []
    plans = _persistent_plans(p, _allow_tf32(p)) if c.method == "persistent" else [None, None]
    for d, planned in zip(("fwd", "bwd"), plans):
        if planned is not None:
            pl = planned[0]
            if pl is None:
                return None
            how = "LL" if pl.ll else ("solo" if pl.solo else "barrier")
            w = "W_hh on chip" if pl.resident else "W_hh streamed"
            if pl.w_chunks > 1:
                w = f"W_hh in {pl.w_chunks} chunks"
            parts.append(f"{d} {pl.programs}x{pl.row_blocks} programs, {pl.BLOCK_B}x{pl.BLOCK_H}, {how}, {w}")
        else:
            t = _step_tiles(p, d, fused)
            parts.append(f"{d} {t[0]}x{t[1]}x{t[2]}/{t[3]}w")
    what = "plans" if c.method == "persistent" else ("step tiles" if fused else "step tiles (unfused)")
    if p.cell == "lstm_proj":
        what = "step tiles (unfused, cuBLAS h W_hhᵀ and u W_hrᵀ a step)"
    return f"{what}: " + ", ".join(parts)


def _recompute_build(p: Problem) -> Callable[[], torch.Tensor]:
    """The triton path with the gates not saved by the forward call: backward recomputes the
    gate pre-activations instead of reading the saved [T, B, 4H] (timed against the default)."""
    inner = functional_path("triton")(p)

    def fwd():
        return _without_saved_gates(inner)

    return fwd


register_path("triton-recompute", _recompute_build, _triton_ready,
              "the triton path with config.using(save_gates=False) (gates recomputed in backward)",
              cells=("lstm", "lnlstm"), default=False)  # the projection path always saves them


def _on_path(path: str) -> Build:
    """The triton path's kernel choice (lstm_sequence / rnn_sequence's), with the time loop on
    ``path`` (fused_rnn._paths) for the forward and the backward: the autograd Functions carry
    the path from one to the other. A persistent problem that the planner refuses is an error
    here, not a silent step-path row."""

    def build(p: Problem) -> Callable[[], torch.Tensor]:
        from ..gru import GRUFunction
        from ..lstm import LSTMFunction
        from ..lstm_proj import LSTMProjFunction
        from ..rnn import RNNFunction

        allow_tf32, eps = _allow_tf32(p), config.LN_EPS
        if p.cell == "lstm_proj":  # step or graph (the persistent path does not list this cell)
            def fwd():
                return LSTMProjFunction.apply(p.x, p.h0, p.c0, p.w_ih, p.w_hh, p.w_hr, p.b_ih, p.b_hh,
                                              None, None, None, None, None, eps, allow_tf32, path)[0]
            return fwd
        if p.cell == "gru":  # step or graph (no persistent kernel)
            def fwd():
                return GRUFunction.apply(p.x, p.h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, None, allow_tf32, path)[0]
            return fwd
        fused = _default_fused(p)
        if path == "persistent":
            for d, (plan, why) in zip(("fwd", "bwd"), _persistent_plans(p, allow_tf32)):
                if plan is None:
                    raise RuntimeError(f"persistent {d} not possible: {why}")
        if p.cell in ("lstm", "lnlstm"):
            gw, gb, cw, cb = p.ln if p.ln is not None else (None,) * 4

            def fwd():
                return LSTMFunction.apply(p.x, p.h0, p.c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, gw, gb, cw, cb, None,
                                          eps, allow_tf32, fused, _save_gates(), path)[0]
        else:
            def fwd():
                return RNNFunction.apply(p.x, p.h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, None, "tanh", allow_tf32, True,
                                         path)[0]
        return fwd

    return build


def _graph_ready(device: torch.device) -> Optional[str]:
    why = _triton_ready(device)
    if why:
        return why
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


# Not run by default (the quick GPU sweep has a tight budget): `--paths triton,graph,persistent`
# times them against the eager step path in the same run.
register_path("graph", _on_path("graph"), _graph_ready,
              "the triton path's step launches captured per shape in a CUDA graph and replayed",
              default=False)
register_path("persistent", _on_path("persistent"), _triton_ready,
              "one persistent kernel launch for all T steps (LSTM, layer-norm LSTM, RNN)",
              cells=("lstm", "lnlstm", "rnn"), default=False)


# ------------------------------------------------------------------------------------- baselines
def build_nn(p: Problem):
    """torch.nn.LSTM / nn.RNN / nn.GRU holding the problem's weights (cuDNN on CUDA)."""
    if p.cell == "lnlstm":
        raise ValueError("cuDNN has no layer-norm LSTM")
    lstm = p.cell in LSTM_CELLS
    cls = torch.nn.LSTM if lstm else (torch.nn.GRU if p.cell == "gru" else torch.nn.RNN)
    extra = {} if lstm or p.cell == "gru" else {"nonlinearity": "tanh"}
    if p.cell == "lstm_proj":
        extra = {"proj_size": proj_size(p.cell, p.H)}
    m = cls(p.H, p.H, num_layers=1, **extra).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        m.weight_ih_l0.copy_(p.w_ih)
        m.weight_hh_l0.copy_(p.w_hh)
        m.bias_ih_l0.copy_(p.b_ih)
        m.bias_hh_l0.copy_(p.b_hh)
        if p.w_hr is not None:
            m.weight_hr_l0.copy_(p.w_hr)
    if p.device.type == "cuda":
        m.flatten_parameters()
    # Only the module's weights and x are trained here: drop the problem's own weight leaves so
    # that their memory does not count against cuDNN.
    p.w_ih = p.w_hh = p.b_ih = p.b_hh = p.w_hr = None
    h0 = p.h0.unsqueeze(0)
    state = (h0, p.c0.unsqueeze(0)) if lstm else h0
    x = p.x

    def fwd():
        return m(x, state)[0]

    return fwd, [x] + list(m.parameters())


def build_reference(p: Problem):
    return functional_path("reference")(p), p.leaves()


def build_compile(p: Problem):
    """torch.compile of the reference's one-step cell; the time loop stays in Python."""
    torch._dynamo.reset()  # one code object serves every shape: start each case from a clean cache
    if p.cell == "lstm_proj":
        def step(xp_t, h, c, w_hh_t, w_hr_t):
            u, c = lstm_cell_ref(xp_t + h @ w_hh_t, c)
            return u @ w_hr_t, c
    elif p.cell in ("lstm", "lnlstm"):
        def step(xp_t, h, c, w_hh_t, *ln):
            return lstm_cell_ref(xp_t + h @ w_hh_t, c, ln if ln else None)
    elif p.cell == "gru":
        def step(xp_t, h, w_hh_t, b_hh):
            return gru_cell_ref(xp_t, torch.addmm(b_hh, h, w_hh_t), h)
    else:
        def step(xp_t, h, w_hh_t):
            return rnn_cell_ref(xp_t + h @ w_hh_t, "tanh")
    cstep = torch.compile(step, dynamic=False)

    def fwd():
        xp = F.linear(p.x, p.w_ih, p.b_ih if p.cell == "gru" else p.b_ih + p.b_hh)  # the GRU's b_hh: in hp
        w_hh_t = p.w_hh.t()
        h, c, outs = p.h0, p.c0, []
        for t in range(p.T):
            if p.cell == "rnn":
                h = cstep(xp[t], h, w_hh_t)
            elif p.cell == "gru":
                h = cstep(xp[t], h, w_hh_t, p.b_hh)
            elif p.cell == "lstm_proj":
                h, c = cstep(xp[t], h, c, w_hh_t, p.w_hr.t())
            else:
                h, c = cstep(xp[t], h, c, w_hh_t, *(p.ln or ()))
            outs.append(h)
        return torch.stack(outs)

    return fwd, p.leaves()


BASELINE_BUILDS = {"nn": build_nn, "reference": build_reference, "compile": build_compile}
