"""The persistent kernels' shared machinery, without a GPU: the LL exchange's tagged words (every
value and tag round-trips, under the interpreter), and every persistent kernel compiled for an
H100 (sm_90) at its plans with the installed Triton and its ptxas: the barrier's release /
acquire atomics or the LL exchange's in the PTX, W_hh kept in shared memory, and registers and
spills within budget (docs/persistent.md has the tables)."""
import re

import pytest
import torch

from _persistent_helpers import use_options  # noqa: F401 (fixtures)
from conftest import (BF16, F16, F32, HAS_CUDA, INTERPRET, compile_sm90, ptxas_usage, requires_sm90_compile, res_usage,
                      triton_36)


# kernels.persistent's LL helpers, for the @triton.jit test kernel below (a jit function sees its
# module's globals); set by that test, which imports Triton only when it runs
ll_put = ll_get = None


@pytest.mark.skipif(not INTERPRET or HAS_CUDA, reason="the CPU lane under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=["bf16", "fp16", "fp32"])
def test_ll_words_round_trip_every_value_and_tag(dtype):
    """ll_put / ll_get: every value (signed zeros, subnormals, inf, NaN payloads, random) comes
    back bit for bit, under step tags across the 15-bit wrap-around (the tag stored is the step's
    low 15 bits, and the reader compares the same), in 32-bit words for 16-bit values and 64-bit
    words for fp32; the masked-out words stay -1."""
    import triton
    import triton.language as tl

    from fused_rnn.kernels import persistent

    globals().update(ll_put=persistent.ll_put, ll_get=persistent.ll_get, tl=tl)  # see ll_put above

    @triton.jit
    def put_get(v_ptr, ring_ptr, out_ptr, tag, N: tl.constexpr, M: tl.constexpr):
        r = tl.arange(0, N)
        c = tl.arange(0, M)
        off = r[:, None] * M + c[None, :]
        mask = (r < N - 1)[:, None] & (c >= 0)[None, :]  # the last row masked out
        v = tl.load(v_ptr + off, mask=mask, other=0.0)
        ll_put(ring_ptr, off, v, tag, mask)
        got = ll_get(ring_ptr, off, mask, tag, v_ptr.dtype.element_ty)
        tl.store(out_ptr + off, got, mask=mask)

    bits = {BF16: torch.int16, F16: torch.int16, F32: torch.int32}[dtype]
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-42, 5.9e-8, 1.0, -2.5],
                           dtype=torch.float32).to(dtype)
    vals = torch.cat([special, torch.randn(64 - special.numel()).to(dtype)]).view(8, 8)
    vals.view(bits)[7, :3] = torch.tensor([0x7FC1, -0x10, 0x7E01], dtype=bits)  # NaN payloads (and a row masked out)
    vals.view(bits)[6, :2] = torch.tensor([-1, 0x7C01 if dtype == F16 else 0x7FA0], dtype=bits)  # all ones, a NaN
    word = torch.int64 if dtype == F32 else torch.int32
    for tag in (0, 1, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 3 * 0x8000 + 5, 2 ** 31 - 1):
        ring = torch.full((8, 8), -1, dtype=word)
        out = torch.zeros_like(vals)
        put_get[(1,)](vals, ring, out, tag, N=8, M=8)
        assert torch.equal(out[:7].view(bits), vals[:7].view(bits)), tag
        shift = 32 if dtype == F32 else 16
        assert ((ring[:7] >> shift) & 0xFFFF == tag & 0x7FFF).all(), tag
        assert (ring[7] == -1).all()  # masked out: never written


# ------------------------------------------------------------- sm_90 compile (no GPU needed)
# the four benchmark shapes' (B, H): S1 resident W_hh, S2 resident forward / streamed LSTM
# backward, S3 four row blocks, S4 K_pad 1024 streamed
SM90_SHAPES = {"S1": (16, 256), "S2": (64, 512), "S3": (256, 1024), "S4": (16, 768), "B16-H128": (16, 128)}
T_SM90 = 1024  # T is not specialised (do_not_specialize); B and H are (conftest.compile_sm90)


# Spilled bytes (the cubin's stack) allowed at these plans, bf16 with lengths, as launched: none
# under Triton 3.6 (the GPU machine's) or 3.9, solo plans included, but these under 3.9 alone (its
# ptxas runs with --regAllocOptLevel=2, 3.6's does not); their plans stay until a GPU times them
# (docs/persistent.md). A regression guard per compiler, not a correctness bound.
SM90_SPILL_TRITON39 = {} if triton_36() else {("lstm", "bwd", "S4", "barrier"): 64, ("rnn", "fwd", "S4", "ll"): 8,
                                              ("lstm", "bwd", "B16-H128", "ll-fp32"): 16}


