"""The step kernels compile for an H100 (sm_90) without spilling — checked on a machine without a GPU.

The interpreter lane runs the kernels' Python, not their compiled form; this lane runs Triton's
real compiler and the bundled ptxas for sm_90 on every step-kernel variant the launchers pick
(fused and unfused, plain and layer-norm LSTM, tanh and ReLU RNN, GRU, lengths or none) in each
storage dtype, with the launchers' buffer dtypes (kernels.config), at the block sizes the
launchers choose (kernels.tiles.lstm_blocks, rnn_blocks, gru_blocks) and specialised as a launch at the
shape each test names (conftest.compile_sm90: B, H and the base pointers divisible by 16), so
a kernel that cannot compile for the GPU (a dot of the wrong shape, a dtype mix the backend
rejects) fails in CI, not on the scarce GPU machine. The cubin Triton built then says how many
registers each uses and whether it spills (conftest.ptxas_usage): none may, except where a
test names the exception (fp64, the gradcheck dtype, is not checked for spills; the unfused
layer-norm backward of one 4096-unit row spills at any warp count).
"""
import pytest

from conftest import BF16, F16, F32, F64, compile_sm90, ptxas_usage, requires_sm90_compile

pytestmark = requires_sm90_compile

TY = {F64: "fp64", F32: "fp32", F16: "fp16", BF16: "bf16"}
B = 16
T = 1024  # t and T are not specialised (do_not_specialize); B and H are, as each test names them


def _flags(dtype, tf32=False):
    # as kernels._common.dot_flags on a GPU: fp64 multiplies with FMAs; fp32 without TF32 is IEEE
    return dict(FMA=dtype == F64, IEEE=dtype == F32 and not tf32, UPCAST=False)


def _lstm_case(direction, dtype, H, fused, ln, lengths, batch=B, tf32=False):
    from fused_rnn.kernels import config, lstm as K
    from fused_rnn.kernels.tiles import lstm_blocks

    st, dt = TY[config.state_dtype(dtype)], TY[dtype]
    hs, gates = TY[config.lstm_hs_dtype(dtype)], TY[config.lstm_gates_dtype(dtype, ln)]
    cs, dg = TY[config.lstm_cs_dtype(dtype, ln)], TY[config.grad_dtype(dtype)]
    BB, BH, BK, nw = lstm_blocks(batch, H, direction, fused, ln, dtype)
    const = dict(FUSED=fused, LN=ln, HAS_LENGTHS=lengths, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK, **_flags(dtype, tf32))
    ln_ptrs = ("gw_ptr", "gb_ptr", "cw_ptr", "cb_ptr")
    if direction == "fwd":
        sig = dict(xp_ptr=f"*{dt}", hs_ptr=f"*{hs}", cs_ptr=f"*{cs}", cc_ptr=f"*{st}",
                   gates_ptr=f"*{gates}", t=0, B=batch, H=H, eps=config.LN_EPS)
        const["STORE_GATES"] = True
        kern = K.lstm_fwd_kernel
    else:
        sig = dict(gates_ptr=f"*{gates}", cs_ptr=f"*{cs}", dout_ptr=f"*{dt}", dg_ptr=f"*{dg}", gh_ptr=f"*{st}",
                   gc_ptr=f"*{st}", t=0, T=T, B=batch, H=H, eps=config.LN_EPS)
        kern = K.lstm_bwd_kernel
        ln_ptrs += ("dgw_ptr", "dgb_ptr", "dcw_ptr", "dcb_ptr")
    # the unfused kernels read torch's matmul result, in W_hh's dtype
    if fused:
        sig["w_ptr"], const["mm_ptr" if direction == "fwd" else "carry_ptr"] = f"*{dt}", None
    else:
        sig["mm_ptr" if direction == "fwd" else "carry_ptr"], const["w_ptr"] = f"*{dt}", None
    for n in ln_ptrs:
        if ln:
            sig[n] = f"*{st}" if n.startswith("d") else f"*{dt}"
        else:
            const[n] = None
    if lengths:
        sig["len_ptr"] = "*i64"
    else:
        const["len_ptr"] = None
    return kern, sig, const, nw


