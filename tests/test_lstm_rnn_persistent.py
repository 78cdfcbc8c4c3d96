"""Persistent kernels of the plain LSTM and the tanh/ReLU RNN (fused_rnn.kernels.lstm_persistent,
rnn_persistent: one launch for all T steps of a layer, forward and backward), through the path
choice (fused_rnn._paths). Their plans and the path policy: tests/test_persistent_plan.py; their
sm_90 compiles: tests/test_persistent_machinery.py.

Under the Triton interpreter (CPU) a grid's programs run one after another, so only a
single-program grid can pass the grid barrier: there plan() gives one program covering all of H,
and these tests compare that single-program path with the fp64 reference and with the step path.
The multi-program path (one program per BLOCK_H hidden units, the programs meeting at a global
barrier each step) runs only on a GPU: the CUDA tests at the end compare it with the step path.
Buffers are NaN-poisoned (options().poison), so an element a kernel leaves unwritten fails.
"""
import os

import pytest
import torch

from _persistent_helpers import _poison_and_fresh_warnings, use_options  # noqa: F401 (fixtures)
import conftest
from conftest import (
    BF16, DT_NAME, F16, F32, F64, HAS_CUDA, kernel_device, launch_plan, rel_err, requires_cuda, requires_kernels,
    tol,
)
from fused_rnn import _paths
from fused_rnn.kernels.config import LN_EPS
from fused_rnn.lstm import LSTMFunction
from fused_rnn.reference import lstm_sequence_ref, rnn_sequence_ref
from fused_rnn.rnn import RNNFunction


DEV = kernel_device()


@pytest.fixture
def spy(monkeypatch):
    """Counts the persistent launches (so a test knows the persistent kernels really ran)."""
    from fused_rnn.kernels import ln_lstm_persistent, lstm_persistent, rnn_persistent

    calls = {}
    for mod, names in ((lstm_persistent, ("lstm_fwd_loop", "lstm_bwd_loop")),
                       (rnn_persistent, ("rnn_fwd_loop", "rnn_bwd_loop")),
                       (ln_lstm_persistent, ("ln_lstm_fwd_loop", "ln_lstm_bwd_loop"))):
        for name in names:
            real = getattr(mod, name)

            def wrapped(*a, _real=real, _name=name, **k):
                calls[_name] = calls.get(_name, 0) + 1
                return _real(*a, **k)

            monkeypatch.setattr(mod, name, wrapped)
    return calls


def make_case(cell, T, B, I, H, dtype, bias=True, lengths=None, seed=0):
    """Inputs [x, h0, (c0), w_ih, w_hh, b_ih, b_hh] in ``dtype`` on DEV, lengths, upstream grads."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device=DEV, dtype=dtype)

    G = 4 * H if cell == "lstm" else H
    k = (2.0 if cell == "lstm" else 1.5) / H ** 0.5
    ins = [r(T, B, I), r(B, H)] + ([r(B, H)] if cell == "lstm" else []) + [r(G, I, scale=k), r(G, H, scale=k)]
    ins += [r(G, scale=k), r(G, scale=k)] if bias else [None, None]
    L = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEV)
    ups = [r(T, B, H), r(B, H)] + ([r(B, H)] if cell == "lstm" else [])
    return ins, L, ups


def runner(cell, path, nonlinearity="tanh"):
    """fn(ins, lengths) -> outputs, through the autograd Function on ``path`` (fwd and bwd)."""
    if cell == "lstm":
        def fn(ins, L):
            x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
            return LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, None, None, L, LN_EPS, False,
                                      True, True, path)
    else:
        def fn(ins, L):
            return RNNFunction.apply(*ins, L, nonlinearity, False, True, path)
    return fn


def reference(cell, nonlinearity="tanh"):
    if cell == "lstm":
        def fn(ins, L):
            x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
            return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, L)
    else:
        def fn(ins, L):
            return rnn_sequence_ref(*ins, L, nonlinearity)
    return fn


def fwd_bwd(fn, ins, L, ups, dtype=None):
    """Outputs, then the gradients of every tensor input: conftest.fwd_bwd's as one list."""
    outs, grads = conftest.fwd_bwd(fn, ins, L, ups, dtype)
    return outs + grads


