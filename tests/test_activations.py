"""The kernels' activations (kernels/_common.py: _tanh, _sigmoid, and the backward's slopes) against
float64, in ulps, over the whole range; and every cell in fp32 at small input scales against
float64, as close as torch.nn's fp32 gets. The former tanh, (1 - e^{-2|x|}) / (1 + e^{-2|x|}),
cancelled there: 1e-4 relative error with small inputs, 1e-2 at this file's scales, 0 for tanh(1e-8).

The ulp error of y against the exact f(x) is |y - f(x)| / ulp(f(x)), ulp(v) the spacing of the
floats in v's binade (2^-149 for fp32 denormals). Under the interpreter exp is NumPy's; on a GPU
it is ex2.approx and the division div.full (each documented within 2 ulp), hence the bounds.
"""
import functools
import math

import pytest
import torch
from torch import nn

from conftest import HAS_CUDA, kernel_device, rel_err, requires_kernels
from fused_rnn import _paths

DEV = kernel_device()
# kernels._common's helpers, for the @triton.jit test kernel (a jit function sees its module's
# globals): set by _kernel() when a test first needs it, so that collecting this file needs no Triton
_tanh = _sigmoid = _dtanh = _dsigmoid = tl = None
FNS = ("tanh", "sigmoid", "dtanh", "dsigmoid", "fma_probe")
# max ulp error allowed in fp32. The interpreter measures 1.9 (tanh) and 3.7 (sigmoid, of which
# ~1.8 is NumPy's float32 exp2); on a GPU ex2.approx and div.full are each within 2 ulp
ULP_BOUND_F32 = 6.0 if HAS_CUDA else 4.0
ULP_BOUND_F64 = 4.0


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl_
    from fused_rnn.kernels import _common

    globals().update(_tanh=_common._tanh, _sigmoid=_common._sigmoid, _dtanh=_common._dtanh,
                     _dsigmoid=_common._dsigmoid, tl=tl_)

    @triton.jit
    def apply(x_ptr, y_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if FN == 0:
            y = _tanh(x)
        elif FN == 1:
            y = _sigmoid(x)
        elif FN == 2:  # the slope as the backward kernels take it: from the activation's output
            y = _dtanh(_tanh(x))
        elif FN == 3:
            y = _dsigmoid(_sigmoid(x))
        else:  # x² - fl(x²), exact with a fused multiply-add
            y = tl.fma(x, x, -(x * x))
        tl.store(y_ptr + offs, y, mask=mask)

    return apply


def _apply(fn, x):
    """fn (one of FNS) applied to x elementwise by a Triton kernel on the kernel device."""
    import triton

    x = x.to(DEV).contiguous()
    y = torch.full_like(x, float("nan"))
    BLOCK = 4096
    _kernel()[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), FN=FNS.index(fn), BLOCK=BLOCK)
    return y.cpu()


@functools.lru_cache(maxsize=None)
def _fma_rounds_once():
    """Whether tl.fma rounds once here: on a GPU; Triton 3.6's interpreter multiplies and adds in
    fp32, rounding twice, and there _sigmoid's correction of exp's argument (an fma) is lost."""
    return float(_apply("fma_probe", torch.tensor([1 + 2 ** -12]))[0]) == 2 ** -24


def _exact(fn, x64):
    """fn at x64 in float64 (1e-16 relative: exact at fp32's resolution)."""
    if fn == "tanh":
        return torch.tanh(x64)
    if fn == "sigmoid":
        return torch.sigmoid(x64)
    if fn == "dtanh":
        return 1 / torch.cosh(x64) ** 2
    s = torch.sigmoid(x64)
    return s * torch.sigmoid(-x64)


def _ulps(y, exact, mant_bits, min_exp):
    """|y - exact| in ulps of exact (floats with mant_bits stored mantissa bits, denormals below
    2^min_exp)."""
    _, e = torch.frexp(exact.abs())
    ulp = torch.ldexp(torch.ones_like(exact), (e - 1 - mant_bits).clamp(min=min_exp - mant_bits))
    err = (y.double() - exact).abs() / ulp
    return torch.where(y.double() == exact, torch.zeros_like(err), err)  # equal infinities


def _sweep_f32():
    """fp32 inputs over the whole range: signed zeros, denormals, each binade 2^-30 .. 2^7 (random
    mantissas), the tanh branch point's neighbourhood, large values, ±inf."""
    g = torch.Generator().manual_seed(0)
    special = [0.0, 1e-45, 1e-40, 2e-39, 1e-30, 1e-8, 1e-6, 1e-3, 0.1, 0.5, 0.549, 0.55, 0.551, 0.6, 1.0, 2.0,
               5.0, 9.0, 10.0, 17.0, 20.0, 44.0, 87.0, 88.0, 100.0, 103.0, 104.0, 1e4, 1e30, 3.4e38, math.inf]
    binades = torch.arange(-30, 8, dtype=torch.float64).repeat_interleave(2048)
    dense = torch.ldexp(1 + torch.rand(binades.numel(), generator=g, dtype=torch.float64), binades.int())
    near = 0.4 + 0.3 * torch.rand(50000, generator=g, dtype=torch.float64)
    denorm = torch.randint(1, 1 << 23, (1000,), generator=g, dtype=torch.int32).view(torch.float32).double()
    x = torch.cat([torch.tensor(special, dtype=torch.float64), dense, near, denorm]).float()
    return torch.cat([x, -x])


