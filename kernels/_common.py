"""Helpers shared by the fused_rnn kernels: numerics-safe activations, the block matmul, the
tile indexing, and the launchers' small utilities (buffer allocation, dot precision, the input
projection, the GEMMs after a backward loop, and StepLauncher: the step loops' bound launch).

Legend: B batch rows, H hidden units, K the reduction dimension of a block matmul.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
from triton.runtime import driver as _driver
from triton.runtime.autotuner import Heuristics
from triton.runtime.jit import JITFunction

from . import config


@triton.jit
def interpreter_probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """fused_rnn._backend.interpreter_broken runs this through the interpreter: y[:n] = x[:n] +
    the trip count of a loop whose bound is a runtime int, as the step kernels' K loops have."""
    offs = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    for _ in range(0, n, BLOCK):
        acc += 1.0
    tl.store(y_ptr + offs, acc, mask=offs < n)


def alloc(shape, dtype, device) -> torch.Tensor:
    """A buffer a kernel will fill completely: empty, or NaN-filled under options().poison (tests:
    an element a kernel forgets to write shows up as NaN)."""
    if config.options().poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def given(**flags):
    """@triton.heuristics values: each constexpr flag True where its pointer argument is not None."""
    return {flag: (lambda args, name=name: args[name] is not None) for flag, name in flags.items()}


def dot_flags(dtype: torch.dtype, allow_tf32: bool, device: torch.device):
    """(FMA, IEEE, UPCAST) constexpr flags of _mm for operands of ``dtype``.

    FMA: fp64 blocks are multiplied with a broadcast product and tl.sum instead of tl.dot,
    because fp64 tl.dot is not something we can count on every GPU backend lowering.
    IEEE: fp32 tl.dot in full fp32 (input_precision="ieee"); otherwise fp32 tl.dot uses TF32 on
    GPUs. The launchers follow torch.backends.cuda.matmul.allow_tf32 (default False), so a
    model gets the same fp32 matmul precision from these kernels as from cuBLAS.
    UPCAST: the Triton interpreter (CPU tensors) keeps bf16 as raw uint16 and its tl.dot
    multiplies those integers, so there bf16 operands are widened to fp32 first (exact: the
    products are the same, only the accumulation order can differ). Never set on a GPU.
    """
    fma = dtype == torch.float64
    ieee = dtype == torch.float32 and not allow_tf32
    upcast = dtype == torch.bfloat16 and torch.device(device).type == "cpu"
    return fma, ieee, upcast


def input_projection(x, w_ih, b_ih, b_hh, out=None, lengths=None):
    """x W_ihᵀ + b_ih + b_hh for all T steps in one GEMM, in the storage dtype: [T, B, G]
    (G = 4H for the LSTM, H for the RNN). ``out``: a contiguous [T, B, G] buffer to write it into
    (a view of a larger one: the LSTM's gates buffer has a spare slot T), else a new tensor.
    ``lengths``: x's rows past each sequence's end count as 0, so that NaN / Inf there never
    reaches the gates (saved for backward, where 0 x NaN would be NaN) and no kernel has to mask
    them; the cost, a [T, B, I] copy of x (config.zero_padding), only with lengths."""
    T, B, I = x.shape
    x2 = config.zero_padding(x, lengths).reshape(T * B, I)
    bias = None
    if b_ih is not None:
        bias = b_ih
    if b_hh is not None:
        bias = b_hh if bias is None else bias + b_hh
    o2 = None if out is None else out.view(T * B, -1)
    if bias is None:
        xp = torch.mm(x2, w_ih.t(), out=o2)
    else:
        xp = torch.addmm(bias, x2, w_ih.t(), out=o2)
    return xp.view(T, B, -1)