def _rnn_case(direction, dtype, H, fused, lengths, batch=B, tf32=False):
    from fused_rnn.kernels import config, rnn as K
    from fused_rnn.kernels.tiles import rnn_blocks

    st = "fp64" if dtype == F64 else "fp32"
    dt = TY[dtype]
    dp = TY[config.grad_dtype(dtype)]
    BB, BH, BK, nw = rnn_blocks(batch, H, direction, fused, dtype)
    const = dict(FUSED=fused, HAS_LENGTHS=lengths, RELU=False, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK,
                 **_flags(dtype, tf32))
    # the RNN's hs stays in the state dtype (kernels.config)
    if direction == "fwd":
        sig = dict(xp_ptr=f"*{dt}", hs_ptr=f"*{st}", out_ptr=f"*{dt}", t=0, B=batch, H=H)
        kern, other = K.rnn_fwd_kernel, "mm_ptr"
    else:
        sig = dict(hs_ptr=f"*{st}", dout_ptr=f"*{dt}", dp_ptr=f"*{dp}", gh_ptr=f"*{st}", t=0, T=T, B=batch, H=H)
        kern, other = K.rnn_bwd_kernel, "carry_ptr"
        const["RELU"] = True
    if fused:
        sig["w_ptr"], const[other] = f"*{dt}", None
    else:
        sig[other], const["w_ptr"] = f"*{dt}", None
    if lengths:
        sig["len_ptr"] = "*i64"
    else:
        const["len_ptr"] = None
    return kern, sig, const, nw


def _case(cell, direction, dtype, H, fused, ln, lengths, batch=B, tf32=False):
    if cell == "lstm":
        return _lstm_case(direction, dtype, H, fused, ln, lengths, batch, tf32)
    return _rnn_case(direction, dtype, H, fused, lengths, batch, tf32)


def _ln_fused_max_h(dtype):
    from fused_rnn.kernels.config import ln_fused_max_h

    return ln_fused_max_h(dtype)


def _cases():
    for dtype in (BF16, F16, F32, F64):
        for direction in ("fwd", "bwd"):
            d = f"{TY[dtype]}-{direction}"
            yield pytest.param("lstm", direction, dtype, 256, True, False, True, id=f"lstm-fused-{d}")
            yield pytest.param("lstm", direction, dtype, 512, False, False, False, id=f"lstm-unfused-{d}")
            # the fused layer-norm kernel at its size limit (128; fp64: 64), the unfused above it
            yield pytest.param("lstm", direction, dtype, 64 if dtype == F64 else 128, True, True, True,
                               id=f"lnlstm-fused-{d}")
            yield pytest.param("lstm", direction, dtype, 768, False, True, True, id=f"lnlstm-unfused-{d}")
            yield pytest.param("rnn", direction, dtype, 512, True, None, True, id=f"rnn-fused-{d}")
            yield pytest.param("rnn", direction, dtype, 512, False, None, False, id=f"rnn-unfused-{d}")


def _no_spill(ck, what):
    usage = ptxas_usage(ck)
    if usage is None:
        pytest.skip("this Triton does not expose its ptxas")
    regs, spill = usage
    assert spill == 0, f"{what}: {regs} registers, {spill} bytes spilled"
    return regs


@pytest.mark.parametrize("cell,direction,dtype,H,fused,ln,lengths", list(_cases()))
def test_step_kernel_compiles_for_sm90(cell, direction, dtype, H, fused, ln, lengths):
    if cell == "lstm" and ln and fused:
        assert H == _ln_fused_max_h(dtype)
    kern, sig, const, nw = _case(cell, direction, dtype, H, fused, ln, lengths)
    ck = compile_sm90(kern, sig, const, num_warps=nw)
    ptx = ck.asm["ptx"]
    assert ".target sm_90" in ptx
    if fused and dtype in (BF16, F16):
        assert "mma" in ptx  # the recurrent matmul runs on tensor cores
    if dtype != F64:
        _no_spill(ck, f"{cell} {direction} {TY[dtype]} B{B} H{H} tile {const['BLOCK_B']}x{const['BLOCK_H']}")


