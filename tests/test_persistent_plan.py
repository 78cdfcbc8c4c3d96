"""The persistent path's decisions: plan() and plan_ln() (kernels/persistent.py: block sizes,
grid, the deadlock guard, the variants' rules; planned for an H100 with a fake SM count, no GPU
needed) and the path choice (fused_rnn._paths: the requested path, the policy, adaptive)."""
import warnings

import pytest
import torch

from _persistent_helpers import _poison_and_fresh_warnings, use_options  # noqa: F401 (fixtures)
from conftest import BF16, F32, F64
from fused_rnn import _paths


# ------------------------------------------------------------------ the decision (no kernels run)
def _plan(*a, **k):
    pytest.importorskip("triton")
    from fused_rnn.kernels import tiles

    return tiles.plan(*a, **k)


def test_plan_grid_fits_the_sms():
    """On CUDA the grid is at most one program per SM (a fake SM count here): BLOCK_H grows until
    it fits, and no plan when even the largest block does not."""
    cuda = torch.device("cuda", 0)
    pl, _ = _plan("lstm", "fwd", 16, 256, BF16, cuda, limit=132)
    assert (pl.programs, pl.BLOCK_H, pl.BLOCK_B) == (16, 16, 16) and pl.resident
    pl, _ = _plan("lstm", "fwd", 16, 256, BF16, cuda, limit=8)
    assert (pl.programs, pl.BLOCK_H) == (8, 32)
    pl, why = _plan("lstm", "fwd", 16, 256, BF16, cuda, limit=3)
    assert pl is None and "more than 3 programs" in why
    pl, _ = _plan("rnn", "bwd", 65, 64, BF16, cuda, limit=132)  # 2 row blocks x 4 programs
    assert (pl.row_blocks, pl.BLOCK_B, pl.programs, pl.total) == (2, 64, 4, 8)
    pl, _ = _plan("lstm", "fwd", 256, 1024, BF16, cuda, limit=132)  # S3: 4 x 64 > 132; 4 x 32 fits
    assert (pl.row_blocks, pl.BLOCK_H, pl.programs, pl.total) == (4, 32, 32, 128) and not pl.resident
    pl, why = _plan("rnn", "fwd", 64 * 133, 16, BF16, cuda, limit=132)  # one program per row block
    assert pl is None and "133 row blocks" in why
    pl, _ = _plan("lstm", "fwd", 64, 512, BF16, cuda, limit=132)  # S2: W slice 64 KiB, resident
    assert pl.resident and pl.programs == 32
    pl, _ = _plan("lstm", "bwd", 64, 512, BF16, cuda, limit=132)  # 4 x 64 x 512 row elements: streamed
    assert not pl.resident and pl.BLOCK_K == 64
    pl, _ = _plan("lstm", "fwd", 16, 768, BF16, cuda, limit=132)  # S4: K_pad 1024 > 512: chunks of W_hh
    assert pl.resident and (pl.BLOCK_K, pl.w_chunks) == (64, 12)
    pl, _ = _plan("lstm", "fwd", 16, 256, F32, cuda, limit=132)  # fp32 without TF32: FMA dots
    assert not pl.resident
    pl, _ = _plan("lstm", "fwd", 16, 256, F32, cuda, limit=132, allow_tf32=True)
    assert pl.resident
    pl, _ = _plan("lstm", "fwd", 16, 256, F64, cuda, limit=132)
    assert not pl.resident and pl.BLOCK_K == 8


def test_plan_override_for_the_tuner():
    """Options.plan_block_h / plan_num_warps (bench/persistent_tune.py's variants) set BLOCK_H and
    num_warps on CUDA, keep the deadlock guard, and leave the interpreter's one-program plan alone."""
    from fused_rnn.kernels import config

    cuda = torch.device("cuda", 0)
    with config.using(plan_block_h=64, plan_num_warps=8):
        pl, _ = _plan("lstm", "fwd", 16, 256, BF16, cuda, limit=132)
        assert (pl.programs, pl.BLOCK_H, pl.num_warps) == (4, 64, 8)
        pl, why = _plan("lstm", "fwd", 256, 1024, BF16, cuda, limit=132)  # 4 x 16 = 64 programs fit
        assert (pl.programs, pl.row_blocks, pl.BLOCK_H) == (16, 4, 64)
    with config.using(plan_block_h=16):
        pl, why = _plan("lstm", "fwd", 256, 1024, BF16, cuda, limit=132)  # 4 x 64 > 132: no plan
        assert pl is None and "BLOCK_H=16" in why
        pl, _ = _plan("lstm", "fwd", 5, 37, F32, "cpu")
        assert pl.programs == 1 and pl.BLOCK_H >= 37