def after_loop_grads(dP, gh, x, hs, w_ih, w_hh, lengths, need_dx, need_dw):
    """The backward's large GEMMs over all T·B rows, from the pre-activation gradients dP
    [T+1, B, G] (config.grad_dtype; slot T unused) that the reverse loop wrote.

    The GEMMs run in dP's dtype: bf16 / fp16 on tensor cores for 16-bit inputs (fp32
    accumulation inside cuBLAS; the operands are the values the recurrent tl.dot used already),
    the state dtype otherwise (fp32 GEMMs follow torch.backends.cuda.matmul.allow_tf32).
    gh: the carried dh left by the loop (it reaches h0 only for zero-length sequences).
    Returns (dx in x's dtype or None, dh0 in the state dtype, dW_ih, dW_hh in the weights' dtypes,
    db in the state dtype; the last three None unless need_dw).
    """
    T, B, I = x.shape
    H = hs.shape[-1]
    gd = dP.dtype
    sd = config.state_dtype(x.dtype)
    dP2 = dP[:T].reshape(T * B, dP.shape[-1])
    dh0 = torch.mm(dP[0], w_hh.to(gd)).to(sd)
    if lengths is not None:  # a zero-length sequence passes dh_n straight through to h0
        dh0 = dh0 + torch.where((lengths > 0).unsqueeze(1), torch.zeros_like(gh), gh)
    dx = torch.mm(dP2, w_ih.to(gd)).view(T, B, I).to(x.dtype) if need_dx else None
    dw_ih = dw_hh = db = None
    if need_dw:
        dw_hh = torch.mm(dP2.t(), hs[:T].reshape(T * B, H).to(gd)).to(w_hh.dtype)
        # dP is 0 past the ends but 0 x NaN is NaN: x's padding zeroed (one [T, B, I] copy, only
        # with lengths)
        dw_ih = torch.mm(dP2.t(), config.zero_padding(x, lengths).reshape(T * B, I).to(gd)).to(w_ih.dtype)
        db = dP2.sum(0, dtype=sd)
    return dx, dh0, dw_ih, dw_hh, db


# ---- the step loops' launch ----
# A step path launches one kernel per time step with only t changing. Triton's kernel[grid](...)
# binds and specialises every argument, looks the kernel up and runs @triton.heuristics each
# time; StepLauncher does that once per sequence call (its first launch) and then calls the
# CompiledKernel's launcher directly, with the arguments JITFunction.run would pass it.

# JITFunction.run's lines the direct launch mirrors (Triton 3.6 to 3.9): bound_args holds every
# parameter in signature order, constexprs included, and is passed after the launch metadata.
_RUN_LINES = (
    "bound_args, specialization, options = binder(*args, **kwargs)",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
)
_run_checked = {}  # JITFunction.run -> whether its source has _RUN_LINES

# The path each step kernel's launcher took, by kernel name, set at each sequence call's first
# launch: "direct", or "standard: why" (tests and bench/host_overhead.py read it).
LAUNCH_PATHS = {}


def _run_mirrored(run) -> bool:
    if run not in _run_checked:
        try:
            src = " ".join(inspect.getsource(run).split())
        except (OSError, TypeError):
            src = ""
        _run_checked[run] = all(line in src for line in _RUN_LINES)
    return _run_checked[run]


def _hooked(hook) -> bool:
    """Whether a launch hook would call anything: Triton 3.6+ keeps an empty HookChain when none is
    set, and the launcher skips a None one (the direct launch passes None, the same effect)."""
    from triton.knobs import HookChain

    return hook is not None and (not isinstance(hook, HookChain) or bool(hook.calls))