def assert_close(ours, ref, tolerance, what):
    conftest.assert_close(ours, ref, tolerance, [f"{what}[{i}]" for i in range(len(ours))])


# (id, T, B, I, H, lengths, bias): H not a power of two, B not a multiple of 16, T = 1, a zero
# length and one past T, no bias.
SHAPES = {
    "B3-T7-H37-len": (7, 3, 5, 37, [7, 3, 0], True),
    "B17-T3-H20-len": (3, 17, 4, 20, [3, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 5, 2, 2, 1, 3, 1], True),
    "B5-T1-H16": (1, 5, 5, 16, None, True),
    "B2-T4-H7-nobias": (4, 2, 3, 7, None, False),
    # 2 row blocks of 64 (each with its own barrier), the second one partial
    "B70-T3-H12-len": (3, 70, 4, 12, [3 - b % 4 for b in range(70)], True),
}


def _cases():
    for sid in SHAPES:
        yield pytest.param("lstm", "tanh", sid, F32, id=f"lstm-{sid}-fp32")
        yield pytest.param("rnn", "tanh", sid, F32, id=f"rnn-tanh-{sid}-fp32")
    for sid in ("B3-T7-H37-len", "B17-T3-H20-len"):
        yield pytest.param("lstm", "tanh", sid, F64, id=f"lstm-{sid}-fp64")
    yield pytest.param("rnn", "tanh", "B3-T7-H37-len", F64, id="rnn-tanh-B3-T7-H37-len-fp64")
    yield pytest.param("rnn", "relu", "B3-T7-H37-len", F32, id="rnn-relu-B3-T7-H37-len-fp32")
    yield pytest.param("lstm", "tanh", "B3-T7-H37-len", BF16, id="lstm-B3-T7-H37-len-bf16")


@requires_kernels
@pytest.mark.parametrize("cell,nl,sid,dtype", list(_cases()))
def test_persistent_matches_reference_and_step(cell, nl, sid, dtype, spy):
    """Forward and backward on the persistent path against the fp64 reference, and against the
    step path (closely: the same math, only the matmul's summation order may differ)."""
    T, B, I, H, lengths, bias = SHAPES[sid]
    ins, L, ups = make_case(cell, T, B, I, H, dtype, bias, lengths)
    ours = fwd_bwd(runner(cell, "persistent", nl), ins, L, ups)
    assert spy == {f"{cell}_fwd_loop": 1, f"{cell}_bwd_loop": 1}
    step = fwd_bwd(runner(cell, "step", nl), ins, L, ups)
    ref = fwd_bwd(reference(cell, nl), ins, L, ups, dtype=F64)
    for a, t in zip(ours[len(ups):], [t for t in ins if t is not None]):
        assert a.dtype == t.dtype
    assert_close(ours, ref, tol(dtype), "vs reference")
    close = {F64: 1e-13, F32: 1e-6}.get(dtype, 1e-2)
    assert_close(ours, step, close, "vs step path")
    if L is not None:  # steps past a sequence's end write zero output
        t_idx = torch.arange(T, device=DEV).unsqueeze(1)
        assert (ours[0][t_idx >= L.unsqueeze(0)] == 0).all()


