#!/usr/bin/env bash
# One GPU session's checks in one command, within TOTAL_S (default 540 s, install included), offline:
#   bash bench/gpu_check.sh                    (repo root; results in $OUT, else ./gpu_check_out)
#   bash bench/gpu_check.sh --plan             the stages in order, their limits, the sum; runs nothing
#   bash bench/gpu_check.sh --decide-smoke RC  what a smoke stage's exit status does: keep | drop
# Stages, in the order of the value of their answer, each under `timeout` (cut to the time left);
# a failed or timed-out stage is recorded and the next one runs (details: bench/RESULTS.md):
#   setup       versions (python, torch, triton, CUDA, cuDNN, the GPU, compute-sanitizer)
#   install     this tree, offline (already importable: kept; else pip -e, no deps; else a shim)
#   precompile  bench/precompile.py: every kernel the stages below launch, compiled in parallel
#   smoke       bench/persistent_smoke.py; only a hang (rc 124/137) drops the persistent path
#   smoke_ll    persistent_smoke.py --ll, then the CUDA LL tests; only a hang drops the LL variants
#   bench       fused-rnn bench --quick --dtypes bf16 --paths persistent,graph,triton (step as triton)
#   policy      bench/write_policy.py bench.json -> path_policy.json (skipped if the script is absent)
#   ptests      the persistent test files on CUDA (pytest -n; the LL tests ran in smoke_ll)
#   memcheck    compute-sanitizer over bench/memcheck_cases.py, the persistent cases first
#   pytest      every other test file on CUDA;  demo, check: fused-rnn demo / check --quick
#   tune        bench/persistent_tune.py, on time left over only (raise TOTAL_S)
# Files in $OUT (8, the most that come back): summary.txt (versions, one line a stage), bench_log.txt
# (install, precompile, smoke, bench, policy, demo, tune), pytest.txt (ptests, pytest, check),
# memcheck.txt, bench.md, bench.json, path_policy.json, tune.md. Exit status: 0 every stage ran and
# passed, 1 a stage failed or timed out, 3 no CUDA GPU (pytest on the CPU, the bench's CPU mode).
# Knobs: PYTHON, TOTAL_S, a limit per stage (T_SETUP T_INSTALL T_PRECOMPILE T_SMOKE T_SMOKE_LL
# T_BENCH T_POLICY T_PTESTS T_MEMCHECK T_PYTEST T_DEMO T_CHECK T_TUNE, seconds), SKIP_STAGES (comma
# list of stage names), PYTEST_WORKERS (auto: cores less 4, at least 4; 0 none), PRECOMPILE_WORKERS
# (default: cores less 2), BENCH_ARGS / TUNE_ARGS (appended to those commands), FORCE_SHIM=1 (no
# pip: test the shim). Replaced: setup.txt is the head of summary.txt; T_PYTEST now bounds the
# files other than the persistent ones (T_PTESTS); SKIP_STAGES=pytest skips those only.
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)

TOTAL_S=${TOTAL_S:-540}
T_SETUP=${T_SETUP:-15}
T_INSTALL=${T_INSTALL:-30}
T_PRECOMPILE=${T_PRECOMPILE:-150}
T_SMOKE=${T_SMOKE:-30}
T_SMOKE_LL=${T_SMOKE_LL:-40}
T_BENCH=${T_BENCH:-80}
T_POLICY=${T_POLICY:-5}
T_PTESTS=${T_PTESTS:-60}
T_MEMCHECK=${T_MEMCHECK:-50}
T_PYTEST=${T_PYTEST:-45}
T_DEMO=${T_DEMO:-10}
T_CHECK=${T_CHECK:-15}
T_TUNE=${T_TUNE:-200}
PYTEST_WORKERS=${PYTEST_WORKERS:-auto}
PRECOMPILE_WORKERS=${PRECOMPILE_WORKERS:-0}
BENCH_ARGS=${BENCH_ARGS:-}
TUNE_ARGS=${TUNE_ARGS:-}
SKIP_STAGES=${SKIP_STAGES:-}
STAGES=(setup install precompile smoke smoke_ll bench policy ptests memcheck pytest demo check tune)
# What the bench stage measures; precompile compiles for the same arguments (and the same path env)
BENCH_SEL="--quick --dtypes bf16"
BENCH_ALL="$BENCH_SEL --paths persistent,graph,triton $BENCH_ARGS"
PERSISTENT_TESTS=(tests/test_lstm_rnn_persistent.py tests/test_ln_lstm_persistent.py tests/test_persistent_*.py)