def test_plan_chunk_resident_rules():
    """Where the whole-tile resident path is over its limits, plan() keeps W_hh on chip in
    CHUNK_K-row tiles (w_chunks per gate) if the slice fits CHUNKED_W_MAX_BYTES and a step's rows
    CHUNKED_ROW_MAX_ELEMS; never on the CPU, with chunks=False (the LN backward, a MERGE_C LN
    forward), without tensor cores, or where the LL exchange's words would not fit; Options.w_chunked =
    False (the tuner's variant) gives the streamed plan."""
    from fused_rnn.kernels import config

    cuda = torch.device("cuda", 0)

    def chunks(*a, **k):
        pl, _ = _plan(*a, **k)
        return pl.w_chunks if pl.resident else 0

    for cell in ("lstm", "rnn"):  # S4, both directions: 768 = 12 x 64, 96 KiB (LSTM) of W_hh
        assert chunks(cell, "fwd", 16, 768, BF16, cuda, limit=132) == 12
        assert chunks(cell, "bwd", 16, 768, BF16, cuda, limit=132) == 12
        assert chunks(cell, "fwd", 16, 768, BF16, cuda, limit=132, variants=False) == 12  # (no LL, no solo)
        assert chunks(cell, "fwd", 16, 768, BF16, cuda, limit=132, chunks=False) == 0
        assert chunks(cell, "fwd", 16, 768, F32, cuda, limit=132) == 0  # fp32 IEEE: FMA dots, streamed
    assert chunks("rnn", "fwd", 16, 768, F32, cuda, limit=132, allow_tf32=True) == 12  # 48 KiB
    assert chunks("lstm", "fwd", 16, 768, F32, cuda, limit=132, allow_tf32=True) == 0  # 192 KiB
    assert chunks("lstm", "bwd", 64, 512, BF16, cuda, limit=132) == 0  # 4 x 64 x 512 row elements
    assert chunks("lstm", "fwd", 32, 768, BF16, cuda, limit=132) == 12  # 32 x 768 row elements
    assert chunks("lstm", "bwd", 32, 768, BF16, cuda, limit=132) == 0  # 4 x 32 x 768
    assert chunks("lstm", "fwd", 256, 1024, BF16, cuda, limit=132) == 0  # S3: 4 x 1024 x 32 x 2 B = 256 KiB
    assert chunks("lstm", "fwd", 16, 256, BF16, cuda, limit=132) == 1  # S1: the whole tile
    assert chunks("lstm", "fwd", 16, 768, BF16, "cpu") == 0  # the interpreter's one program: streamed
    with config.using(ll_sync=True):  # the LSTM backward's 48K words: LL, W_hh streamed
        pl, _ = _plan("lstm", "bwd", 16, 768, BF16, cuda, limit=132)
        assert pl.ll and not pl.resident
        pl, _ = _plan("lstm", "fwd", 16, 768, BF16, cuda, limit=132)
        assert pl.ll and pl.w_chunks == 12
    with config.using(w_chunked=False):
        assert chunks("lstm", "fwd", 16, 768, BF16, cuda, limit=132) == 0
        assert chunks("rnn", "bwd", 16, 768, BF16, cuda, limit=132) == 0