@requires_kernels
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_persistent_streamed_weights(cell, monkeypatch, spy):
    """RESIDENT=False (W_hh re-read in BLOCK_K chunks each step, the fallback for a slice too big
    to keep on chip) gives the step path's results."""
    from fused_rnn.kernels import tiles

    monkeypatch.setattr(tiles, "W_RESIDENT_MAX_BYTES", 0)
    T, B, I, H, lengths, bias = SHAPES["B3-T7-H37-len"]
    pl, _ = tiles.plan(cell, "fwd", B, H, F32, DEV)
    assert pl is not None and not pl.resident
    ins, L, ups = make_case(cell, T, B, I, H, F32, bias, lengths)
    ours = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
    assert spy == {f"{cell}_fwd_loop": 1, f"{cell}_bwd_loop": 1}
    step = fwd_bwd(runner(cell, "step"), ins, L, ups)
    assert_close(ours, step, 1e-6, "vs step path")


@requires_kernels
@pytest.mark.skipif(HAS_CUDA, reason="the single-program (interpreter) plans: on a GPU the plans differ "
                    "(fp32 streams W_hh, the variants change warps and BLOCK_H); the CUDA tests below cover them")
@pytest.mark.parametrize("mode", ["ll-resident", "ll-streamed", "solo"])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_persistent_ll_exchange_and_solo_match_barrier(cell, dtype, mode, monkeypatch, use_options):
    """Options.ll_sync (rows passed as tagged words: 16-bit values in 32-bit words, fp32 in 64-bit ones)
    and Options.solo (one program owning every column, the row carried in registers, no barrier) give
    the barrier kernels' results bit for bit on one program (the interpreter's grid; LL's
    multi-program path: tests/test_persistent_threads.py and the CUDA tests below), and the
    launchers really take them (a ring for LL; no counter for either). fp64 takes neither."""
    from fused_rnn.kernels import persistent, tiles

    if mode == "ll-streamed":
        monkeypatch.setattr(tiles, "W_RESIDENT_MAX_BYTES", 0)
    T, B, I, H, lengths, bias = SHAPES["B17-T3-H20-len"]
    ins, L, ups = make_case(cell, T, B, I, H, dtype, bias, lengths)
    barrier = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
    rings, counters = [], []
    real_ring, real_counter = persistent.ll_ring, persistent.sync_counter
    monkeypatch.setattr(persistent, "ll_ring", lambda *a: rings.append(real_ring(*a)) or rings[-1])
    monkeypatch.setattr(persistent, "sync_counter", lambda *a: counters.append(real_counter(*a)) or counters[-1])
    use_options(**{"ll_sync" if mode.startswith("ll") else "solo": True})
    pl, _ = tiles.plan(cell, "bwd", B, H, dtype, DEV)
    assert (pl.ll, pl.solo) == (mode.startswith("ll"), mode == "solo") and pl.resident == (mode != "ll-streamed")
    ours = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
    word = torch.int64 if dtype == F32 else torch.int32
    if mode == "solo":
        assert rings == [None, None]
    else:
        assert len(rings) == 2 and all(r is not None and r.dtype == word for r in rings), rings
    assert counters == []  # no barrier
    for i, (a, b) in enumerate(zip(ours, barrier)):
        assert not torch.isnan(a).any() and torch.equal(a, b), f"output {i}"
    p64 = tiles.plan(cell, "fwd", B, H, F64, DEV)[0]
    assert not p64.ll and not p64.solo  # fp64: neither


@requires_kernels
@pytest.mark.skipif(HAS_CUDA, reason="forces single-program (interpreter) plans; on a GPU plan() takes w_chunks "
                    "plans itself (S4), which the CUDA tests below run")