# The other tiles the launchers choose (the B16 cases above take 16 x 16): 64 x 32 at a large
# batch (kernels.tiles.step_tile: B256 H1024, S3), 64 x 16 and 16 x 32 (S2, B64 H512), the fused
# layer-norm kernel's narrower rows, the unfused one's row blocks from 4 x 256 to 1 x 2048, and
# fp32 with TF32 where the dot changes (the forward's tensor-core dots).
def _tile_cases():
    seen = set()
    for tf32, dtypes in ((False, (BF16, F32)), (True, (F32,))):
        for dtype in dtypes:
            for direction in ("fwd", "bwd"):
                shapes = [("lstm", 256, 1024, True, False), ("rnn", 256, 1024, True, None),
                          ("lstm", 64, 512, True, False), ("rnn", 64, 512, True, None),
                          ("rnn", 192, 384, True, None),
                          ("lstm", 16, 32, True, True), ("lstm", 16, 64, True, True),
                          ("lstm", 16, 256, False, True), ("lstm", 16, 2048, False, True)]
                if tf32:
                    shapes = [("lstm", 16, 256, True, False), ("lstm", 256, 1024, True, False),
                              ("lstm", 16, 128, True, True), ("rnn", 256, 1024, True, None)]
                for cell, batch, H, fused, ln in shapes:
                    _, _, const, nw = _case(cell, direction, dtype, H, fused, ln, True, batch, tf32)
                    key = (cell, bool(ln), fused, direction, TY[dtype], tf32,
                           tuple(const[k] for k in ("BLOCK_B", "BLOCK_H", "BLOCK_K")), nw)
                    if key in seen:
                        continue
                    seen.add(key)
                    name = "lnlstm" if ln else cell
                    yield pytest.param(cell, direction, dtype, batch, H, fused, ln, tf32,
                                       id=f"{name}-{'fused' if fused else 'unfused'}-{TY[dtype]}"
                                          f"{'-tf32' if tf32 else ''}-{direction}-B{batch}-H{H}")


@pytest.mark.parametrize("cell,direction,dtype,batch,H,fused,ln,tf32", list(_tile_cases()))
def test_step_tiles_compile_without_spilling(cell, direction, dtype, batch, H, fused, ln, tf32):
    kern, sig, const, nw = _case(cell, direction, dtype, H, fused, ln, True, batch, tf32)
    if batch >= 256 and fused and not ln and dtype == BF16:
        assert const["BLOCK_B"] == 64, "S3 in bf16 takes 64-row blocks (step_tile)"
    ck = compile_sm90(kern, sig, const, num_warps=nw)
    if const["BLOCK_B"] == 64 and (dtype == BF16 or tf32):
        assert "wgmma" in ck.asm["ptx"]  # Hopper's warpgroup MMA
    _no_spill(ck, f"{cell} {direction} {TY[dtype]}{' tf32' if tf32 else ''} B{batch} H{H} "
                  f"tile {const['BLOCK_B']}x{const['BLOCK_H']}x{const['BLOCK_K']} {nw} warps")


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=TY.get)
@pytest.mark.parametrize("ln,H", [(False, 768), (True, 768), (True, 2048)], ids=["lstm", "lnlstm", "lnlstm-H2048"])
def test_lstm_proj_backward_compiles_without_spilling(dtype, ln, H):
    """The LSTM with projections (kernels/lstm_proj.py) runs the unfused backward with its dout
    (du_t = dĥ_t W_hr) in the state dtype, not the storage dtype: a kernel of its own."""
    from fused_rnn.kernels import config

    kern, sig, const, nw = _case("lstm", "bwd", dtype, H, False, ln, True)
    sig["dout_ptr"] = f"*{TY[config.state_dtype(dtype)]}"
    _no_spill(compile_sm90(kern, sig, const, num_warps=nw),
              f"proj bwd {TY[dtype]} ln={ln} H{H} tile {const['BLOCK_B']}x{const['BLOCK_H']} {nw} warps")


def test_the_former_step_tiles_spilled():
    """The control: the fused layer-norm LSTM backward over a whole 256-unit row (8 warps; the
    tile rules run the GEMM plus the pointwise kernel above 128 units) spills in fp32, so the
    check above can fail. (The former plain forward tile, 16 x 32 with BLOCK_K 64 and 4 warps,
    spilled only as compiled without the launch's specialisation.)"""
    from fused_rnn.kernels import config

    with config.using(step_tiles=dict(BLOCK_B=16, BLOCK_H=256, BLOCK_K=64, num_warps=8)):
        kern, sig, const, nw = _case("lstm", "bwd", F32, 256, True, True, True)
    usage = ptxas_usage(compile_sm90(kern, sig, const, num_warps=nw))
    if usage is None:
        pytest.skip("this Triton does not expose its ptxas")
    assert usage[1] > 0, usage


