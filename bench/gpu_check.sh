#!/usr/bin/env bash
# One GPU session's checks, in one command, in under 4 minutes, with no network:
#
#   bash bench/gpu_check.sh            (from the repo root; results in $OUT, else ./gpu_check_out)
#
# Stages, each under `timeout`; a failed or timed-out stage is recorded and the next one runs:
#   setup     versions of python / torch / triton / CUDA / cuDNN, nvidia-smi, nvcc, compute-sanitizer
#   install   the project from this working tree, offline (already importable from here: kept;
#             else pip install -e . --no-deps --no-index --no-build-isolation; else a
#             sitecustomize shim on PYTHONPATH that maps fused_rnn.kernels to kernels/)
#   smoke     bench/persistent_smoke.py: the persistent kernels' first run, B16 T64 H256, against
#             the step path, under a short timeout. Their programs wait for each other at a grid
#             barrier each step; if that hangs or is wrong on the hardware, the later stages leave
#             the persistent path out (bench --paths, pytest --ignore, memcheck --exclude), so one
#             hang cannot eat the budget of every stage after it.
#   smoke_ll  bench/persistent_smoke.py --ll: the same with the LL exchange (tagged words instead of
#             the barrier, kernels.config Options.ll_sync; never run on a GPU before), LSTM, RNN and
#             LN-LSTM (bf16), timed against the barrier kernels; then the CUDA LL tests (pytest -k
#             cuda_ll_exchange: several row blocks, streamed W_hh, fp32 words, the LN-LSTM's LL
#             kernels), which the pytest
#             stage leaves out, so that an LL hang costs this stage only; if it fails or hangs,
#             the LL variants are left out of memcheck (--exclude) and the tune stage (--no-ll)
#   bench     python -m fused_rnn.bench --quick --dtypes bf16 --paths persistent,graph,triton
#             (table, targets, JSON, plot; cuDNN runs bf16 and its fp16 baseline; bf16 alone is
#             enough for every target's "ours", and halves the cases in a tight budget); first
#             of the long stages: the speed issue needs its numbers most
#   pytest    the whole test suite on CUDA (TRITON_INTERPRET unset): python -m pytest --maxfail=10,
#             the GPU-only files first, on the cores less 4 (compile-bound: see the stage)
#   memcheck  compute-sanitizer --tool memcheck over bench/memcheck_cases.py (every kernel,
#             fwd+bwd, small odd shapes, variable lengths); passes only on "ERROR SUMMARY: 0 errors"
#   demo      fused-rnn demo --quick --steps 100 on CUDA: fused_rnn.LSTM vs torch.nn.LSTM tokens/s
#   check     fused-rnn check --quick --paths auto,persistent,graph on CUDA (every kernel against the
#             fp64 reference, fp32/bf16/fp16/fp64), on whatever time is left; log in pytest.txt
#   tune      bench/persistent_tune.py: the persistent kernels' plan variants timed at S1, S2, S4,
#             S3 -> tune.md, first the structural ones (LL exchange or barrier, solo plans, W_hh
#             chunk-resident or streamed, the barrier's early or late arrival, the LN barrier
#             counts) at every shape, then BLOCK_H x warps; only on the
#             time left of TOTAL_S (at the default 240 s there is none: TOTAL_S=420 runs it)
#
# Files in $OUT (8, the most the device tool brings back): summary.txt, setup.txt, pytest.txt,
# memcheck.txt, bench_log.txt (smoke, bench, demo and tune logs), bench.md, bench.json, tune.md.
# No bench.png: render it where the files land, `fused-rnn bench --render bench.json --out DIR`.
# Exit status: 0 every stage ran and passed; 1 a stage failed or timed out; 3 no CUDA GPU (the
# CPU parts ran: pytest on the CPU, the bench's CPU mode; memcheck skipped).
#
# Knobs (environment): PYTHON (default python3), TOTAL_S (whole budget, default 240),
# T_INSTALL / T_SMOKE / T_SMOKE_LL / T_BENCH / T_PYTEST / T_MEMCHECK / T_DEMO / T_CHECK / T_TUNE (per-stage limits, seconds), PYTEST_WORKERS
# (pytest-xdist workers when installed, default auto: the cores less 4, at least 4; 0 = none), BENCH_ARGS (appended to the bench
# command, e.g. BENCH_ARGS="--shapes S3,S4 --cells lstm" for a second, focused run with
# SKIP_STAGES=smoke,smoke_ll,pytest,memcheck,demo,check,tune and a larger T_BENCH), TUNE_ARGS
# (appended to the tune command: TUNE_ARGS=--step times the step path's tiles instead of the
# persistent plans, graph-replayed, S3 and S2 first), SKIP_STAGES (comma list, e.g.
# "install,pytest", to skip stages while testing this script), FORCE_SHIM=1 (skip pip, test the
# shim).
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)