@pytest.mark.parametrize("ll", [False, True], ids=["barrier", "ll"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_persistent_chunk_resident_weights(cell, dtype, ll, monkeypatch, use_options):
    """W_hh kept on chip as w_chunks tiles of BLOCK_K rows per gate, the rows read chunk by chunk
    (Options.w_chunked plans; plan() takes them only on a GPU, so they are forced here): bit for bit the
    streamed path with the same BLOCK_K (the same products summed in the same order: BLOCK_K = 16
    divides H = 32, so the backward's chunks of 4H never straddle two gates), with or without the
    LL exchange; and at H = 37 (a partial last chunk) close to the step path."""
    from dataclasses import replace

    from fused_rnn.kernels import tiles
    from test_persistent_threads import _spy as _spy_plans

    real = tiles.plan
    force = {}

    def plan(*a, **k):
        pl, why = real(*a, **k)
        return (replace(pl, **force) if pl is not None else pl), why

    monkeypatch.setattr(tiles, "plan", plan)
    use_options(ll_sync=ll)
    launched = _spy_plans(monkeypatch)  # the plans each persistent launch got
    for H, lengths in ((32, [4, 2, 0]), (37, None)):
        ins, L, ups = make_case(cell, 4, 3, 5, H, dtype, True, lengths)
        nk = -(-H // 16)
        force.update(resident=False, BLOCK_K=16, w_chunks=1, num_stages=3)
        streamed = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
        force.update(resident=True, BLOCK_K=16, w_chunks=nk, num_stages=1)
        chunked = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
        assert [(pl.resident, pl.w_chunks, pl.ll) for pl in launched[-4:]] == [(False, 1, ll)] * 2 + [(True, nk, ll)] * 2
        if H == 32:
            for i, (a, b) in enumerate(zip(chunked, streamed)):
                assert not torch.isnan(a).any() and torch.equal(a, b), f"H {H} output {i}: rel err {rel_err(a, b):.2e}"
        else:
            step = fwd_bwd(runner(cell, "step"), ins, L, ups)
            assert_close(chunked, step, 1e-6 if dtype == F32 else 1e-2, f"H {H} vs step path")


@requires_kernels
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_persistent_saved_tensors_pair_with_either_backward(cell):
    """The persistent forward saves what the step forward saves (same layouts; fp64 bitwise), and
    each forward pairs with either backward."""
    from fused_rnn.kernels import lstm as KL, rnn as KR

    T, B, I, H, lengths, bias = SHAPES["B17-T3-H20-len"]
    ins, L, ups = make_case(cell, T, B, I, H, F64, bias, lengths)
    if cell == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
        fwd = {p: KL.lstm_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, L, plan=launch_plan(p, "fwd", x, w_hh))
               for p in ("step", "persistent")}
        for a, b in zip(fwd["persistent"], fwd["step"]):  # out, h_n, c_n, hs, cs, gates
            assert torch.equal(a, b)
        res = {}
        for pf in ("step", "persistent"):
            out, h_n, c_n, hs, cs, gates = fwd[pf]
            for pb in ("step", "persistent"):
                res[pf, pb] = KL.lstm_bwd(*ups, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, None, L,
                                          plan=launch_plan(pb, "bwd", x, w_hh))[:6]
    else:
        x, h0, w_ih, w_hh, b_ih, b_hh = ins
        fwd = {p: KR.rnn_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, L, plan=launch_plan(p, "fwd", x, w_hh))
               for p in ("step", "persistent")}
        for a, b in zip(fwd["persistent"], fwd["step"]):  # out, h_n, hs
            assert torch.equal(a, b)
        res = {(pf, pb): KR.rnn_bwd(*ups, x, w_ih, w_hh, fwd[pf][2], L, plan=launch_plan(pb, "bwd", x, w_hh))
               for pf in ("step", "persistent") for pb in ("step", "persistent")}
    base = res["step", "step"]
    for k, v in res.items():
        assert_close(v, base, 1e-13, f"fwd {k[0]}, bwd {k[1]}")


@requires_kernels
@pytest.mark.parametrize("cell,nl", [("lstm", "tanh"), ("rnn", "tanh"), ("rnn", "relu")])
def test_persistent_gradcheck(cell, nl):
    """fp64 gradcheck of the persistent forward + backward for every input, weight, bias and
    initial state, with a finished sequence (the length pass-through)."""
    T, B, I, H = (2, 2, 2, 3) if cell == "lstm" else (3, 2, 3, 5)
    ins, L, _ = make_case(cell, T, B, I, H, F64, True, [T, 1])
    fn = runner(cell, "persistent", nl)
    leaves = [t.detach().requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(lambda *a: fn(list(a), L), leaves, fast_mode=DEV.type == "cpu")


@requires_kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", ["barrier", "ll", "solo"])
@pytest.mark.parametrize("cell,nl,bad", [("lstm", "tanh", "nan"), ("rnn", "tanh", "nan"), ("rnn", "relu", "inf")])
def test_persistent_nonfinite_like_step(cell, nl, bad, mode, use_options):
    """A NaN (or, through a ReLU RNN with positive weights, an inf) in x reaches the same outputs
    and gradients as on the step path, with the barrier, the LL exchange or a solo plan (where
    the plan takes them); earlier steps stay finite. H = 9 pads the columns to 16: a solo plan
    must not let a non-finite value into the padding, whose zero W_hh rows would turn it into NaN
    everywhere (inf x 0)."""
    if mode != "barrier":
        use_options(**{"ll_sync" if mode == "ll" else "solo": True})
    ins, L, ups = make_case(cell, 4, 3, 5, 9, F32)
    if bad == "inf":
        ins = [t if t is None or i < 2 else t.abs() for i, t in enumerate(ins)]  # weights, biases > 0
    ins[0][1, 1, 2] = float(bad)
    ours = fwd_bwd(runner(cell, "persistent", nl), ins, L, ups)
    step = fwd_bwd(runner(cell, "step", nl), ins, L, ups)
    for a, b in zip(ours, step):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        fin = torch.isfinite(b)
        assert rel_err(a[fin], b[fin]) <= 1e-6
    assert not torch.isnan(ours[0][0]).any()
    if bad == "inf":
        assert torch.isinf(ours[0]).any()  # the case really carries an inf through the recurrence


@requires_kernels
def test_persistent_falls_back_to_step_when_grid_does_not_fit(monkeypatch, spy):
    """With no room for the grid (a fake SM count of 0), path="persistent" runs the step kernels,
    warns once, and gives the step path's results."""
    from fused_rnn.kernels import tiles

    monkeypatch.setattr(tiles, "max_programs", lambda device: 0)
    T, B, I, H, lengths, bias = SHAPES["B3-T7-H37-len"]
    ins, L, ups = make_case("lstm", T, B, I, H, F32, bias, lengths)
    _falls_back_to_step("lstm", ins, L, ups, spy, "persistent path not possible.*co-resident.*step kernels")


def _falls_back_to_step(cell, ins, L, ups, spy, match):
    """path="persistent" warns (``match``), launches no persistent kernel and gives the step path's results."""
    with pytest.warns(RuntimeWarning, match=match):
        ours = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
    assert spy == {}
    step = fwd_bwd(runner(cell, "step"), ins, L, ups)
    for a, b in zip(ours, step):
        assert torch.equal(a, b)


@requires_kernels
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused-step-default"])
def test_layer_norm_lstm_takes_its_persistent_kernels(spy, fused):
    """path="persistent" runs the layer-norm LSTM on kernels/persistent_ln.py through the autograd
    Function, forward and backward, LN parameter gradients included, and agrees with the step
    path; also where the LN step path would be the unfused one (hidden size over
    LN_FUSED_MAX_H)."""
    ins, L, ups = make_case("lstm", 4, 3, 3, 5, F32, lengths=[4, 2, 0])
    g = torch.Generator().manual_seed(1)
    ln = [(1 + 0.1 * torch.randn(n, generator=g, dtype=F64)).to(DEV, F32) for n in (20, 20, 5, 5)]
    leaves = [t.detach().requires_grad_() for t in ins + ln]

    def run(path):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, *lnp = leaves
        outs = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *lnp, L, LN_EPS, False, fused, True, path)
        loss = sum((o * u).sum() for o, u in zip(outs, ups))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))

    ours = run("persistent")
    assert spy == {"ln_lstm_fwd_loop": 1, "ln_lstm_bwd_loop": 1}
    assert_close(ours, run("step"), 1e-6, "vs step path")