@requires_sm90_compile
@pytest.mark.parametrize("sync", ["barrier", "ll", "solo"])
@pytest.mark.parametrize("shape", list(SM90_SHAPES))
@pytest.mark.parametrize("cell,direction", [("lstm", "fwd"), ("lstm", "bwd"), ("rnn", "fwd"), ("rnn", "bwd")])
def test_persistent_kernels_compile_for_sm90(cell, direction, shape, sync, use_options):
    """Compile each persistent kernel for an H100 (sm_90) with the installed Triton and its
    bundled ptxas, at the plans of the benchmark shapes (bf16, the 16-bit buffers of
    kernels.config), and check the grid barrier made it into the PTX: a release add and an
    acquire read of the counter at GPU scope, CTA barriers; with the LL exchange instead
    (sync="ll"), no atomic and no release at all, and volatile loads of the tagged ring; and
    that registers do not spill (but the named exceptions, SM90_SPILL_TRITON39)."""
    import triton.language as tl

    from fused_rnn.kernels import lstm_persistent as LP,  rnn_persistent as RP, tiles

    use_options(ll_sync=sync == "ll", solo=sync == "solo")
    B, H = SM90_SHAPES[shape]
    pl, _ = tiles.plan(cell, direction, B, H, BF16, torch.device("cuda", 0), limit=132)
    if sync == "ll" and not pl.ll:  # plan() keeps the barrier where the tagged tile would spill
        assert (pl.resident and pl.BLOCK_B * pl.BLOCK_K > 4096) or pl.BLOCK_B * pl.BLOCK_H >= 2048, pl
        pytest.skip(f"no LL exchange at {shape} {cell} {direction}: {pl}")
    if sync == "solo" and not pl.solo:  # W_hh over SOLO_MAX_W_BYTES
        assert (4 if cell == "lstm" else 1) * 2 * triton_next_pow2(H) ** 2 > tiles.SOLO_MAX_W_BYTES, pl
        pytest.skip(f"no solo plan at {shape} {cell} {direction}: {pl}")
    assert (pl.ll, pl.solo) == (sync == "ll", sync == "solo")
    blocks = dict(RESIDENT=pl.resident, FMA=False, IEEE=False, UPCAST=False, BLOCK_B=pl.BLOCK_B,
                  BLOCK_H=pl.BLOCK_H, BLOCK_K=pl.BLOCK_K, NK=pl.w_chunks, HAS_LENGTHS=True, LL=pl.ll, SOLO=pl.solo,
                  EARLY=pl.early and not pl.ll and not pl.solo)
    scalars = dict(len_ptr="*i64", T=T_SM90, B=B, H=H)
    if pl.ll:
        scalars["ring_ptr"] = "*i32"
        blocks["sync_ptr"] = None
    elif pl.solo:
        blocks["ring_ptr"] = blocks["sync_ptr"] = None
    else:
        scalars["sync_ptr"] = "*i32"
        blocks["ring_ptr"] = None
    if cell == "lstm" and direction == "fwd":
        kern, sig = LP._lstm_fwd_persistent_kernel, dict(xp_ptr="*bf16", w_ptr="*bf16", hs_ptr="*bf16",
                                                        cs_ptr="*bf16", gates_ptr="*bf16")
        blocks["STORE_GATES"] = True
        blocks["ACC"] = tl.float32
    elif cell == "lstm":
        kern, sig = LP._lstm_bwd_persistent_kernel, dict(gates_ptr="*bf16", w_ptr="*bf16", cs_ptr="*bf16",
                                                        dout_ptr="*bf16", dg_ptr="*bf16", gh_ptr="*fp32",
                                                        gc_ptr="*fp32")
    elif direction == "fwd":
        kern, sig = RP._rnn_fwd_persistent_kernel, dict(xp_ptr="*bf16", w_ptr="*bf16", hs_ptr="*fp32",
                                                       out_ptr="*bf16")
        blocks["RELU"] = False
    else:
        kern, sig = RP._rnn_bwd_persistent_kernel, dict(w_ptr="*bf16", hs_ptr="*fp32", dout_ptr="*bf16",
                                                       dp_ptr="*bf16", gh_ptr="*fp32")
        blocks["RELU"] = False
    sig.update(scalars)
    ck = compile_sm90(kern, sig, blocks, num_warps=pl.num_warps, num_stages=pl.num_stages,
                      launch_cooperative_grid=True, enable_fp_fusion=True)
    ptx = ck.asm["ptx"]
    assert "mma" in ptx  # the recurrent matmul on tensor cores
    if pl.ll:
        # no counter, no fence: the only atomics are the ring's relaxed exchanges (strong stores)
        atomics = re.findall(r"\b(?:red|atom)\.[a-z0-9.]+", ptx)
        assert atomics and all(a.startswith("atom.global.gpu.relaxed.exch.b32") for a in atomics), atomics
        assert ".release" not in ptx and ".acquire" not in ptx
        assert not re.search(r"\bmembar\.|\bfence\.(sc|acq_rel)", ptx)  # (wgmma's fence.proxy.async is not one)
        assert re.search(r"ld\.volatile\.global", ptx), "no volatile load of the ring"
    elif pl.solo:  # nothing to wait for: no atomic, no fence, no volatile load
        assert not re.search(r"\b(?:red|atom)\.", ptx) and "ld.volatile" not in ptx
        assert ".release" not in ptx and ".acquire" not in ptx
    else:
        _check_barrier_ptx(ptx)
        # Plan.early: the step's private stores and the next step's own loads sit between the
        # arrival (the release add) and the wait (the acquire); in the former order, none
        seg = ptx[ptx.index("release.add"):]
        seg = seg[:seg.index("acquire")]
        traffic = [ln for ln in seg.splitlines() if re.search(r"\b(ld|st)\.global\.(?!gpu\.)", ln)]  # (not the acquire)
        assert bool(traffic) == pl.early, (pl, traffic)
    # a resident slice stays in shared memory: its tiles (gates x w_chunks of them) are allocated
    # there once, before the time loop (the first scf.for; static_range loops are unrolled)
    ttgir = ck.asm["ttgir"]
    loop = ttgir.index("scf.for")
    n_tiles = (4 if cell == "lstm" else 1) * pl.w_chunks if pl.resident else 0
    assert ttgir[:loop].count("ttg.local_alloc") >= n_tiles, "W_hh tiles not kept in shared memory"
    assert ck.metadata.shared <= 227 * 1024, f"{ck.metadata.shared} B of shared memory (an H100 block: 227 KiB)"
    if shape == "S4" and sync == "barrier":  # W_hh chunk-resident (Options.w_chunked) at B16 H768
        assert pl.resident and pl.w_chunks == 12 and pl.BLOCK_K == 64, pl
    usage = ptxas_usage(ck)
    if usage is not None:
        regs, spill = usage
        print(f"{cell} {direction} {shape} {pl}: {regs} registers, {spill} bytes spilled, "
              f"{ck.metadata.shared} B shared")
        assert spill <= SM90_SPILL_TRITON39.get((cell, direction, shape, sync), 0), f"{spill} bytes of registers spilled"