def test_sm90_tiles_script():
    """bench/sm90_tiles.py (the whole grid's registers and spills, for a change to the tile rules)
    runs: one small shape, every kernel and direction, no spill."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "sm90_tiles.py")
    p = subprocess.run([sys.executable, script, "--batches", "16", "--hidden", "16", "--dtypes", "bf16"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if " tile " in ln]
    assert len(lines) == 12 and all(ln.endswith(" 0 B spilled") for ln in lines), p.stdout
    assert "12 tiles, 0 spilling" in p.stdout


def test_compile_sm90_specialises_as_a_launch():
    """compile_sm90 compiles what a launch on an H100 does: B and H divisible by 16 and base
    pointers carry tt.divisibility (vectorised loads), B3 H10 and a pointer 4 bytes into its
    allocation do not, an int equal to 1 is a constant; and the cases here specialise as the
    launchers' own calls do (their first launch, recorded on CPU tensors at B16 H256)."""
    import re

    import torch

    from conftest import Ptr, sm90_launch, sm90_specialization
    from fused_rnn.kernels import lstm as LK, rnn as RK

    kern, sig, const, nw = _case("rnn", "fwd", F32, 256, True, None, True)
    ck = compile_sm90(kern, sig, const, num_warps=nw)
    ttir, ptx = ck.asm["ttir"], ck.asm["ptx"]
    for arg in ("%B: i32", "%H: i32", "%xp_ptr: !tt.ptr<f32>", "%hs_ptr: !tt.ptr<f32>"):
        assert f"{arg} {{tt.divisibility = 16 : i32}}" in ttir, arg
    assert re.search(r"ld\.global\.v[24]\.", ptx), "no vectorised load at B16 H256"
    ck = compile_sm90(kern, dict(sig, B=3, H=10, hs_ptr=Ptr(torch.float32, 4)), const, num_warps=nw)
    ttir, ptx = ck.asm["ttir"], ck.asm["ptx"]
    for arg in ("%B: i32", "%H: i32", "%hs_ptr: !tt.ptr<f32>"):
        assert f"{arg} loc(" in ttir, arg
    assert "%xp_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32}" in ttir
    assert not re.search(r"ld\.global\.v[24]\.", ptx)
    fn, signature, consts, _, _ = sm90_specialization(kern, dict(sig, B=1, **const), num_warps=nw)
    assert signature["B"] == "constexpr" and consts[(fn.arg_names.index("B"),)] == 1

    B, T, H, f32 = 16, 2, 256, torch.float32
    x, h0, L = torch.randn(T, B, 8), torch.zeros(B, H), torch.full((B,), T)
    w_ih, w_hh = torch.randn(4 * H, 8), torch.randn(4 * H, H)
    hs, cs, gates = torch.zeros(T + 1, B, H), torch.zeros(T + 1, B, H), torch.zeros(T + 1, B, 4 * H)
    launches = {
        ("lstm", "fwd"): lambda: LK.lstm_fwd(x, h0, h0, w_ih, w_hh, lengths=L, fused=True, save_gates=True),
        ("lstm", "bwd"): lambda: LK.lstm_bwd(hs[1:], h0, h0, x, w_ih, w_hh, hs, cs, gates, lengths=L, fused=True),
        ("rnn", "fwd"): lambda: RK.rnn_fwd(x, h0, w_ih[:H], w_hh[:H, :H], lengths=L),
        ("rnn", "bwd"): lambda: RK.rnn_bwd(hs[1:], h0, x, w_ih[:H], w_hh[:H, :H], hs, lengths=L,
                                           nonlinearity="relu"),
    }
    for (cell, d), launch in launches.items():
        real = sm90_launch(launch)
        kern, sig, const, nw = _case(cell, d, f32, H, True, False if cell == "lstm" else None, True)
        ours = sm90_specialization(kern, {**sig, **const}, num_warps=nw)
        assert real[0] is ours[0] and real[1:3] == ours[1:3] and real[4] == ours[4], (cell, d)
        assert real[3].__dict__ == ours[3].__dict__, (cell, d)  # the compile options


def _gru_case(direction, dtype, H, lengths, batch=B, bias=True, tf32=False):
    """The GRU step kernels as kernels/gru.py launches them: hs and the saved gates in the state
    dtype, dxp / dhp in the grad dtype, b_hh and lengths given or not."""
    from fused_rnn.kernels import config, gru as K
    from fused_rnn.kernels.tiles import gru_blocks

    st, dt, gd = TY[config.state_dtype(dtype)], TY[dtype], TY[config.grad_dtype(dtype)]
    BB, BH, BK, nw = gru_blocks(batch, H, direction, dtype)
    const = dict(HAS_LENGTHS=lengths, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK, **_flags(dtype, tf32))
    if direction == "fwd":
        sig = dict(xp_ptr=f"*{dt}", w_ptr=f"*{dt}", hs_ptr=f"*{st}", gates_ptr=f"*{st}", out_ptr=f"*{dt}",
                   t=0, B=batch, H=H)
        const["HAS_BIAS"] = bias
        sig["b_ptr"] = f"*{dt}" if bias else None
        kern = K.gru_fwd_kernel
    else:
        sig = dict(w_ptr=f"*{dt}", hs_ptr=f"*{st}", gates_ptr=f"*{st}", dout_ptr=f"*{dt}", dxp_ptr=f"*{gd}",
                   dhp_ptr=f"*{gd}", gh_ptr=f"*{st}", t=0, T=T, B=batch, H=H)
        kern = K.gru_bwd_kernel
    sig["len_ptr"] = "*i64" if lengths else None
    return kern, sig, const, nw