skipped() { case ",$SKIP_STAGES," in *",$1,"*) return 0 ;; esac; return 1; }
# not_run NAME [gpu]: record NAME as skipped and succeed when SKIP_STAGES names it or, with
# "gpu", there is no CUDA GPU; else fail (the stage runs)
not_run() {
    if skipped "$1"; then record "$1" 0 0 skipped "SKIP_STAGES"
    elif [ "${2:-}" = gpu ] && [ "$HAS_GPU" != "1" ]; then record "$1" 0 0 skipped "no CUDA GPU"
    else return 1; fi
}

limit_of() {  # STAGE -> its limit in seconds (tune: only what the others leave of TOTAL_S)
    local v="T_$(echo "$1" | tr '[:lower:]' '[:upper:]')" s rest=$TOTAL_S
    if [ "$1" = tune ]; then
        for s in "${STAGES[@]}"; do
            [ "$s" = tune ] || skipped "$s" || rest=$((rest - $(limit_of "$s")))
        done
        [ "$rest" -gt "$T_TUNE" ] && rest=$T_TUNE
        [ "$rest" -lt 60 ] && rest=0  # tune needs a minute to say anything
        echo "$rest"
    else
        echo "${!v}"
    fi
}

print_plan() {  # the stages in order, their limits and the sum; runs nothing
    local i=0 s lim sum=0 note
    echo "gpu_check plan (TOTAL_S=$TOTAL_S; each limit is also cut to the time left when it starts):"
    for s in "${STAGES[@]}"; do
        i=$((i + 1)); note=
        if skipped "$s"; then lim=0; note="(SKIP_STAGES)"
        else lim=$(limit_of "$s"); fi
        [ "$s" = tune ] && [ "$lim" -eq 0 ] && [ -z "$note" ] && note="(under 60 s left over: raise TOTAL_S)"
        printf '%2d. %-10s %4d s %s\n' "$i" "$s" "$lim" "$note"
        sum=$((sum + lim))
    done
    echo "sum: $sum s of TOTAL_S $TOTAL_S"
    echo "precompile command: bench/precompile.py --bench \"$BENCH_ALL\""
    echo "bench command: fused-rnn bench $BENCH_ALL"
    [ "$sum" -le "$TOTAL_S" ] || echo "WARNING: the limits add up to more than TOTAL_S: the last stages get what is left"
}

decide_smoke() {  # RC of a smoke stage -> keep | drop (its path, for the rest of the run)
    # Only a hang drops it: a launch that never returns would eat every later stage's limit.
    # A failure (wrong numbers, an exception) is recorded; the later stages still measure the path.
    case "$1" in 124|137) echo drop ;; *) echo keep ;; esac
}

# smoke_verdict RC WHAT: a smoke stage's status; fails (drop WHAT) only for a hang
smoke_verdict() {
    local st; st=$(status_of "$1")
    if [ "$(decide_smoke "$1")" = drop ]; then
        echo "$st (a hang: $2 left out of every later stage)"; return 1
    elif [ "$1" -ne 0 ]; then
        echo "$st (recorded; the later stages still run $2)"
    else
        echo "$st"
    fi
}

