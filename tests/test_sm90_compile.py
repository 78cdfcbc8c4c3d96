"""The step kernels compile for an H100 (sm_90) — checked on a machine without a GPU.

The interpreter lane runs the kernels' Python, not their compiled form; this lane runs Triton's
real compiler and the bundled ptxas for sm_90 on every step-kernel variant the launchers pick
(fused and unfused, plain and layer-norm LSTM, tanh and ReLU RNN, lengths or none) in each
storage dtype, at the block sizes the launchers choose, so a kernel that cannot compile for the
GPU (a dot of the wrong shape, a dtype mix the backend rejects) fails in CI, not on the scarce
GPU machine. (Registers and spills are known only once a kernel loads on a device.)
"""
import pytest

from conftest import BF16, F16, F32, F64, compile_sm90, requires_sm90_compile

pytestmark = requires_sm90_compile

TY = {F64: "fp64", F32: "fp32", F16: "fp16", BF16: "bf16"}
B, I = 16, 256


def _flags(dtype):
    # as kernels._common.dot_flags on a GPU: fp64 multiplies with FMAs; fp32 without TF32 is IEEE
    return dict(FMA=dtype == F64, IEEE=dtype == F32, UPCAST=False)


def _lstm_case(direction, dtype, H, fused, ln, lengths):
    from fused_rnn.kernels import lstm as K

    st = "fp64" if dtype == F64 else "fp32"
    dt = TY[dtype]
    BB, BH, BK, nw = K._blocks(B, H, H if direction == "fwd" else 4 * H, fused, ln, dtype)
    const = dict(FUSED=fused, LN=ln, HAS_LENGTHS=lengths, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK, **_flags(dtype))
    ln_ptrs = ("gw_ptr", "gb_ptr", "cw_ptr", "cb_ptr")
    cst = dt if dtype in (F16, BF16) and not ln else st  # the saved c: fused_rnn._buffers.lstm_cs_dtype
    if direction == "fwd":
        sig = dict(xp_ptr=f"*{dt}", hs_ptr=f"*{st}", cs_ptr=f"*{cst}", cc_ptr=f"*{st}", gates_ptr=f"*{st}",
                   t="i32", B="i32", H="i32", eps="fp32")
        const["STORE_GATES"] = True
        kern = K._lstm_fwd_kernel
    else:
        sig = dict(gates_ptr=f"*{st}", cs_ptr=f"*{cst}", dout_ptr=f"*{dt}", dg_ptr=f"*{st}", gh_ptr=f"*{st}",
                   gc_ptr=f"*{st}", t="i32", T="i32", B="i32", H="i32", eps="fp32")
        kern = K._lstm_bwd_kernel
        ln_ptrs += ("dgw_ptr", "dgb_ptr", "dcw_ptr", "dcb_ptr")
    if fused:
        sig["w_ptr"], const["mm_ptr" if direction == "fwd" else "carry_ptr"] = f"*{dt}", None
    else:
        sig["mm_ptr" if direction == "fwd" else "carry_ptr"], const["w_ptr"] = f"*{st}", None
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


def _rnn_case(direction, dtype, H, fused, lengths):
    from fused_rnn.kernels import rnn as K

    st = "fp64" if dtype == F64 else "fp32"
    dt = TY[dtype]
    BB, BH, BK = K._blocks(B, H, fused, dtype)
    const = dict(FUSED=fused, HAS_LENGTHS=lengths, RELU=False, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK,
                 **_flags(dtype))
    if direction == "fwd":
        sig = dict(xp_ptr=f"*{dt}", hs_ptr=f"*{st}", out_ptr=f"*{dt}", t="i32", B="i32", H="i32")
        kern, other = K._rnn_fwd_kernel, "mm_ptr"
    else:
        sig = dict(hs_ptr=f"*{st}", dout_ptr=f"*{dt}", dp_ptr=f"*{st}", gh_ptr=f"*{st}", t="i32", T="i32",
                   B="i32", H="i32")
        kern, other = K._rnn_bwd_kernel, "carry_ptr"
        const["RELU"] = True
    if fused:
        sig["w_ptr"], const[other] = f"*{dt}", None
    else:
        sig[other], const["w_ptr"] = f"*{st}", None
    if lengths:
        sig["len_ptr"] = "*i64"
    else:
        const["len_ptr"] = None
    return kern, sig, const, 4


def _cases():
    for dtype in (BF16, F16, F32, F64):
        for direction in ("fwd", "bwd"):
            d = f"{TY[dtype]}-{direction}"
            yield pytest.param("lstm", direction, dtype, 256, True, False, True, id=f"lstm-fused-{d}")
            yield pytest.param("lstm", direction, dtype, 512, False, False, False, id=f"lstm-unfused-{d}")
            # the fused layer-norm kernel at its size limit (256; fp64: 64), the unfused above it
            yield pytest.param("lstm", direction, dtype, 64 if dtype == F64 else 256, True, True, True,
                               id=f"lnlstm-fused-{d}")
            yield pytest.param("lstm", direction, dtype, 768, False, True, True, id=f"lnlstm-unfused-{d}")
            yield pytest.param("rnn", direction, dtype, 512, True, None, True, id=f"rnn-fused-{d}")
            yield pytest.param("rnn", direction, dtype, 512, False, None, False, id=f"rnn-unfused-{d}")


@pytest.mark.parametrize("cell,direction,dtype,H,fused,ln,lengths", list(_cases()))
def test_step_kernel_compiles_for_sm90(cell, direction, dtype, H, fused, ln, lengths):
    if cell == "lstm":
        kern, sig, const, nw = _lstm_case(direction, dtype, H, fused, ln, lengths)
    else:
        kern, sig, const, nw = _rnn_case(direction, dtype, H, fused, lengths)
    ck = compile_sm90(kern, sig, const, num_warps=nw)
    ptx = ck.asm["ptx"]
    assert ".target sm_90" in ptx
    if fused and dtype in (BF16, F16):
        assert "mma" in ptx  # the recurrent matmul runs on tensor cores