@requires_kernels
def test_use_path_and_env_var_select_persistent(monkeypatch, spy):
    """use_path() (process-wide, so the backward sees it too) and FUSED_RNN_PATH pick the path of
    a call that leaves it at "auto"; auto alone is the step path (AUTO_PATH)."""
    ins, L, ups = make_case("rnn", 3, 2, 3, 5, F32)
    assert _paths.AUTO_PATH == "step"
    fwd_bwd(runner("rnn", "auto"), ins, L, ups)
    assert spy == {}
    with _paths.use_path("persistent"):
        fwd_bwd(runner("rnn", "auto"), ins, L, ups)
    assert spy == {"rnn_fwd_loop": 1, "rnn_bwd_loop": 1}
    monkeypatch.setenv(_paths.ENV_VAR, "persistent")
    fwd_bwd(runner("rnn", "auto"), ins, L, ups)
    assert spy == {"rnn_fwd_loop": 2, "rnn_bwd_loop": 2}
    with _paths.use_path("step"):  # the override beats the environment
        fwd_bwd(runner("rnn", "auto"), ins, L, ups)
    assert spy == {"rnn_fwd_loop": 2, "rnn_bwd_loop": 2}


@requires_kernels
def test_persistent_custom_ops_opcheck():
    """opcheck with path="persistent": schema, fake implementation, registration, aot_dispatch."""
    ins, L, ups = make_case("lstm", 2, 3, 4, 5, F32, True, [2, 1, 0])
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, None, None, L, LN_EPS, False, True, True, "persistent")
    torch.library.opcheck(torch.ops.fused_rnn.lstm_fwd.default, args)
    h_n, c_n, hs, cs, gates = torch.ops.fused_rnn.lstm_fwd(*args)
    bargs = (*ups, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, None, None, None, None, L, LN_EPS, False, True, True,
             True, "persistent")
    torch.library.opcheck(torch.ops.fused_rnn.lstm_bwd.default, bargs)