def _sweep_f64(n=1500):
    g = torch.Generator().manual_seed(1)
    special = [0.0, 5e-324, 1e-310, 1e-300, 1e-30, 1e-16, 1e-8, 1e-3, 0.5, 0.624, 0.625, 0.626, 1.0, 5.0,
               18.0, 20.0, 40.0, 300.0, 700.0, 750.0, 1e300, math.inf]
    dense = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-12), math.log(800.0), generator=g))
    near = 0.3 + 0.7 * torch.rand(n // 3, generator=g, dtype=torch.float64)
    x = torch.cat([torch.tensor(special, dtype=torch.float64), dense, near])
    return torch.cat([x, -x])


def _mp_exact(fn, xs):
    """fn at each float64 of xs with mpmath at 100 bits, as an mpf list."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.prec = 100
    out = []
    for v in xs.tolist():
        m = mpmath.mpf(v)
        if fn == "tanh":
            out.append(mpmath.tanh(m))
        elif fn == "sigmoid":
            out.append(1 / (1 + mpmath.exp(-m)) if m >= 0 else mpmath.exp(m) / (1 + mpmath.exp(m)))
        elif fn == "dtanh":
            out.append(1 / mpmath.cosh(m) ** 2 if abs(m) < 1e4 else mpmath.mpf(0))
        else:
            out.append(mpmath.exp(-abs(m)) / (1 + mpmath.exp(-abs(m))) ** 2)
    return out


@requires_kernels
@pytest.mark.parametrize("fn", ["tanh", "sigmoid"])
def test_activation_ulp_error_fp32(fn):
    """Within ULP_BOUND_F32 ulps of float64 over the whole fp32 range; exactly ±1 / 1 / 0 at
    ±20, ±1e30, ±inf; never NaN but from NaN."""
    x = _sweep_f32()
    y = _apply(fn, x)
    exact = _exact(fn, x.double())
    err = _ulps(y, exact, 23, -126)
    i = int(err.argmax())
    print(f"{fn} fp32: max {float(err[i]):.2f} ulp at x = {float(x[i]):.9g}")
    assert not torch.isnan(y).any()
    # without a single-rounding fma (Triton 3.6's interpreter) sigmoid is the uncorrected ex2 form:
    # 43 ulps at x = -65.9
    bound = ULP_BOUND_F32 if fn == "tanh" or _fma_rounds_once() else 64.0
    assert float(err[i]) <= bound, (
        f"{fn} fp32: {float(err[i]):.2f} ulp at x = {float(x[i]):.9g} (got {float(y[i]):.9g}, "
        f"exact {float(exact[i]):.9g})")
    inf = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 20.0, -20.0])
    yi = _apply(fn, inf)
    want = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0] if fn == "tanh" else [1.0, 0.0, 1.0, 0.0, 1.0, None]
    assert [v if w is not None else None for v, w in zip(yi.tolist(), want)] == want, yi
    assert torch.isnan(_apply(fn, torch.tensor([math.nan]))).all()
    zero = _apply(fn, torch.tensor([0.0, -0.0]))
    assert (zero == (0.0 if fn == "tanh" else 0.5)).all(), zero
    if fn == "tanh":  # signed zeros kept, as torch.tanh
        assert torch.signbit(zero).tolist() == [False, True]


@requires_kernels
@pytest.mark.parametrize("fn", ["dtanh", "dsigmoid"])
def test_backward_slope_error_fp32(fn):
    """The backward's slopes, 1 - t² and s (1 - s) from the activation's output t, s (what the
    kernels save or recompute, as torch's tanh_backward / sigmoid_backward): a few ulps at small
    |x| (<= 0.5); beyond, the output's own error is amplified (1 - t² by 2t² / (1 - t²): ~5 ulps
    at |x| = 1) until 1 - t², 1 - s cancel to the output's rounding, an absolute error of ~2^-24
    (the same in torch), so there the bound is absolute."""
    x = _sweep_f32()
    x = x[x.isfinite()]
    y = _apply(fn, x)
    exact = _exact(fn, x.double())
    err = _ulps(y, exact, 23, -126)
    for lim in (1.0, 0.5):
        i = int(torch.where(x.abs() <= lim, err, torch.zeros_like(err)).argmax())
        print(f"{fn} fp32 (|x| <= {lim}): max {float(err[i]):.2f} ulp at x = {float(x[i]):.9g}")
    assert float(err[i]) <= ULP_BOUND_F32, f"{fn}: {float(err[i]):.2f} ulp at x = {float(x[i]):.9g}"
    absolute = float((y.double() - exact).abs().max())
    assert absolute <= 2 ** -22, f"{fn}: absolute error {absolute:.3e}"
    assert not torch.isnan(y).any()


@requires_kernels
@pytest.mark.parametrize("fn", ["tanh", "sigmoid"])
def test_activation_error_fp64(fn):
    """fp64 (the gradcheck dtype) stays fp64-accurate: within ULP_BOUND_F64 fp64 ulps of a
    100-bit mpmath value, from denormals to overflow of exp; ±1 / 1 / 0 exactly at large |x|."""
    mpmath = pytest.importorskip("mpmath")
    x = _sweep_f64()
    y = _apply(fn, x)
    worst, at = 0.0, None
    for xv, yv, ex in zip(x.tolist(), y.tolist(), _mp_exact(fn, x)):
        if ex == 0:
            assert yv == 0, (xv, yv)
            continue
        m, e = mpmath.frexp(abs(ex))
        ulp = mpmath.ldexp(1, max(int(e) - 53, -1074))
        u = float(abs(mpmath.mpf(yv) - ex) / ulp)
        if u > worst:
            worst, at = u, xv
    print(f"{fn} fp64: max {worst:.2f} ulp at x = {at!r}")
    assert worst <= ULP_BOUND_F64, f"{fn} fp64: {worst:.2f} ulp at x = {at!r}"
    big = _apply(fn, torch.tensor([40.0, -40.0, 800.0, -800.0, math.inf, -math.inf], dtype=torch.float64))
    want = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0] if fn == "tanh" else [1.0, None, 1.0, 0.0, 1.0, 0.0]
    assert [v if w is not None else None for v, w in zip(big.tolist(), want)] == want, big


# ---- layer level: small pre-activations, every cell, fp32, against torch.nn / float64 ----
I, H, P, T, B = 5, 6, 3, 4, 3
LAYERS = {
    "lstm": (nn.LSTM, {}),
    "lstm_proj": (nn.LSTM, {"proj_size": P}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "lnlstm": (None, {"layer_norm": True}),
}
# fp32 at pre-activations ~1e-4: torch.nn is within ~1e-7 of float64; so are the kernels (the
# former tanh: ~1e-4)
SMALL_TOL = 2e-6


def _small_pair(cell):
    """(the layer on the triton backend in fp32, its float64 reference: torch.nn, or the
    reference backend for the layer-norm LSTM, which torch.nn lacks, torch.nn in fp32 or None):
    weights scaled by 0.1, biases 0; the layer-norm LSTM's gains 1e-3, so its pre-activations are
    small as well."""
    import fused_rnn

    nn_cls, kw = LAYERS[cell]
    ours = (fused_rnn.RNN if cell.startswith("rnn") else fused_rnn.LSTM)(I, H, backend="triton", **kw)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("bias") or name.startswith("ln_") and "bias" in name:
                p.zero_()
            elif name.startswith("ln_") or "layer_norm" in name:
                p.fill_(1e-3)
            else:
                p.mul_(0.1)
    if nn_cls is None:
        ref = fused_rnn.LSTM(I, H, backend="reference", **kw)
        ref.load_state_dict(ours.state_dict())
        return ours.to(DEV), ref.double(), None
    ref = nn_cls(I, H, **kw)
    ref.load_state_dict(ours.state_dict())
    ref32 = nn_cls(I, H, **kw)
    ref32.load_state_dict(ours.state_dict())
    return ours.to(DEV), ref.double(), ref32


def _out_and_grads(layer, x, up):
    x = x.detach().requires_grad_()
    out, _ = layer(x)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((out * up.to(out.dtype)).sum(), [x] + params)
    return [out.detach().cpu()] + [g.cpu() for g in grads]


@requires_kernels
@pytest.mark.parametrize("path", ["step", "persistent"])
@pytest.mark.parametrize("cell", list(LAYERS))
def test_small_inputs_match_float64(cell, path):
    """Inputs x 1e-4, weights x 0.1, zero biases: the triton backend's fp32 output and gradients
    within SMALL_TOL (relative, ‖·‖) of float64, as torch.nn's fp32 is."""
    if cell == "lstm_proj" and path == "persistent":
        pytest.skip("the LSTM with projections has no persistent kernel")
    ours, ref, ref32 = _small_pair(cell)
    g = torch.Generator().manual_seed(2)
    x = 1e-4 * torch.randn(T, B, I, generator=g)
    up = torch.randn(T, B, P if cell == "lstm_proj" else H, generator=g)
    with _paths.use_path(path):
        got = _out_and_grads(ours, x.to(DEV), up.to(DEV))
    want = _out_and_grads(ref, x.double(), up.double())
    names = ["out", "dx"] + [n for n, _ in ours.named_parameters()]
    errs = {n: rel_err(a, b) for n, a, b in zip(names, got, want)}
    if ref32 is not None:
        theirs = {n: rel_err(a, b) for n, a, b in zip(names, _out_and_grads(ref32, x, up), want)}
        print(f"{cell} {path}: torch.nn fp32 max rel err {max(theirs.values()):.2e}")
    print(f"{cell} {path}: triton fp32 max rel err {max(errs.values()):.2e}")
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e <= SMALL_TOL}
    assert not bad, f"{cell} {path}: relative error against float64 above {SMALL_TOL:.0e}: {bad}"