# every dtype at B16 H512 (16 x 16; fp64 16 x 32), no bias and no lengths once, and the other
# tiles the rule picks: 64 x 32 at B256 H1024 (S3), 16 x 32 at B64 H512 (S2), fp32 with TF32
def _gru_cases():
    for dtype in (BF16, F16, F32, F64):
        for direction in ("fwd", "bwd"):
            yield pytest.param(direction, dtype, 16, 512, True, True, False, id=f"{TY[dtype]}-{direction}-B16-H512")
    for direction in ("fwd", "bwd"):
        yield pytest.param(direction, BF16, 16, 256, False, False, False, id=f"bf16-{direction}-nobias-nolengths")
        # B not a multiple of 16 (no divisibility attribute): BLOCK_K 64 spilled the backward here
        yield pytest.param(direction, BF16, 3, 16, True, True, False, id=f"bf16-{direction}-B3-H16")
        # fp32's 16 x 32 tile (from H 4096 at B16): BLOCK_K 32 spilled its forward
        yield pytest.param(direction, F32, 16, 4096, True, True, False, id=f"fp32-{direction}-B16-H4096")
        for batch, H in ((256, 1024), (64, 512)):
            yield pytest.param(direction, BF16, batch, H, True, True, False, id=f"bf16-{direction}-B{batch}-H{H}")
        yield pytest.param(direction, F32, 256, 1024, True, True, True, id=f"fp32-tf32-{direction}-B256-H1024")


@pytest.mark.parametrize("direction,dtype,batch,H,lengths,bias,tf32", list(_gru_cases()))
def test_gru_step_kernels_compile_without_spilling(direction, dtype, batch, H, lengths, bias, tf32):
    kern, sig, const, nw = _gru_case(direction, dtype, H, lengths, batch, bias, tf32)
    ck = compile_sm90(kern, sig, const, num_warps=nw)
    ptx = ck.asm["ptx"]
    assert ".target sm_90" in ptx
    if dtype in (BF16, F16):
        assert "mma" in ptx  # the recurrent matmul runs on tensor cores
    if dtype != F64:
        _no_spill(ck, f"gru {direction} {TY[dtype]} B{batch} H{H} tile "
                      f"{const['BLOCK_B']}x{const['BLOCK_H']}x{const['BLOCK_K']} {nw} warps")


def test_gru_cases_specialise_as_its_launchers():
    """_gru_case specialises as kernels/gru.py's own first launches do (B16 H256, fp32)."""
    import torch

    from conftest import sm90_launch, sm90_specialization
    from fused_rnn.kernels import gru as GK

    Bt, Tt, H, f32 = 16, 2, 256, torch.float32
    x, h0, L = torch.randn(Tt, Bt, 8), torch.zeros(Bt, H), torch.full((Bt,), Tt)
    w_ih, w_hh, b = torch.randn(3 * H, 8), torch.randn(3 * H, H), torch.zeros(3 * H)
    hs, gates = torch.zeros(Tt + 1, Bt, H), torch.zeros(Tt, Bt, 4 * H)
    launches = {"fwd": lambda: GK.gru_fwd(x, h0, w_ih, w_hh, b, b, lengths=L),
                "bwd": lambda: GK.gru_bwd(hs[1:], h0, x, w_ih, w_hh, hs, gates, lengths=L)}
    for d, launch in launches.items():
        real = sm90_launch(launch)
        kern, sig, const, nw = _gru_case(d, f32, H, True, Bt)
        ours = sm90_specialization(kern, {**sig, **const}, num_warps=nw)
        assert real[0] is ours[0] and real[1:3] == ours[1:3] and real[4] == ours[4], d
        assert real[3].__dict__ == ours[3].__dict__, d