def test_plan_early_arrive():
    """Barrier plans arrive early (Options.early_arrive) except the LSTM backward's S3-sized tiles
    (a spill there); LL and solo plans have no barrier; early_arrive = False (the tuner's variant)
    gives the former order."""
    from fused_rnn.kernels import config

    cuda = torch.device("cuda", 0)
    for cell in ("lstm", "rnn"):
        for direction in ("fwd", "bwd"):
            for B, H in ((16, 256), (64, 512), (16, 768), (256, 1024)):
                pl, _ = _plan(cell, direction, B, H, BF16, cuda, limit=132)
                assert pl.early == (not (cell == "lstm" and direction == "bwd" and B == 256)), pl
    assert _plan("rnn", "fwd", 5, 37, F32, "cpu")[0].early
    with config.using(ll_sync=True):
        pl, _ = _plan("lstm", "fwd", 16, 256, BF16, cuda, limit=132)
        assert pl.ll and not pl.early
    with config.using(early_arrive=False):
        assert not _plan("lstm", "fwd", 16, 256, BF16, cuda, limit=132)[0].early
        assert not _plan("rnn", "bwd", 16, 256, BF16, cuda, limit=132)[0].early


def test_plan_cpu_is_one_program():
    """Under the interpreter programs run one after another: one program covering all of H per
    row block (row blocks never wait for each other)."""
    for H in (7, 37, 300):
        pl, _ = _plan("lstm", "bwd", 5, H, F32, "cpu")
        assert pl.programs == 1 and pl.BLOCK_H >= H and pl.BLOCK_B >= 5 and pl.row_blocks == 1
    pl, _ = _plan("lstm", "fwd", 200, 37, F32, "cpu")
    assert (pl.programs, pl.row_blocks, pl.BLOCK_B) == (1, 4, 64)
    pl, why = _plan("lstm", "fwd", 5, 37, F32, "cpu", limit=0)
    assert pl is None and "co-resident" in why


def test_plan_ln_and_unfused():
    """The layer-norm LSTM plans its own persistent kernels (fused or not: that flag picks between
    step kernels); an explicit request for the unfused plain step kernels keeps the step path."""
    pytest.importorskip("triton")
    from fused_rnn.kernels import lstm as KL, rnn as KR

    ln = (torch.ones(20), torch.zeros(20), torch.ones(5), torch.zeros(5))
    assert KL.persistent_plan("fwd", 2, 5, ln, True, F32, "cpu")[0] is not None
    assert KL.persistent_plan("bwd", 2, 5, ln, False, F32, "cpu")[0] is not None
    assert KL.persistent_plan("fwd", 2, 5, None, False, F32, "cpu")[0] is None
    assert KL.persistent_plan("fwd", 2, 5, None, True, F32, "cpu")[0] is not None
    assert KR.persistent_plan("bwd", 2, 5, False, F32, "cpu")[0] is None
    with pytest.raises(TypeError, match="path"):  # the launchers take a resolved plan, never a path
        KL.lstm_fwd(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(4, 1),
                    torch.zeros(4, 1), path="graph")


# ---------------------------------------------------------------- the plan (no kernels run)
def test_plan_ln():
    pytest.importorskip("triton")
    from fused_rnn.kernels import tiles

    cuda = torch.device("cuda", 0)
    pl, _ = tiles.plan_ln("fwd", 16, 256, BF16, cuda, limit=132)
    assert (pl.programs, pl.BLOCK_H, pl.BLOCK_B, pl.row_blocks) == (16, 16, 16, 1) and pl.resident
    pl, _ = tiles.plan_ln("bwd", 16, 256, BF16, cuda, limit=132)
    assert pl.resident and pl.num_warps == 4  # 8 warps spilled (sm_90 compile; see _ln_num_warps)
    pl, _ = tiles.plan_ln("bwd", 64, 64, BF16, cuda, limit=132)
    assert pl.resident and pl.num_warps == 8  # 4 warps spilled there
    pl, _ = tiles.plan_ln("fwd", 64, 512, BF16, cuda, limit=132)
    assert (pl.programs, pl.BLOCK_H) == (32, 16) and pl.resident
    pl, _ = tiles.plan_ln("fwd", 16, 768, BF16, cuda, limit=132)  # W_hh in 12 chunks; the backward streams it
    assert pl.programs == 48 and pl.resident and pl.w_chunks == 12
    pl, _ = tiles.plan_ln("bwd", 16, 768, BF16, cuda, limit=132)
    assert pl.programs == 48 and not pl.resident and pl.w_chunks == 1
    # the partial tile: at most PART_TILE_MAX_ELEMS / BLOCK_B programs per row block
    pl, _ = tiles.plan_ln("fwd", 64, 2048, BF16, cuda, limit=132)
    assert pl.programs * pl.BLOCK_H >= 2048 and tiles.block_p(pl.programs) * 64 <= tiles.PART_TILE_MAX_ELEMS
    pl, why = tiles.plan_ln("fwd", 64, 4096, BF16, cuda, limit=132)
    assert pl is None and "at most 32 programs per row block" in why
    pl, why = tiles.plan_ln("fwd", 16, 256, BF16, cuda, limit=3)
    assert pl is None and "more than 3 programs" in why
    for H in (5, 37, 300):
        pl, _ = tiles.plan_ln("bwd", 5, H, F32, "cpu")
        assert pl.programs == 1 and pl.BLOCK_H >= H
    pl, _ = tiles.plan_ln("fwd", 70, 20, F32, "cpu")
    assert pl.row_blocks == 2 and pl.BLOCK_B == 64