@requires_sm90_compile
@pytest.mark.parametrize("cell,direction", [("lstm", "fwd"), ("lstm", "bwd"), ("rnn", "fwd"), ("rnn", "bwd")])
def test_ll_exchange_fp32_compiles_for_sm90(cell, direction, use_options):
    """The LL exchange's 64-bit words (fp32 with TF32 at B16 H128, W_hh resident; at B16 H256 the
    RNN's 64-bit row tile spilled, and plan() keeps the barrier there): 64-bit relaxed exchanges
    and volatile loads, no fence, no spill."""
    import triton.language as tl

    from fused_rnn.kernels import lstm_persistent as LP,  rnn_persistent as RP, tiles

    use_options(ll_sync=True)
    pl, _ = tiles.plan(cell, direction, 16, 128, F32, torch.device("cuda", 0), limit=132, allow_tf32=True)
    assert pl.ll, pl
    assert not tiles.plan(cell, direction, 16, 256, F32, torch.device("cuda", 0), limit=132, allow_tf32=True)[0].ll
    blocks = dict(RESIDENT=pl.resident, FMA=False, IEEE=False, UPCAST=False, BLOCK_B=pl.BLOCK_B, BLOCK_H=pl.BLOCK_H,
                  BLOCK_K=pl.BLOCK_K, NK=pl.w_chunks, HAS_LENGTHS=True, LL=True, SOLO=False, sync_ptr=None,
                  EARLY=False)
    sig = dict(len_ptr="*i64", ring_ptr="*i64", T=T_SM90, B=16, H=128)
    if cell == "lstm" and direction == "fwd":
        kern = LP._lstm_fwd_persistent_kernel
        sig.update(xp_ptr="*fp32", w_ptr="*fp32", hs_ptr="*fp32", cs_ptr="*fp32", gates_ptr="*fp32")
        blocks.update(STORE_GATES=True, ACC=tl.float32)
    elif cell == "lstm":
        kern = LP._lstm_bwd_persistent_kernel
        sig.update(gates_ptr="*fp32", w_ptr="*fp32", cs_ptr="*fp32", dout_ptr="*fp32", dg_ptr="*fp32",
                   gh_ptr="*fp32", gc_ptr="*fp32")
    elif direction == "fwd":
        kern = RP._rnn_fwd_persistent_kernel
        sig.update(xp_ptr="*fp32", w_ptr="*fp32", hs_ptr="*fp32", out_ptr="*fp32")
        blocks["RELU"] = False
    else:
        kern = RP._rnn_bwd_persistent_kernel
        sig.update(w_ptr="*fp32", hs_ptr="*fp32", dout_ptr="*fp32", dp_ptr="*fp32", gh_ptr="*fp32")
        blocks["RELU"] = False
    ck = compile_sm90(kern, sig, blocks, num_warps=pl.num_warps, num_stages=pl.num_stages,
                      launch_cooperative_grid=True, enable_fp_fusion=True)
    ptx = ck.asm["ptx"]
    atomics = re.findall(r"\b(?:red|atom)\.[a-z0-9.]+", ptx)
    assert atomics and all(a.startswith("atom.global.gpu.relaxed.exch.b64") for a in atomics), atomics
    assert re.search(r"ld\.volatile\.global(\.v2)?\.[bu]64", ptx), "no 64-bit volatile load of the ring"
    assert ".release" not in ptx and ".acquire" not in ptx and not re.search(r"\bmembar\.|\bfence\.(sc|acq_rel)", ptx)
    usage = ptxas_usage(ck)
    if usage is not None:
        print(f"{cell} {direction} fp32 LL {pl}: {usage[0]} registers, {usage[1]} bytes spilled")
        assert usage[1] <= SM90_SPILL_TRITON39.get((cell, direction, "B16-H128", "ll-fp32"), 0), usage