TOTAL_S=${TOTAL_S:-240}
T_INSTALL=${T_INSTALL:-30}
T_SMOKE=${T_SMOKE:-40}
T_SMOKE_LL=${T_SMOKE_LL:-90}
T_BENCH=${T_BENCH:-70}
T_PYTEST=${T_PYTEST:-60}
T_MEMCHECK=${T_MEMCHECK:-40}
T_DEMO=${T_DEMO:-20}
T_CHECK=${T_CHECK:-60}
T_TUNE=${T_TUNE:-200}
PYTEST_WORKERS=${PYTEST_WORKERS:-auto}
BENCH_ARGS=${BENCH_ARGS:-}
TUNE_ARGS=${TUNE_ARGS:-}
SKIP_STAGES=${SKIP_STAGES:-}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

T0=$(date +%s)
DEADLINE=$((T0 + TOTAL_S))
SUMMARY=$OUT/summary.txt
SETUP=$OUT/setup.txt
: >"$SUMMARY"
: >"$SETUP"
FAILED=0

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python; fi

say() { echo "$*"; echo "$*" >>"$SUMMARY"; }

# record NAME RC SECONDS STATUS [NOTE]
record() {
    printf '%-9s %-8s rc=%-4s %4ss  %s\n' "$1" "$4" "$2" "$3" "${5:-}" | tee -a "$SUMMARY"
    case "$4" in ok|skipped) ;; *) FAILED=1 ;; esac
}

skipped() { case ",$SKIP_STAGES," in *",$1,"*) return 0 ;; esac; return 1; }

# stage NAME LIMIT LOG CMD...: runs CMD under timeout (limit cut to the time left), sets RC, DUR.
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((DEADLINE - $(date +%s) - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    RC=0 DUR=0
    if [ "$limit" -lt 5 ]; then
        RC=-1
        echo "== $name: no time left in the ${TOTAL_S} s budget" | tee -a "$log"
        return
    fi
    echo "== $name (limit ${limit} s): ${DESC:-$*}" | tee -a "$log"
    DESC=
    local s=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    RC=$?
    DUR=$(($(date +%s) - s))
    echo "== $name: rc=$RC after ${DUR} s" >>"$log"
    tail -n 4 "$log" | sed 's/^/   | /'
}

status_of() {  # RC -> ok / FAIL / TIMEOUT / NO-TIME
    case "$1" in
        0) echo ok ;; 124|137) echo TIMEOUT ;; -1) echo NO-TIME ;; *) echo FAIL ;;
    esac
}

# ------------------------------------------------------------------------------------ setup
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(uname -srm)"
    echo "repo: $REPO  python: $(command -v "$PY")"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader 2>&1
    command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -n 2
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null \
        || ls "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" 2>/dev/null)
    [ -n "$SAN" ] && echo "compute-sanitizer: $SAN ($("$SAN" --version 2>&1 | tail -n 1))"
    timeout 60 "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available:",
      torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(), "| cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
for mod in ("matplotlib", "xdist", "setuptools", "numpy"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception:
        print(mod, "missing")
EOF
} >>"$SETUP" 2>&1
cat "$SETUP"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null \
    || ls "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" 2>/dev/null || true)