def test_plan_ln_fwd_variant():
    """The forward's MERGE_C rule (BLOCK_B x K_pad <= MERGE_C_MAX_ROW_ELEMS) and its num_warps (8:
    the sm_90 compiles spilled at 4, see _ln_num_warps), and Options.merge_c."""
    pytest.importorskip("triton")
    from fused_rnn.kernels import config, ln_lstm_persistent as PL, tiles

    cuda = torch.device("cuda", 0)
    for B, H, merged in ((16, 256, True), (16, 128, True), (64, 64, True), (5, 37, True), (32, 256, False),
                         (16, 512, False), (16, 768, False), (64, 512, False)):
        pl, _ = tiles.plan_ln("fwd", B, H, BF16, cuda, limit=132)
        assert tiles.fwd_merge_c(pl, H) == merged, (B, H)
        assert PL.fwd_barriers_per_step(pl, H) == (2 if merged else 3)
        if merged:
            assert pl.num_warps == 8
    pl, _ = tiles.plan_ln("fwd", 16, 768, BF16, cuda, limit=132)
    assert pl.w_chunks == 12 and pl.num_warps == 8
    with config.using(merge_c=True):  # a forced MERGE_C: whole tiles or streamed, no chunks
        pl, _ = tiles.plan_ln("fwd", 16, 768, BF16, cuda, limit=132)
        assert pl.w_chunks == 1 and not pl.resident
    pl, _ = tiles.plan_ln("fwd", 16, 256, F32, cuda, limit=132)  # fp32 without TF32: streamed W_hh
    assert not pl.resident and tiles.fwd_merge_c(pl, 256)
    pl, _ = tiles.plan_ln("fwd", 70, 20, F32, "cpu")  # the interpreter: one program of K_pad columns
    assert tiles.fwd_merge_c(pl, 20)
    with config.using(merge_c=False):
        pl, _ = tiles.plan_ln("fwd", 64, 64, BF16, cuda, limit=132)
        assert not tiles.fwd_merge_c(pl, 64) and pl.num_warps == 4  # the plain plan's
    with config.using(merge_c=True):
        assert tiles.fwd_merge_c(tiles.plan_ln("fwd", 64, 512, BF16, cuda, limit=132)[0], 512)