case "${1:-}" in
    --plan) print_plan; exit 0 ;;
    --decide-smoke) [ $# -eq 2 ] || { echo "usage: $0 --decide-smoke RC" >&2; exit 2; }
                    decide_smoke "$2"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--plan | --decide-smoke RC]" >&2; exit 2 ;;
esac

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

T0=$(date +%s)
DEADLINE=$((T0 + TOTAL_S))
SUMMARY=$OUT/summary.txt
BLOG=$OUT/bench_log.txt
: >"$SUMMARY"
: >"$BLOG"
FAILED=0

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python; fi

say() { echo "$*"; echo "$*" >>"$SUMMARY"; }

# record NAME RC SECONDS STATUS [NOTE]
record() {
    printf '%-10s %-8s rc=%-4s %4ss  %s\n' "$1" "$4" "$2" "$3" "${5:-}" | tee -a "$SUMMARY"
    case "$4" in ok|skipped*) ;; *) FAILED=1 ;; esac
}

left_for() {  # LIMIT -> the limit, cut to the time left of TOTAL_S (less 5 s for the kill)
    local left=$((DEADLINE - $(date +%s) - 5))
    [ "$1" -gt "$left" ] && echo "$left" || echo "$1"
}

# stage NAME LIMIT LOG CMD...: runs CMD under timeout (limit cut to the time left), sets RC, DUR.
stage() {
    local name=$1 limit log=$3
    limit=$(left_for "$2")
    shift 3
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
SETUP_T0=$(date +%s)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null \
    || ls "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" 2>/dev/null || true)
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(uname -srm)  cores: $(nproc 2>/dev/null)"
    echo "repo: $REPO  python: $(command -v "$PY")"
    command -v nvidia-smi >/dev/null && timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader 2>&1
    command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -n 2
    [ -n "$SAN" ] && echo "compute-sanitizer: $SAN ($(timeout 5 "$SAN" --version 2>&1 | tail -n 1))"
    timeout "$T_SETUP" "$PY" - <<'PYEOF'
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
PYEOF
} >>"$SUMMARY" 2>&1
cat "$SUMMARY"
HAS_GPU=0
grep -q 'cuda available: True' "$SUMMARY" && HAS_GPU=1
record setup 0 "$(($(date +%s) - SETUP_T0))" ok "versions above"
if [ "$HAS_GPU" != "1" ]; then
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
if ! not_run install; then
    DESC="install_project (see this script)" stage install "$T_INSTALL" "$BLOG" bash -c "$(declare -f install_project); PY='$PY' REPO='$REPO' FORCE_SHIM='${FORCE_SHIM:-0}' install_project"
    if [ "$RC" -ne 0 ] && [ "$RC" -ne -1 ]; then
        # Last resort, no pip: fused_rnn imports from the tree (the repo root is on sys.path for
        # python -m / -c and pytest); a sitecustomize on PYTHONPATH maps fused_rnn.kernels to
        # kernels/, as the install's package-dir does. (It shadows any other sitecustomize.)
        SHIM=$(mktemp -d)
        cat >"$SHIM/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, sys
_KDIR = "$REPO/kernels"
class _FusedRnnKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "fused_rnn.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, _KDIR + "/__init__.py", submodule_search_locations=[_KDIR])
sys.meta_path.insert(0, _FusedRnnKernels())
PYEOF
        export PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        echo "install: pip failed; using the sitecustomize shim in $SHIM" >>"$BLOG"
    fi
    WHERE=$("$PY" -c "import fused_rnn, fused_rnn.kernels; print(fused_rnn.__file__, fused_rnn.__version__)" 2>&1)
    IRC=$?
    echo "import check: $WHERE" >>"$BLOG"
    if [ $IRC -eq 0 ]; then
        NOTE="fused_rnn: $WHERE"
        [ "$RC" -ne 0 ] && NOTE="pip failed (rc=$RC), imports through the sitecustomize shim: $WHERE"
        record install "$RC" "$DUR" ok "$NOTE"
    else
        record install "$RC" "$DUR" FAIL "fused_rnn does not import: $(echo "$WHERE" | tail -n 1)"
    fi