class StepLauncher:
    """``kernel[grid](*args, **meta)`` once a time step, only the argument ``t`` changing:
    ``step = StepLauncher(kernel, grid, ...); for t in steps: step(t)``.

    The first call launches through Triton's dispatch, which compiles or finds the kernel and
    returns it; the later ones launch that CompiledKernel directly (``how`` = "direct") unless
    something needs the dispatch (``how`` = "standard: why"): the interpreter, a launch hook or
    a replaced JITFunction.run (profilers, launch recorders), another Triton launch API, t
    specialised, or options().direct_launch off. @triton.heuristics must not read t."""

    def __init__(self, kernel, grid, *args, **meta):
        self.kernel, self.grid, self.args, self.meta = kernel, grid, list(args), meta
        self.jit = kernel.fn if isinstance(kernel, Heuristics) else kernel  # the JIT (or interpreted) function
        self.t_at = kernel.arg_names.index("t")
        self.how = None
        self._launch = self._first

    def __call__(self, t):
        self._launch(t)

    def _standard(self, t):
        self.args[self.t_at] = t
        return self.kernel[self.grid](*self.args, **self.meta)

    def _direct(self, t):
        call = self._call
        call[self._t_call] = t
        self._run(*call)

    def _first(self, t):
        compiled = self._standard(t)
        why = self._bind(compiled)
        self.how = "direct" if why is None else "standard: " + why
        LAUNCH_PATHS[self.jit.fn.__name__] = self.how
        self._launch = self._standard if why is not None else self._direct

    def _bind(self, compiled):
        """Set up the direct launch of ``compiled`` (None), or say why not."""
        kernel, jit = self.kernel, self.jit
        if not config.options().direct_launch:
            return "options().direct_launch is off"
        if type(jit) is not JITFunction or not hasattr(compiled, "packed_metadata"):
            return "no compiled kernel (the interpreter)"
        if not _run_mirrored(JITFunction.run):
            return "JITFunction.run is not the one the direct launch mirrors"
        if jit.pre_run_hooks:
            return "a pre-run hook is set"
        from triton import knobs  # _RUN_LINES read it: this Triton has it

        if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            return "a launch hook is set"
        if callable(self.grid):
            return "a grid function"
        if not jit.params[jit.arg_names.index("t")].do_not_specialize:
            return "t is specialised"
        bound = dict(zip(kernel.arg_names, self.args), **self.meta)
        for name, rule in getattr(kernel, "values", {}).items():  # as Heuristics.run, in order
            bound[name] = rule(dict(bound))
        if any(name not in bound for name in jit.arg_names):
            return "an argument left to its default"
        grid = tuple(self.grid) + (1, 1)
        stream = _driver.active.get_current_stream(_driver.active.get_current_device())
        self._run = compiled.run
        self._call = [grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                      None] + [bound[name] for name in jit.arg_names]
        self._t_call = 9 + jit.arg_names.index("t")
        return None


# ---- activations ----
# A few ulps of relative error over the whole range, fp32 and fp64 (the gradcheck dtype): tiny |x|
# (no cancellation), large |x| (exactly ±1 / 1 / 0, never inf/inf), ±inf; NaN only from NaN
# (tests/test_activations.py measures it). fp32 runs on ex2.approx and div.full (each within 2 ulp
# on the GPU), fp64 on exp and IEEE division. Their cost: docs/design.md.


@triton.jit
def _sigmoid(x):
    # 1 / (1 + z) or z / (1 + z), z = e^{-|x|} in [0, 1]: no inf/inf. fp32: z = 2^p, p = fl(-|x| log2 e),
    # and the numerator's z times 1 + r ln 2 for p's rounding error r (uncorrected, sigmoid(-80) was
    # ~40 ulps off: fl(p) is 2^-18 off at p = -115); tl.exp2 is ex2.approx.ftz, so below 2^-126
    # 2^(p/2) squared keeps denormals.
    ax = tl.abs(x)
    if x.dtype == tl.float64:
        z = tl.exp(-ax)
        zc = z
    else:
        ax = tl.minimum(ax, 128.0, propagate_nan=tl.PropagateNan.ALL)  # e^-128 is 0 already; inf p gave NaN
        p = ax * -1.4426950408889634  # fp32(log2 e), rounded
        r = tl.fma(ax, -1.4426950408889634, -p)  # its rounding error (0 where fma rounds twice: 3.6's interpreter)
        r = tl.fma(ax, -1.9259629911266175e-08, r)  # and fp32(log2 e)'s: log2 e - fp32(log2 e)
        tiny = p < -126.0
        z = tl.exp2(tl.where(tiny, 0.5 * p, p))
        z = tl.where(tiny, z * z, z)
        zc = tl.fma(z, r * 0.6931471805599453, z)  # the denominator's z needs no correction
    return tl.where(x >= 0, 1.0, zc) / (1.0 + z)