def test_sync_counter_overflow_guard():
    pytest.importorskip("triton")
    from fused_rnn.kernels import ln_lstm_persistent as PL, tiles

    pl, _ = tiles.plan_ln("fwd", 16, 256, BF16, torch.device("cuda", 0), limit=132)
    with pytest.raises(ValueError, match="overflows the int32 barrier counter"):
        PL._ln_sync_counter(2 ** 31 // (3 * pl.programs) + 1, pl, "cpu")
    assert PL._ln_sync_counter(1000, pl, "cpu").tolist() == [0]
    # MERGE_C: 2 barriers a step
    T2 = 2 ** 31 // (3 * pl.programs) + 1  # too many steps at 3 barriers, not at 2
    assert PL._ln_sync_counter(T2, pl, "cpu", 2).tolist() == [0]
    with pytest.raises(ValueError, match="overflows the int32 barrier counter"):
        PL._ln_sync_counter(2 ** 31 // (2 * pl.programs) + 1, pl, "cpu", 2)


def test_plan_ln_ll_rule(use_options):
    """plan_ln takes the LL exchange only where ln_ll_fits says (its sm_90 compiles), and the
    barrier plan, with its own num_warps and early arrival, elsewhere."""
    from fused_rnn.kernels import ln_lstm_persistent as PL, tiles

    cuda = torch.device("cuda", 0)
    barrier = {(d, B, H): tiles.plan_ln(d, B, H, BF16, cuda, limit=132)[0]
               for d in ("fwd", "bwd") for B, H in ((16, 256), (16, 768), (64, 512), (64, 64))}
    use_options(ll_sync=True)
    for (d, B, H), plain in barrier.items():
        pl = tiles.plan_ln(d, B, H, BF16, cuda, limit=132)[0]
        want = B == 16 and (d == "bwd" or H == 256)
        assert pl.ll == want, (d, B, H, pl)
        if want:
            assert not pl.early and pl.num_warps == 8 and PL.fwd_barriers_per_step(pl, H) == 0
        else:
            assert pl == plain, (d, B, H)
    assert not tiles.plan_ln("bwd", 16, 768, F32, cuda, limit=132, allow_tf32=True)[0].ll  # (64-bit words)
    assert not tiles.plan_ln("fwd", 16, 256, torch.float64, cuda, limit=132)[0].ll  # no 128-bit word
    cpu = tiles.plan_ln("fwd", 3, 37, F32, "cpu")[0]  # the interpreter's one program per row block
    assert cpu.ll and cpu.programs == 1


def test_requested_path(monkeypatch):
    assert _paths.requested() == "auto"
    assert _paths.requested("step") == "step"
    monkeypatch.setenv(_paths.ENV_VAR, "Persistent")
    assert _paths.requested() == "persistent"
    assert _paths.requested("graph") == "graph"  # an explicit argument beats the environment
    with _paths.use_path("graph"):
        assert _paths.requested() == "graph"
        with _paths.use_path("step"):
            assert _paths.requested() == "step"
        assert _paths.requested() == "graph"
    assert _paths.requested() == "persistent"
    monkeypatch.setenv(_paths.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=_paths.ENV_VAR):
        _paths.requested()
    with pytest.raises(ValueError):
        with _paths.use_path("fastest"):
            pass


def test_resolve_policy():
    x = torch.zeros(2, 2, 2)
    assert _paths.resolve("op", "auto", x, lambda: (object(), ""))[0] == _paths.AUTO_PATH
    plan = object()
    assert _paths.resolve("op", "persistent", x, lambda: (plan, "")) == ("persistent", plan)
    with pytest.warns(RuntimeWarning, match=r"persistent path not possible for op \(no room\)"):
        assert _paths.resolve("op", "persistent", x, lambda: (None, "no room")) == ("step", None)
    with warnings.catch_warnings():  # once per reason
        warnings.simplefilter("error")
        assert _paths.resolve("op", "persistent", x, lambda: (None, "no room")) == ("step", None)


def test_resolve_adaptive(monkeypatch):
    """"adaptive": on CUDA tensors persistent where the plan fits, else graph where a capture is
    possible, else step, silently; on the CPU the step path (the plan is not even asked for)."""
    def no_call():
        raise AssertionError("adaptive asked the CPU for a persistent plan")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _paths.resolve("op", "adaptive", torch.zeros(2, 2, 2), no_call) == ("step", None)
        x = torch.zeros(2, 2, 2)
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        monkeypatch.setattr(_paths, "interpreter_on", lambda: False)
        monkeypatch.setattr(_paths, "graph_unavailable", lambda x: (None, False))
        assert _paths.resolve("op", "adaptive", x, lambda: (object(), ""))[0] == "persistent"
        assert _paths.resolve("op", "adaptive", x, lambda: (None, "no room")) == ("graph", None)
        monkeypatch.setattr(_paths, "graph_unavailable", lambda x: ("capturing", False))
        assert _paths.resolve("op", "adaptive", x, lambda: (None, "no room")) == ("step", None)
        monkeypatch.setattr(_paths, "AUTO_PATH", "adaptive")
        assert _paths.resolve("op", "auto", x, lambda: (object(), ""))[0] == "persistent"