def triton_next_pow2(n):
    import triton

    return triton.next_power_of_2(n)


def _check_barrier_ptx(ptx):
    assert re.search(r"(red|atom)\.global\.gpu\.release\.add", ptx), "no release add at GPU scope"
    assert re.search(r"(ld|atom)\.global\.gpu\.acquire", ptx), "no acquire read at GPU scope"
    assert "bar.sync" in ptx
    # one arrival per program and barrier (the n P targets count programs): a single release add
    # in the kernel, predicated (on thread 0 of the CTA: a setp.eq of a %tid.x-derived register
    # with 0 in every compile read so far, too varied in form to match here)
    adds = re.findall(r"@(%p\d+) (?:red|atom)\.global\.gpu\.release\.add", ptx)
    assert len(adds) == 1 and len(re.findall(r"\.global\.gpu\.release", ptx)) == 1, adds


def _compile_ln_sm90(direction, pl, B, H, st, merged, dt="bf16"):
    """The LN kernel of ``direction`` compiled for sm_90 as plan ``pl`` launches it (inputs and
    W_hh in ``dt``, lengths on; hs / dG in ``st``; MERGE_C / MERGE_BWD = ``merged``; with pl.ll
    the LL rings)."""
    from fused_rnn.kernels import config, ln_lstm_persistent as PL, tiles

    nq = (PL.NQ_MERGED if direction == "fwd" else PL.NQ_BWD_MERGED) if merged else PL.NQ
    const = dict(RESIDENT=pl.resident, FMA=False, IEEE=False, UPCAST=False, BLOCK_B=pl.BLOCK_B, BLOCK_H=pl.BLOCK_H,
                 BLOCK_K=pl.BLOCK_K, BLOCK_P=tiles.block_p(pl.programs), NQ=nq, HAS_LENGTHS=True, EARLY=pl.early,
                 LL=pl.ll)
    sig = dict(len_ptr="*i64", part_ptr="*i64" if pl.ll else "*fp32", T=T_SM90, B=B, H=H, gw_ptr=f"*{dt}",
               gb_ptr=f"*{dt}", cw_ptr=f"*{dt}", cb_ptr=f"*{dt}")
    if pl.ll:
        sig["ring_ptr"] = "*i64" if dt == "fp32" else "*i32"  # a tagged word: 64 / 32 bits
        const["sync_ptr"] = None
    else:
        sig["sync_ptr"] = "*i32"
        const["ring_ptr"] = None
    if direction == "fwd":
        kern = PL._ln_lstm_fwd_persistent_kernel
        sig.update(xp_ptr=f"*{dt}", w_ptr=f"*{dt}", hs_ptr=f"*{st}", cs_ptr="*fp32",
                   gates_ptr="*fp32", eps=config.LN_EPS)
        const.update(STORE_GATES=True, MERGE_C=merged, BLOCK_S=tiles.k_pad(H) if merged else 1, NK=pl.w_chunks)
        if merged:
            sig["cell_ptr"] = "*fp32"
        else:
            const["cell_ptr"] = None
    else:
        kern = PL._ln_lstm_bwd_persistent_kernel
        sig.update(gates_ptr="*fp32", w_ptr=f"*{dt}", cs_ptr="*fp32", dout_ptr=f"*{dt}", dg_ptr=f"*{st}",
                   gh_ptr="*fp32", gc_ptr="*fp32", stat_ptr="*fp32", dgw_ptr="*fp32", dgb_ptr="*fp32",
                   dcw_ptr="*fp32", dcb_ptr="*fp32")
        const.update(NSTAT=PL.NSTAT, MERGE_BWD=merged)
        assert pl.w_chunks == 1, pl
    return compile_sm90(kern, sig, const, num_warps=pl.num_warps, num_stages=pl.num_stages,
                        launch_cooperative_grid=True)