@requires_kernels
def test_graph_path_on_cpu_runs_step_kernels():
    """The graph path needs CUDA: on CPU tensors it warns and runs the step kernels."""
    ins, L, ups = make_case("lstm", 2, 2, 3, 5, F32)
    with pytest.warns(RuntimeWarning, match="graph path not possible"):
        ours = fwd_bwd(runner("lstm", "graph"), ins, L, ups)
    step = fwd_bwd(runner("lstm", "step"), ins, L, ups)
    for a, b in zip(ours, step):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- CUDA: the multi-program path
CUDA_SHAPES = [  # (T, B, I, H, lengths): 3, 13, 32 and 48 programs at BLOCK_H = 16
    (5, 3, 19, 37, [5, 2, 0]),
    (9, 20, 16, 200, [9 - b % 5 for b in range(20)]),
    (12, 64, 48, 512, None),
    (6, 16, 32, 768, [6] * 8 + [3] * 8),  # S4's plans: in 16 bits W_hh on chip in 12 chunks (w_chunks)
    (4, 130, 16, 64, [4 - b % 5 for b in range(130)]),  # 3 row blocks x 4 programs, own barriers
]


def _cuda_cases():
    """bf16 at every shape (each kernel variant: resident and streamed W_hh, several row blocks);
    the other dtypes and
    ReLU at the first shape and S2's B and H (fp32 and fp64 stream W_hh); ~15 cases, for the
    GPU session's time budget."""
    def case(cell, nl, dtype, shape):
        T, B, _, H, _ = shape
        return pytest.param(cell, nl, dtype, shape, id=f"{cell}-{nl}-{DT_NAME[dtype]}-T{T}-B{B}-H{H}")

    for shape in CUDA_SHAPES:
        yield case("lstm", "tanh", BF16, shape)
        yield case("rnn", "tanh", BF16, shape)
    for dtype in (F16, F32, F64):
        yield case("lstm", "tanh", dtype, CUDA_SHAPES[0])
        yield case("rnn", "tanh", dtype, CUDA_SHAPES[0])
    yield case("rnn", "relu", BF16, CUDA_SHAPES[0])
    yield case("lstm", "tanh", F32, CUDA_SHAPES[2])