fi

# ------------------------------------------------------------------------------- precompile
# Every kernel the later stages launch, compiled in parallel processes sharing Triton's cache
# (launched compile-only: nothing can hang here), so that they time kernels, not ptxas.
if ! not_run precompile gpu; then
    LIM=$(left_for "$T_PRECOMPILE")
    stage precompile "$T_PRECOMPILE" "$BLOG" env -u TRITON_INTERPRET FUSED_RNN_PATH=step "$PY" \
        bench/precompile.py --bench "$BENCH_ALL" --budget-s "$((LIM > 20 ? LIM - 10 : 10))" \
        --workers "$PRECOMPILE_WORKERS"
    record precompile "$RC" "$DUR" "$(status_of "$RC")" "$(grep -E '^precompile: [0-9]+/[0-9]+ jobs' "$BLOG" | tail -n 1)"
fi

# ------------------------------------------------------------------------------------ smoke
PERSISTENT_OK=1
if ! not_run smoke gpu; then
    stage smoke "$T_SMOKE" "$BLOG" env -u TRITON_INTERPRET "$PY" bench/persistent_smoke.py
    ST=$(smoke_verdict "$RC" "the persistent path") || PERSISTENT_OK=0
    record smoke "$RC" "$DUR" "$ST" "$(grep -E '^persistent_smoke: (all ok|FAILED)' "$BLOG" | tail -n 1)"
    grep -E '^  [a-z]+ [a-z0-9]+: (ok|FAIL)|fwd\+bwd median' "$BLOG" >>"$SUMMARY"
fi

# --------------------------------------------------------------------------------- smoke_ll
LL_OK=1
if not_run smoke_ll gpu; then :
elif [ "$PERSISTENT_OK" != 1 ]; then
    LL_OK=0
    record smoke_ll 0 0 skipped "the persistent smoke test hung"
else
    DESC="persistent_smoke.py --ll && pytest -k cuda_ll_exchange" stage smoke_ll "$T_SMOKE_LL" \
        "$BLOG" env -u TRITON_INTERPRET PY="$PY" bash -c \
        '"$PY" bench/persistent_smoke.py --ll && "$PY" -m pytest -q -x -p no:cacheprovider tests/test_lstm_rnn_persistent.py tests/test_ln_lstm_persistent.py -k cuda_ll_exchange'
    ST=$(smoke_verdict "$RC" "the LL variants") || LL_OK=0
    record smoke_ll "$RC" "$DUR" "$ST" "$(grep -E '^persistent_smoke --ll: (all ok|FAILED)' "$BLOG" | tail -n 1); CUDA LL tests: $(grep -E '[0-9]+ (passed|failed)' "$BLOG" | tail -n 1)"
    grep -E 'persistent LL .* ms, persistent barrier' "$BLOG" >>"$SUMMARY"
fi

# ------------------------------------------------------------------------------------ bench
# FUSED_RNN_PATH=step: the "triton" rows are the step path (write_policy.py reads them so).
if ! not_run bench; then
    BPATHS=persistent,graph,triton
    [ "$PERSISTENT_OK" = 1 ] || BPATHS=graph,triton
    LIM=$(left_for "$T_BENCH")
    TL=$((LIM - 15))  # the bench stops starting measurements here and still writes its table
    [ "$TL" -lt 5 ] && TL=5
    # shellcheck disable=SC2086
    stage bench "$T_BENCH" "$BLOG" env -u TRITON_INTERPRET FUSED_RNN_PATH=step "$PY" -m fused_rnn.bench \
        $BENCH_SEL --paths "$BPATHS" --out "$OUT" --time-limit "$TL" --no-plot $BENCH_ARGS
    NT=$(grep -cE '^  - (PASS|MISS)' "$OUT/bench.md" 2>/dev/null)
    NP=$(grep -cE '^  - PASS' "$OUT/bench.md" 2>/dev/null)
    record bench "$RC" "$DUR" "$(status_of "$RC")" "targets: ${NP:-0}/${NT:-0} pass (bench.md)"