# (direction, shape, hs / dG dtype, forward variant): every kernel at S1/S2/S4's plans with fp32
# state buffers (kernels.lstm's layout at the time of writing) and with bf16 ones (the
# storage-dtype layout being introduced). Variant None: the plan's (fwd_merge_c: MERGE_C at
# B16 H256, B16 H128, B64 H64); False: the 3-barrier forward forced where the plan picks MERGE_C.
# Spill bytes allowed: 0, except under Triton 3.6 (the GPU machine's): the forward at B64 H512
# with a bf16 hs (32 B), the 2-barrier backward at B16 H256 (8 B) and the backward at B16 H256
# with an fp32 dG (16 B; a layout no launcher passes: bf16 inputs take a bf16 dG,
# kernels.config); under Triton 3.9 the backward at B64 H512 with an fp32 dG (8 B). Figures and
# history: docs/persistent.md. A regression guard per compiler, not a correctness bound.
SM90_CASES = ([(d, B, H, st, None) for (B, H) in ((16, 256), (64, 512), (16, 768)) for d in ("fwd", "bwd")
               for st in ("fp32", "bf16")]
              + [("fwd", 16, 256, st, False) for st in ("fp32", "bf16")]
              + [("fwd", B, H, st, None) for (B, H) in ((16, 128), (64, 64)) for st in ("fp32", "bf16")]
              + [("bwd", 64, 64, "bf16", None)]  # (8 warps: _ln_num_warps)
              + [("bwd", B, H, "bf16", True) for (B, H) in ((16, 256), (64, 512), (16, 768))])  # MERGE_BWD


SM90_SPILL_ALLOWED = ({("fwd", 64, 512, "bf16"): 32, ("bwd-2bar", 16, 256, "bf16"): 8, ("bwd", 16, 256, "fp32"): 16}
                      if triton_36() else {("bwd", 64, 512, "fp32"): 8})


@requires_sm90_compile
@pytest.mark.parametrize("direction,B,H,st,merge", SM90_CASES,
                         ids=[f"{d}-B{B}-H{H}-{st}" + ("-3bar" if m is False else "-2bar" if m and d == "bwd" else "")
                              for d, B, H, st, m in SM90_CASES])