@requires_cuda
@pytest.mark.parametrize("cell,nl,dtype,shape", list(_cuda_cases()))
def test_cuda_multi_program_matches_step(cell, nl, dtype, shape, spy):
    """The multi-program persistent kernels (grid barrier each step) against the step path and
    the fp64 reference, forward and backward."""
    from fused_rnn.kernels import persistent, tiles

    T, B, I, H, lengths = shape
    pl, why = tiles.plan(cell, "fwd", B, H, dtype, DEV)
    assert pl is not None and pl.programs > 1, why
    if H == 768 and dtype in (BF16, F16):
        assert pl.w_chunks == 12 and tiles.plan(cell, "bwd", B, H, dtype, DEV)[0].w_chunks == 12
    ins, L, ups = make_case(cell, T, B, I, H, dtype, True, lengths)
    ours = fwd_bwd(runner(cell, "persistent", nl), ins, L, ups)
    torch.cuda.synchronize()
    assert spy == {f"{cell}_fwd_loop": 1, f"{cell}_bwd_loop": 1}
    step = fwd_bwd(runner(cell, "step", nl), ins, L, ups)
    ref = fwd_bwd(reference(cell, nl), ins, L, ups, dtype=F64)
    assert_close(ours, ref, tol(dtype), "vs reference")
    assert_close(ours, step, {F64: 1e-12, F32: 1e-4}.get(dtype, 2e-2), "vs step path")
    print(f"{cell} {DT_NAME[dtype]} {shape[:4]}: {pl}, compiled: {persistent.LAST_LAUNCH}")


def _cuda_variant_cases(want):
    """The LL exchange where plan() takes it: bf16 with W_hh resident (3 programs; 3 row blocks
    of 4) and streamed (48 programs at H 768), fp32 (64-bit words, streamed; 3 and 13 programs).
    (bf16 at B20 H200 keeps the barrier: a resident 32 x 256 row tile.) Solo plans: the RNN at
    S1's B16 H256 (W_hh 128 KiB in one program), the LSTM at H 128 and H 37, the RNN in 3 row
    blocks (the LSTM's 4 x 64 x 64 gate tiles there are over the solo limit)."""
    for dtype, shapes in ((BF16, (CUDA_SHAPES[0], CUDA_SHAPES[3], CUDA_SHAPES[4])),
                          (F32, (CUDA_SHAPES[0], CUDA_SHAPES[1]))):
        for shape in shapes:
            for cell in ("lstm", "rnn"):
                T, B, _, H, _ = shape
                if want == "ll":
                    yield pytest.param(cell, dtype, shape, id=f"{cell}-{DT_NAME[dtype]}-T{T}-B{B}-H{H}")
    for cell, dtype, shape in (("rnn", BF16, (9, 16, 32, 256, [9, 4] * 8)), ("lstm", BF16, (9, 16, 32, 128, None)),
                               ("lstm", F16, CUDA_SHAPES[0]), ("rnn", BF16, CUDA_SHAPES[4])):
        T, B, _, H, _ = shape
        if want == "solo":
            yield pytest.param(cell, dtype, shape, id=f"{cell}-{DT_NAME[dtype]}-T{T}-B{B}-H{H}")