fi

# ----------------------------------------------------------------------------------- policy
# The measured path-policy table for this card (fused_rnn/data/path_policy.json's format).
if not_run policy; then :
elif [ ! -f bench/write_policy.py ]; then
    record policy 0 0 skipped "bench/write_policy.py is not in this tree"
elif [ "$HAS_GPU" != "1" ]; then
    record policy 0 0 skipped "no CUDA GPU (a CPU run measures nothing for a card)"
elif [ ! -f "$OUT/bench.json" ]; then
    record policy 0 0 skipped "no bench.json"
else
    stage policy "$T_POLICY" "$BLOG" "$PY" bench/write_policy.py "$OUT/bench.json" "$OUT/path_policy.json"
    record policy "$RC" "$DUR" "$(status_of "$RC")" "$([ -f "$OUT/path_policy.json" ] && echo path_policy.json || echo 'no table written')"
fi

# ------------------------------------------------------------------- pytest (ptests, pytest)
# The CUDA lane is compile-bound where precompile did not reach (the test shapes): xdist runs it
# on most of the cores, files in the order the GPU needs them (xdist hands tests out in
# collection order, so a run cut at its limit has covered those first).
if [ "$PYTEST_WORKERS" = "auto" ]; then
    NCPU=$(nproc 2>/dev/null || echo 8)
    PYTEST_WORKERS=$((NCPU > 8 ? NCPU - 4 : 4))
fi
PYTEST_OPTS=(--maxfail=10 -q -rfE -p no:cacheprovider --durations=15)
if [ "$PYTEST_WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST_OPTS+=(-n "$PYTEST_WORKERS")
fi
PYTEST_OPTS+=(-k "not cuda_ll_exchange")  # run by the smoke_ll stage
if [ "$HAS_GPU" = "1" ]; then LANE="CUDA lane"; ENVX=(env -u TRITON_INTERPRET)
else LANE="CPU lane (no GPU), TRITON_INTERPRET=${TRITON_INTERPRET:-unset}"; ENVX=(env); fi
: >"$OUT/pytest.txt"

run_pytest() {  # NAME LIMIT FILES...
    local name=$1 limit=$2 last
    shift 2
    stage "$name" "$limit" "$OUT/pytest.txt" "${ENVX[@]}" "$PY" -m pytest "$@" "${PYTEST_OPTS[@]}"
    last=$(grep -E '[0-9]+ (passed|failed|error)|no tests ran' "$OUT/pytest.txt" | tail -n 1)
    [ -z "$last" ] && last="cut off at $(grep -oE '\[ *[0-9]+%\]' "$OUT/pytest.txt" | tail -n 1)"
    record "$name" "$RC" "$DUR" "$(status_of "$RC")" "$LANE: ${last:-no pytest summary line}"
}

PT_FILES=()
for f in "${PERSISTENT_TESTS[@]}"; do
    case " ${PT_FILES[*]} " in *" $f "*) continue ;; esac
    [ -f "$f" ] && PT_FILES+=("$f")
done
if not_run ptests; then :
elif [ "$PERSISTENT_OK" != 1 ]; then
    record ptests 0 0 skipped "the persistent smoke test hung"
else
    run_pytest ptests "$T_PTESTS" "${PT_FILES[@]}"
fi