def test_ln_kernels_compile_for_sm90(use_options, direction, B, H, st, merge):
    """Both persistent LN kernels compile for an H100 (sm_90) at plan_ln's plans (bf16 inputs,
    lengths on), with the grid barrier's release/acquire atomics in the PTX (one release add per
    barrier of a step: 2 for the forward's MERGE_C variant and the backward's MERGE_BWD, else 3);
    prints registers, stack (spill) bytes and shared memory, and checks the spill budget."""
    from fused_rnn.kernels import ln_lstm_persistent as PL, tiles

    if direction == "fwd":
        use_options(merge_c=merge)
    pl, why = tiles.plan_ln(direction, B, H, BF16, torch.device("cuda", 0), limit=132)
    assert pl is not None, why
    merged = tiles.fwd_merge_c(pl, H) if direction == "fwd" else bool(merge)
    nbar = PL.fwd_barriers_per_step(pl, H) if direction == "fwd" else (2 if merged else PL.BARRIERS_PER_STEP)
    assert nbar == (PL.BARRIERS_PER_STEP_MERGED if merged else PL.BARRIERS_PER_STEP)
    if direction == "fwd" and H == 768:  # W_hh in 12 chunks of 64 rows (Options.w_chunked), the forward only
        assert pl.resident and pl.w_chunks == 12 and not merged, pl
    ck = _compile_ln_sm90(direction, pl, B, H, st, merged)
    ptx = ck.asm["ptx"]
    assert ".target sm_90" in ptx
    assert re.search(r"(red|atom)\.global\.gpu\.release\.add", ptx), "no release add at GPU scope"
    assert re.search(r"(ld|atom)\.global\.gpu\.acquire", ptx), "no acquire read at GPU scope"
    # one predicated release add per barrier of a step (nbar), no other release
    adds = re.findall(r"@%p\d+ (?:red|atom)\.global\.gpu\.release\.add", ptx)
    assert len(adds) == nbar == len(re.findall(r"\.global\.gpu\.release", ptx)), adds
    assert "mma" in ptx  # the recurrent matmul on tensor cores
    use = res_usage(ck)
    print(f"\nLN {direction} B{B} H{H} hs/dG={st} barriers/step={nbar}: P={pl.programs} BLOCK_H={pl.BLOCK_H} "
          f"BLOCK_K={pl.BLOCK_K} resident={pl.resident} num_warps={pl.num_warps}: regs={use['REG']} "
          f"stack={use['STACK']} B shared={ck.metadata.shared} B")
    key = (direction + ("-2bar" if direction == "bwd" and merged else ""), B, H, st)
    assert use["STACK"] <= SM90_SPILL_ALLOWED.get(key, 0), "register spills"


# The LL exchange (Options.ll_sync) where plan_ln takes it (ln_ll_fits: BLOCK_B 16; the forward
# with a whole resident W_hh tile; 16-bit): S1 both ways, S4's backward, B16 H128, bf16 (hs, dG
# bf16); not S2, nor S4's forward, nor fp32 (they spilled: ln_ll_fits).
# No barrier (no release, no acquire, no fence), the partials as 64-bit tagged words (relaxed
# exchanges, volatile loads), and no spill.
SM90_LL_CASES = [(d, 16, H, "bf16") for H in (256, 128) for d in ("fwd", "bwd")] + [("bwd", 16, 768, "bf16")]


@requires_sm90_compile
@pytest.mark.parametrize("direction,B,H,dt", SM90_LL_CASES,
                         ids=[f"{d}-B{B}-H{H}-{dt}" for d, B, H, dt in SM90_LL_CASES])
def test_ln_ll_kernels_compile_for_sm90(use_options, direction, B, H, dt):
    from fused_rnn.kernels import ln_lstm_persistent as PL, tiles

    use_options(ll_sync=True)
    pl, why = tiles.plan_ln(direction, B, H, {"bf16": BF16, "fp32": F32}[dt], torch.device("cuda", 0), limit=132,
                         allow_tf32=True)
    assert pl is not None, why
    assert pl.ll and not pl.early and PL.fwd_barriers_per_step(pl, H) == 0, pl
    ck = _compile_ln_sm90(direction, pl, B, H, dt, False, dt)
    ptx = ck.asm["ptx"]
    assert ".target sm_90" in ptx and "mma" in ptx
    assert not re.search(r"\.(release|acquire)|membar|fence", ptx), "a fence or an ordered atomic with LL"
    assert re.search(r"atom\.global\.(relaxed\.)?gpu\.(relaxed\.)?exch\.b64", ptx), "no 64-bit word published"
    assert re.search(r"ld\.volatile\.global", ptx), "no volatile read of the words"
    use = res_usage(ck)
    print(f"\nLN LL {direction} B{B} H{H} {dt}: P={pl.programs} BLOCK_H={pl.BLOCK_H} BLOCK_K={pl.BLOCK_K} "
          f"resident={pl.resident} num_warps={pl.num_warps}: regs={use['REG']} stack={use['STACK']} B "
          f"shared={ck.metadata.shared} B")
    assert use["STACK"] == 0, "register spills"