@triton.jit
def _tanh(x):
    # tanh|x|: below 0.55 x + x^3 P(x^2) (fp32: minimax degree 4 in x^2 on [0, 0.55]; fp64: Cephes'
    # rational on [0, 0.625]), where (1 - z) / (1 + z), z = e^{-2|x|}, would cancel; above, that;
    # then x's sign, -0 kept.
    ax = tl.abs(x)
    s = ax * ax
    if x.dtype == tl.float64:
        z = tl.exp(-2.0 * ax)
        num = (-9.64399179425052238628e-1 * s - 9.92877231001918586564e1) * s - 1.61468768441708447952e3
        den = ((s + 1.12811678491632931402e2) * s + 2.23548839060100448583e3) * s + 4.84406305325125486048e3
        small = ax + ax * s * (num / den)
        lim = 0.625
    else:
        z = tl.exp2(ax * -2.885390043258667)  # e^{-2|x|}: its error is damped here (<= 0.75x)
        p = tl.fma(tl.fma(tl.fma(s, 0.016437577083706856, -0.05267181247472763), s, 0.13320724666118622),
                   s, -0.3333294689655304)
        small = tl.fma(p * s, ax, ax)
        lim = 0.55
    t = tl.where(ax < lim, small, (1.0 - z) / (1.0 + z))
    # this form, not a sign-bit copy, for the registers of the layer-norm backward kernels
    return tl.where(x < 0, -t, tl.where(x == 0, x, t))


# The backward's slopes from the activations' outputs (as torch's tanh_backward and
# sigmoid_backward): a few ulps while the slope is not small; past that 1 - t², 1 - s carry the
# output's rounding (absolute error ~2^-24).


@triton.jit
def _dtanh(t):
    # tanh' = 1 - t², t = tanh x: one fma, so t² is not rounded before the cancellation
    return tl.fma(-t, t, 1.0)


@triton.jit
def _dsigmoid(s):
    # sigmoid' = s (1 - s), s = sigmoid x
    return s * (1.0 - s)