# --------------------------------------------------------------------------------- memcheck
if not_run memcheck gpu; then :
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
    [ -z "$CASES" ] && CASES="cut after $(grep -cE '^\[[0-9]+/[0-9]+\] (ok|FAIL|SKIP)' "$OUT/memcheck.txt") cases"
    if [ "$RC" -eq 0 ] && echo "$SUMLINE" | grep -q 'ERROR SUMMARY: 0 errors'; then ST=ok
    elif [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then ST=TIMEOUT
    elif [ "$RC" -eq -1 ]; then ST=NO-TIME
    else ST=FAIL; fi
    record memcheck "$RC" "$DUR" "$ST" "${SUMLINE:-no ERROR SUMMARY line}; ${CASES}"
fi

# ------------------------------------------------------------------------------------ pytest
PYTEST_FILES=()
# CPU-only files (two gloo processes; the CPU routes) would spend the stage's time on no GPU question
CPU_ONLY=(tests/test_distributed.py tests/test_cpu_route.py tests/test_aten_route.py)
add_test_file() {
    case " ${PYTEST_FILES[*]} ${PT_FILES[*]} ${CPU_ONLY[*]} " in *" $1 "*) return ;; esac
    [ -f "$1" ] && PYTEST_FILES+=("$1")
}
for f in graphs activations padding lstm rnn lstm_proj gru kernels_safety layers compile export; do
    add_test_file "tests/test_$f.py"
done
for f in tests/test_*.py; do add_test_file "$f"; done
if ! not_run pytest; then
    run_pytest pytest "$T_PYTEST" "${PYTEST_FILES[@]}"
fi

# ------------------------------------------------------------------------------------- demo
# Issue 5's GPU check: fused_rnn.LSTM against torch.nn.LSTM in a short training run (tokens/s).
if ! not_run demo gpu; then
    stage demo "$T_DEMO" "$BLOG" env -u TRITON_INTERPRET "$PY" -m fused_rnn demo \
        --quick --steps 100 --device cuda --out "$(mktemp -d)"  # its PNG/JSON would pass the 8 files
    SPEED=$(grep -E '^speed:' "$BLOG" | tail -n 1)
    record demo "$RC" "$DUR" "$(status_of "$RC")" "${SPEED:-no speed line} (bench_log.txt)"
fi

# ------------------------------------------------------------------------------------ check
# `fused-rnn check` on CUDA (issues 3 and 5 owe it): appended to pytest.txt.
if ! not_run check gpu; then
    CPATHS=auto,persistent,graph  # graph last: the first cut if the stage runs out of time
    [ "$PERSISTENT_OK" = 1 ] || CPATHS=auto,graph
    stage check "$T_CHECK" "$OUT/pytest.txt" env -u TRITON_INTERPRET "$PY" -m fused_rnn check --quick \
        --device cuda --seed 1 --paths "$CPATHS"
    record check "$RC" "$DUR" "$(status_of "$RC")" "$(grep -E '^check: [0-9]+ cases' "$OUT/pytest.txt" | tail -n 1) (pytest.txt)"
fi

# ------------------------------------------------------------------------------------- tune
# The persistent kernels' plan variants, timed (its table to tune.md; its JSON stays behind).
if not_run tune gpu; then :
elif [ "$PERSISTENT_OK" != 1 ] && ! echo " $TUNE_ARGS " | grep -q -- " --step "; then
    record tune 0 0 skipped "the persistent smoke test hung"
elif [ $((DEADLINE - $(date +%s))) -lt 60 ]; then
    record tune 0 0 skipped "under 60 s of the ${TOTAL_S} s budget left (raise TOTAL_S)"
else
    LIM=$(left_for "$T_TUNE")
    TDIR=$(mktemp -d)
    NOLL=
    [ "$LL_OK" = 1 ] || NOLL=--no-ll
    # shellcheck disable=SC2086
    stage tune "$T_TUNE" "$BLOG" env -u TRITON_INTERPRET "$PY" bench/persistent_tune.py \
        --out "$TDIR" --budget-s "$((LIM > 40 ? LIM - 30 : 10))" $NOLL $TUNE_ARGS
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