@requires_cuda
@pytest.mark.parametrize("cell,dtype,shape", list(_cuda_variant_cases("ll")))
def test_cuda_ll_exchange_matches_barrier(cell, dtype, shape, spy, use_options):
    """The persistent kernels with the LL exchange (Options.ll_sync: tagged words, no
    barrier) against the barrier kernels and the fp64 reference; then repeated launches must
    agree bit for bit (a stale ring word would show as a difference or a hang)."""
    _cuda_variant_vs_barrier("ll", cell, dtype, shape, spy, use_options)


@requires_cuda
@pytest.mark.parametrize("cell,dtype,shape", list(_cuda_variant_cases("solo")))
def test_cuda_solo_matches_barrier(cell, dtype, shape, spy, use_options):
    """Solo plans (Options.solo: one program per row block, all of W_hh, the row in registers) against
    the barrier kernels and the fp64 reference, and repeated launches bit for bit."""
    _cuda_variant_vs_barrier("solo", cell, dtype, shape, spy, use_options)


def _cuda_variant_vs_barrier(mode, cell, dtype, shape, spy, use_options):
    from fused_rnn.kernels import persistent, tiles

    T, B, I, H, lengths = shape
    ins, L, ups = make_case(cell, T, B, I, H, dtype, True, lengths)
    barrier = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
    use_options(**{"ll_sync" if mode == "ll" else "solo": True})
    for direction in ("fwd", "bwd"):
        pl, why = tiles.plan(cell, direction, B, H, dtype, DEV)
        assert pl is not None and (pl.ll if mode == "ll" else pl.solo and pl.programs == 1), (direction, pl, why)
    ours = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
    torch.cuda.synchronize()
    assert spy == {f"{cell}_fwd_loop": 2, f"{cell}_bwd_loop": 2}
    ref = fwd_bwd(reference(cell), ins, L, ups, dtype=F64)
    assert_close(ours, ref, tol(dtype), "vs reference")
    assert_close(ours, barrier, {F32: 1e-5}.get(dtype, 1e-2), "vs the barrier kernels")
    for _ in range(3):
        again = fwd_bwd(runner(cell, "persistent"), ins, L, ups)
        for a, b in zip(ours, again):
            assert torch.equal(a, b)
    print(f"{mode} {cell} {DT_NAME[dtype]} {shape[:4]}: {pl}, compiled: {persistent.LAST_LAUNCH}")


@requires_cuda
def test_cuda_persistent_repeated_calls_are_deterministic(spy):
    """Barrier counters are per launch: back-to-back launches (no sync between) agree bitwise."""
    ins, L, ups = make_case("lstm", 16, 16, 64, 256, BF16, True, None)
    first = fwd_bwd(runner("lstm", "persistent"), ins, L, ups)
    for _ in range(3):
        again = fwd_bwd(runner("lstm", "persistent"), ins, L, ups)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    assert spy["lstm_fwd_loop"] == 4


@requires_cuda
def test_cuda_persistent_batch_over_limit_falls_back(spy):
    """More row blocks than SMs (64 rows each, at least one program per block): the step path."""
    B = 64 * (torch.cuda.get_device_properties(0).multi_processor_count + 1)
    ins, L, ups = make_case("rnn", 3, B, 8, 32, BF16)
    _falls_back_to_step("rnn", ins, L, ups, spy, "row blocks")


@pytest.mark.skipif(not HAS_CUDA or os.environ.get("FUSED_RNN_LONG_TESTS") != "1",
                    reason="needs a CUDA GPU and FUSED_RNN_LONG_TESTS=1")
def test_cuda_persistent_long_sequence_s1():
    """S1 (B16 T1024 H256, bf16): a long run of barriers, against the step path."""
    ins, L, ups = make_case("lstm", 1024, 16, 256, 256, BF16)
    ours = fwd_bwd(runner("lstm", "persistent"), ins, L, ups)
    step = fwd_bwd(runner("lstm", "step"), ins, L, ups)
    assert_close(ours, step, 2e-2, "vs step path")