@triton.jit
def _tile(pid_b, pid_h, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The tile of row block ``pid_b`` and hidden-unit block ``pid_h``: its rows (int64, so that
    row offsets times T, H or G cannot overflow), its columns, and the masks of each and of both."""
    rows = tl.arange(0, BLOCK_B).to(tl.int64) + pid_b * BLOCK_B
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    cmask = cols < H
    return rows, cols, rmask, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _reverse_step_masks(len_ptr, rows, rmask, t64, T, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """(valid_t, valid_{t+1}) [BLOCK_B, 1] of reverse step t for these rows: t < length (T
    without lengths)."""
    if HAS_LENGTHS:
        L = tl.minimum(tl.load(len_ptr + rows, mask=rmask, other=0), T)
    else:
        L = tl.zeros([BLOCK_B], dtype=tl.int64) + T
    return (t64 < L)[:, None], (t64 + 1 < L)[:, None]


@triton.jit
def _mm(a, b, acc, FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b for blocks a [M, K], b [K, N] (M, N, K >= 16 on the tl.dot paths)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if FMA:
        acc = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _carry_dot(d_ptr, w_ptr, rows, rmask, cols, cmask, t64, B, H, K, ACC: tl.constexpr, FMA: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The reverse step's carried gradient d_{t+1} W_hh for these rows and W_hh's columns cols:
    d [T+1, B, K] (dG or dP, slot t+1), W_hh [K, H] row-major; in BLOCK_K chunks of K."""
    carry = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    d_row = ((t64 + 1) * B + rows) * K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        dk = tl.load(d_ptr + d_row[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wk = tl.load(w_ptr + ks[:, None].to(tl.int64) * H + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                     other=0.0)
        carry = _mm(dk.to(w_ptr.dtype.element_ty), wk, carry, FMA, IEEE, UPCAST)
    return carry


@triton.jit
def _load_gates(ptr, off, H, mask, DT: tl.constexpr):
    """The four gate tiles i, f, g, o of a [.., 4H] row layout: ptr + off + q H (q = 0..3), 0
    outside mask, converted to DT (pass ptr's own element type for none)."""
    return (tl.load(ptr + off, mask=mask, other=0.0).to(DT),
            tl.load(ptr + off + H, mask=mask, other=0.0).to(DT),
            tl.load(ptr + off + 2 * H, mask=mask, other=0.0).to(DT),
            tl.load(ptr + off + 3 * H, mask=mask, other=0.0).to(DT))


@triton.jit
def _store_gates(ptr, off, H, a_i, a_f, a_g, a_o, mask):
    """The four gate tiles to ptr + off + q H (q = 0..3), in ptr's element type."""
    ty = ptr.dtype.element_ty
    tl.store(ptr + off, a_i.to(ty), mask=mask)
    tl.store(ptr + off + H, a_f.to(ty), mask=mask)
    tl.store(ptr + off + 2 * H, a_g.to(ty), mask=mask)
    tl.store(ptr + off + 3 * H, a_o.to(ty), mask=mask)


@triton.jit
def _gate_chunk_dots(hk, w_ptr, w_i, w_f, w_g, w_o, ks, kmask, cmask, a_i, a_f, a_g, a_o,
                     FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One BLOCK_K chunk ks of the LSTM's recurrent matmul, all four gates: a_q + hk @ W_q
    where hk [BLOCK_B, BLOCK_K] holds h_{t-1}'s columns ks and W_q's tile [k, j] is read from
    W_hh row (q H + j) (w_q: those rows' offsets, one per unit j of cmask)."""
    wm = kmask[:, None] & cmask[None, :]
    a_i = _mm(hk, tl.load(w_ptr + w_i[None, :] + ks[:, None], mask=wm, other=0.0), a_i, FMA, IEEE, UPCAST)
    a_f = _mm(hk, tl.load(w_ptr + w_f[None, :] + ks[:, None], mask=wm, other=0.0), a_f, FMA, IEEE, UPCAST)
    a_g = _mm(hk, tl.load(w_ptr + w_g[None, :] + ks[:, None], mask=wm, other=0.0), a_g, FMA, IEEE, UPCAST)
    a_o = _mm(hk, tl.load(w_ptr + w_o[None, :] + ks[:, None], mask=wm, other=0.0), a_o, FMA, IEEE, UPCAST)
    return a_i, a_f, a_g, a_o


@triton.jit
def _gate_tile_dots(hk, w_i, w_f, w_g, w_o, a_i, a_f, a_g, a_o, FMA: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr):
    """_gate_chunk_dots with the four gates' W_hh tiles w_q [BLOCK_K, BLOCK_H] already on chip
    (the persistent kernels' resident slices): a_q + hk @ w_q."""
    a_i = _mm(hk, w_i, a_i, FMA, IEEE, UPCAST)
    a_f = _mm(hk, w_f, a_f, FMA, IEEE, UPCAST)
    a_g = _mm(hk, w_g, a_g, FMA, IEEE, UPCAST)
    a_o = _mm(hk, w_o, a_o, FMA, IEEE, UPCAST)
    return a_i, a_f, a_g, a_o


@triton.jit
def _ln_rows(v, cmask, w, b, H, eps):
    """LayerNorm of each row of v [BB, BH] over its first H columns (cmask), weight/bias [BH].

    Returns (v̂, rstd [BB], v̂ w + b); padded columns of v̂ are 0.
    """
    mean = tl.sum(tl.where(cmask[None, :], v, 0.0), axis=1) / H
    d = tl.where(cmask[None, :], v - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    vhat = d * rstd[:, None]
    return vhat, rstd, vhat * w[None, :] + b[None, :]


@triton.jit
def _ln_rows_bwd(dvhat, vhat, rstd, cmask, H):
    """Gradient w.r.t. v of LayerNorm rows, given dL/dv̂ (already multiplied by the weight):
    dv = rstd (dv̂ − mean(dv̂) − v̂ mean(dv̂ v̂))."""
    dvhat = tl.where(cmask[None, :], dvhat, 0.0)
    m1 = tl.sum(dvhat, axis=1) / H
    m2 = tl.sum(dvhat * vhat, axis=1) / H
    return (dvhat - m1[:, None] - vhat * m2[:, None]) * rstd[:, None]