HAS_GPU=$(timeout 60 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
if [ "$HAS_GPU" != "1" ]; then
    HAS_GPU=0
    say "NO CUDA GPU on this machine: the CUDA stages cannot run; pytest runs on the CPU, the"
    say "bench runs its CPU mode, memcheck is skipped. This is NOT a GPU check."
fi

# ---------------------------------------------------------------------------------- install
install_project() {
    [ "${FORCE_SHIM:-0}" = 1 ] && { echo "FORCE_SHIM=1: no pip (tests the shim)"; return 1; }
    # Already importable from this tree (an editable install of this checkout, or a rerun)?
    if "$PY" -c "import fused_rnn, fused_rnn.kernels, os, sys
sys.exit(0 if os.path.realpath(fused_rnn.__file__).startswith(os.path.realpath('$REPO') + '/') else 1)" \
        2>/dev/null; then
        echo "fused_rnn already imports from $REPO: nothing to install"
        return 0
    fi
    # Editable only: a plain install would be shadowed by the tree's fused_rnn/ whenever Python
    # runs from the repo root (which lacks fused_rnn/kernels), so it is no fallback.
    "$PY" -m pip install --no-deps --no-index --no-build-isolation -e . && return 0
    echo "editable install failed; last resort: the sitecustomize shim"
    return 1
}
if skipped install; then
    record install 0 0 skipped "SKIP_STAGES"
else
    DESC="install_project (see this script)" stage install "$T_INSTALL" "$SETUP" bash -c "$(declare -f install_project); PY='$PY' REPO='$REPO' FORCE_SHIM='${FORCE_SHIM:-0}' install_project"
    if [ "$RC" -ne 0 ] && [ "$RC" -ne -1 ]; then
        # Last resort, no pip: fused_rnn imports from the tree (the repo root is on sys.path for
        # python -m / -c and pytest); a sitecustomize on PYTHONPATH maps fused_rnn.kernels to
        # kernels/, as the install's package-dir does. (It shadows any other sitecustomize.)
        SHIM=$(mktemp -d)
        cat >"$SHIM/sitecustomize.py" <<EOF
import importlib.abc, importlib.util, sys
_KDIR = "$REPO/kernels"
class _FusedRnnKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "fused_rnn.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, _KDIR + "/__init__.py", submodule_search_locations=[_KDIR])
sys.meta_path.insert(0, _FusedRnnKernels())
EOF
        export PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        echo "install: pip failed; using the sitecustomize shim in $SHIM" >>"$SETUP"
    fi
    WHERE=$("$PY" -c "import fused_rnn, fused_rnn.kernels; print(fused_rnn.__file__, fused_rnn.__version__)" 2>&1)
    IRC=$?
    echo "import check: $WHERE" >>"$SETUP"
    if [ $IRC -eq 0 ]; then
        NOTE="fused_rnn: $WHERE"
        [ "$RC" -ne 0 ] && NOTE="pip failed (rc=$RC), imports through the sitecustomize shim: $WHERE"
        record install "$RC" "$DUR" ok "$NOTE"
    else
        record install "$RC" "$DUR" FAIL "fused_rnn does not import: $(echo "$WHERE" | tail -n 1)"
    fi
fi

# ------------------------------------------------------------------------------------ smoke
PERSISTENT_OK=1
if skipped smoke; then
    record smoke 0 0 skipped "SKIP_STAGES"
elif [ "$HAS_GPU" != "1" ]; then
    record smoke 0 0 skipped "no CUDA GPU"
else
    : >"$OUT/bench_log.txt"
    stage smoke "$T_SMOKE" "$OUT/bench_log.txt" env -u TRITON_INTERPRET "$PY" bench/persistent_smoke.py
    ST=$(status_of "$RC")
    if [ "$RC" -ne 0 ]; then
        PERSISTENT_OK=0
        ST="$ST (persistent path left out of bench, pytest and memcheck)"
    fi
    record smoke "$RC" "$DUR" "$ST" "$(grep -E '^persistent_smoke: (all ok|FAILED)' "$OUT/bench_log.txt" | tail -n 1)"
    grep -E '^  [a-z]+ [a-z0-9]+: (ok|FAIL)|fwd\+bwd median' "$OUT/bench_log.txt" >>"$SUMMARY"
fi

# --------------------------------------------------------------------------------- smoke_ll
LL_OK=1
if skipped smoke_ll; then
    record smoke_ll 0 0 skipped "SKIP_STAGES"
elif [ "$HAS_GPU" != "1" ]; then
    record smoke_ll 0 0 skipped "no CUDA GPU"
elif [ "$PERSISTENT_OK" != 1 ]; then
    LL_OK=0
    record smoke_ll 0 0 skipped "the persistent smoke test failed"
else
    DESC="persistent_smoke.py --ll && pytest -k cuda_ll_exchange" stage smoke_ll "$T_SMOKE_LL" \
        "$OUT/bench_log.txt" env -u TRITON_INTERPRET PY="$PY" bash -c \
        '"$PY" bench/persistent_smoke.py --ll && "$PY" -m pytest -q -x -p no:cacheprovider tests/test_lstm_rnn_persistent.py tests/test_ln_lstm_persistent.py -k cuda_ll_exchange'
    ST=$(status_of "$RC")
    if [ "$RC" -ne 0 ]; then
        LL_OK=0
        ST="$ST (LL variants left out of memcheck and tune)"
    fi
    record smoke_ll "$RC" "$DUR" "$ST" "$(grep -E '^persistent_smoke --ll: (all ok|FAILED)' "$OUT/bench_log.txt" | tail -n 1); CUDA LL tests: $(grep -E '[0-9]+ (passed|failed)' "$OUT/bench_log.txt" | tail -n 1)"
    grep -E 'persistent LL .* ms, persistent barrier' "$OUT/bench_log.txt" >>"$SUMMARY"
fi

# ------------------------------------------------------------------------------------ bench
if skipped bench; then
    record bench 0 0 skipped "SKIP_STAGES"
else
    [ -f "$OUT/bench_log.txt" ] || : >"$OUT/bench_log.txt"
    BPATHS=persistent,graph,triton
    [ "$PERSISTENT_OK" = 1 ] || BPATHS=graph,triton
    LEFT=$((DEADLINE - $(date +%s) - 5))
    [ "$LEFT" -gt "$T_BENCH" ] && LEFT=$T_BENCH
    TL=$((LEFT - 15))  # the bench stops starting measurements here and still writes its table
    [ "$TL" -lt 5 ] && TL=5
    stage bench "$T_BENCH" "$OUT/bench_log.txt" env -u TRITON_INTERPRET "$PY" -m fused_rnn.bench \
        --quick --dtypes bf16 --paths "$BPATHS" --out "$OUT" --time-limit "$TL" --no-plot $BENCH_ARGS
    NT=$(grep -cE '^  - (PASS|MISS)' "$OUT/bench.md" 2>/dev/null)
    NP=$(grep -cE '^  - PASS' "$OUT/bench.md" 2>/dev/null)
    record bench "$RC" "$DUR" "$(status_of "$RC")" "targets: ${NP:-0}/${NT:-0} pass (bench.md)"
fi

# ----------------------------------------------------------------------------------- pytest
# The CUDA lane is compile-bound: the interpreter lane launches ~1,000 distinct kernel
# specialisations (counted in session 9), and a fresh machine has none of them in Triton's cache.
# So it runs on most of the cores, and its files go in the order the GPU needs them most (the
# graph path and the multi-program persistent kernels run nowhere else; the compiled activations'
# precision and NaN padding on the persistent paths are GPU answers too), then every other file:
# a run cut off at T_PYTEST has covered those first (xdist hands tests out in collection order).
PYTEST_FILES=()
add_test_file() {
    case " ${PYTEST_FILES[*]} " in *" $1 "*) return;; esac
    case "$1" in tests/test_lstm_rnn_persistent.py|tests/test_ln_lstm_persistent.py) [ "$PERSISTENT_OK" = 1 ] || return;; esac
    [ -f "$1" ] && PYTEST_FILES+=("$1")
}
for f in graphs lstm_rnn_persistent ln_lstm_persistent activations padding lstm rnn lstm_proj kernels_safety layers compile; do
    add_test_file "tests/test_$f.py"
done
for f in tests/test_*.py; do add_test_file "$f"; done
PYTEST_ARGS=("${PYTEST_FILES[@]}" --maxfail=10 -q -rfE -p no:cacheprovider --durations=15)
if [ "$PYTEST_WORKERS" = "auto" ]; then
    NCPU=$(nproc 2>/dev/null || echo 8)
    PYTEST_WORKERS=$((NCPU > 8 ? NCPU - 4 : 4))
fi
if [ "$PYTEST_WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST_ARGS+=(-n "$PYTEST_WORKERS")
fi
PYTEST_ARGS+=(-k "not cuda_ll_exchange")  # run by the smoke_ll stage
if skipped pytest; then
    record pytest 0 0 skipped "SKIP_STAGES"
else
    if [ "$HAS_GPU" = "1" ]; then LANE="CUDA lane"; ENVX=(env -u TRITON_INTERPRET)
    else LANE="CPU lane (no GPU), TRITON_INTERPRET=${TRITON_INTERPRET:-unset}"; ENVX=(env); fi
    : >"$OUT/pytest.txt"
    stage pytest "$T_PYTEST" "$OUT/pytest.txt" "${ENVX[@]}" "$PY" -m pytest "${PYTEST_ARGS[@]}"
    LAST=$(grep -E '[0-9]+ (passed|failed|error)|no tests ran' "$OUT/pytest.txt" | tail -n 1)
    [ -z "$LAST" ] && LAST="cut off at $(grep -oE '\[ *[0-9]+%\]' "$OUT/pytest.txt" | tail -n 1)"
    record pytest "$RC" "$DUR" "$(status_of "$RC")" "$LANE: ${LAST:-no pytest summary line}"
fi

# --------------------------------------------------------------------------------- memcheck
if skipped memcheck; then
    record memcheck 0 0 skipped "SKIP_STAGES"
elif [ "$HAS_GPU" != "1" ]; then
    record memcheck 0 0 skipped "no CUDA GPU"
elif [ -z "$SAN" ]; then
    record memcheck 127 0 FAIL "compute-sanitizer not found (PATH, /usr/local/cuda/bin, CUDA_HOME)"
else
    : >"$OUT/memcheck.txt"
    MEMCHECK_EXCLUDE=
    [ "$LL_OK" = 1 ] || MEMCHECK_EXCLUDE=persistent-ll
    [ "$PERSISTENT_OK" = 1 ] || MEMCHECK_EXCLUDE=persistent
    stage memcheck "$T_MEMCHECK" "$OUT/memcheck.txt" env -u TRITON_INTERPRET \
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --target-processes all \
        --print-limit 20 --error-exitcode 99 "$PY" bench/memcheck_cases.py \
        ${MEMCHECK_EXCLUDE:+--exclude "$MEMCHECK_EXCLUDE"}
    SUMLINE=$(grep -E 'ERROR SUMMARY: [0-9]+ error' "$OUT/memcheck.txt" | tail -n 1 | sed 's/^=* *//')
    CASES=$(grep -E '^memcheck_cases: [0-9]+ ok' "$OUT/memcheck.txt" | tail -n 1)
    if [ "$RC" -eq 0 ] && echo "$SUMLINE" | grep -q 'ERROR SUMMARY: 0 errors'; then ST=ok
    elif [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then ST=TIMEOUT
    elif [ "$RC" -eq -1 ]; then ST=NO-TIME
    else ST=FAIL; fi
    record memcheck "$RC" "$DUR" "$ST" "${SUMLINE:-no ERROR SUMMARY line}; ${CASES:-no case summary}"
fi

# ------------------------------------------------------------------------------------- demo
# Issue 5's GPU check: fused_rnn.LSTM against torch.nn.LSTM in a short training run (tokens/s).
# Appended to bench_log.txt (the device tool brings back 8 files at most); runs on what is left.
if skipped demo; then
    record demo 0 0 skipped "SKIP_STAGES"
elif [ "$HAS_GPU" != "1" ]; then
    record demo 0 0 skipped "no CUDA GPU"
else
    stage demo "$T_DEMO" "$OUT/bench_log.txt" env -u TRITON_INTERPRET "$PY" -m fused_rnn demo \
        --quick --steps 100 --device cuda --out "$(mktemp -d)"  # its PNG/JSON would pass the 8 files
    SPEED=$(grep -E '^speed:' "$OUT/bench_log.txt" | tail -n 1)
    record demo "$RC" "$DUR" "$(status_of "$RC")" "${SPEED:-no speed line} (bench_log.txt)"
fi

# ------------------------------------------------------------------------------------ check
# `fused-rnn check` on CUDA (issues 3 and 5 owe it): appended to pytest.txt.
if skipped check; then
    record check 0 0 skipped "SKIP_STAGES"
elif [ "$HAS_GPU" != "1" ]; then
    record check 0 0 skipped "no CUDA GPU"
else
    CPATHS=auto,persistent,graph  # graph last: the first cut if the stage runs out of time
    [ "$PERSISTENT_OK" = 1 ] || CPATHS=auto,graph
    [ -f "$OUT/pytest.txt" ] || : >"$OUT/pytest.txt"
    stage check "$T_CHECK" "$OUT/pytest.txt" env -u TRITON_INTERPRET "$PY" -m fused_rnn check --quick \
        --device cuda --seed 1 --paths "$CPATHS"
    record check "$RC" "$DUR" "$(status_of "$RC")" "$(grep -E '^check: [0-9]+ cases' "$OUT/pytest.txt" | tail -n 1) (pytest.txt)"
fi

# ------------------------------------------------------------------------------------- tune
# Block sizes of the persistent kernels, timed (issue 4: choices with their numbers beside them).
# Its table goes to tune.md (its JSON stays on the machine: 8 files come back at most).
if skipped tune; then
    record tune 0 0 skipped "SKIP_STAGES"
elif [ "$HAS_GPU" != "1" ]; then
    record tune 0 0 skipped "no CUDA GPU"
elif [ "$PERSISTENT_OK" != 1 ] && ! echo " $TUNE_ARGS " | grep -q -- " --step "; then
    record tune 0 0 skipped "the persistent smoke test failed"
elif [ $((DEADLINE - $(date +%s))) -lt 60 ]; then
    record tune 0 0 skipped "under 60 s of the ${TOTAL_S} s budget left (TOTAL_S=420 leaves it ~3 min)"
else
    LEFT=$((DEADLINE - $(date +%s) - 5))
    [ "$LEFT" -gt "$T_TUNE" ] && LEFT=$T_TUNE
    TDIR=$(mktemp -d)
    NOLL=
    [ "$LL_OK" = 1 ] || NOLL=--no-ll
    stage tune "$T_TUNE" "$OUT/bench_log.txt" env -u TRITON_INTERPRET "$PY" bench/persistent_tune.py \
        --out "$TDIR" --budget-s "$((LEFT > 40 ? LEFT - 30 : 10))" $NOLL $TUNE_ARGS
    [ -f "$TDIR/tune.md" ] && cp "$TDIR/tune.md" "$OUT/tune.md"
    record tune "$RC" "$DUR" "$(status_of "$RC")" "$(grep -c '^- ' "$OUT/tune.md" 2>/dev/null || echo 0) best-variant lines (tune.md)"
fi

# ---------------------------------------------------------------------------------- summary
say "total $(($(date +%s) - T0)) s of a ${TOTAL_S} s budget; files in $OUT:"
ls "$OUT" | tr '\n' ' ' | tee -a "$SUMMARY"
echo | tee -a "$SUMMARY"
if [ -f "$OUT/bench.md" ]; then
    echo "---- bench.md (targets) ----"
    sed -n '/^Targets/,$p' "$OUT/bench.md" | head -n 60
fi
echo "---- summary ----"
cat "$SUMMARY"
[ "$FAILED" -ne 0 ] && exit 1
[ "$HAS_GPU" != "1" ] && exit 3
exit 0
