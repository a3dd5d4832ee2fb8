#!/usr/bin/env bash
# The GPU check in one command: nvidia-smi, the CUDA tests (test/test_cuda.py), then forward and
# training speed of lite, r50 and diffsql_r50 (SD v1.5 size, random weights) at 192x640 in fp32,
# bf16 and fp16, printed as one markdown table, and one model serving 1, 2, 4 cameras. Every stage is bounded (worst case ~7.8 min in
# all); a failed stage is reported and the next one still runs. Without CUDA it prints the plan
# and exits 0.
#
#   bash bench/gpu_check.sh --pack   # on a machine with the project's .venv and ../shared data:
#                                    # .gpu_pack/ = what a bare GPU machine lacks (see below)
#   bash bench/gpu_check.sh          # on the GPU machine; with the device tool: carry .gpu_pack
#
# Python: the repo's .venv if it imports torch (carried, or made there), else the system python3
# with torch. A GPU machine without package index access may lack diffusers and kornia; --pack
# stores them (pure Python, from .venv) with a stand-in for kornia's compiled image I/O, which
# this project never calls, and the real KITTI frames the tests and benchmarks read. With $OUT
# set, the log, the JUnit report, the benchmark JSON and the table are written there too.
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PACK=$ROOT/.gpu_pack
DRIVE=2011_09_26/2011_09_26_drive_0023_sync  # the frames test_cuda.py and the benchmarks read
PRESETS="lite r50 diffsql_r50"
PRECISIONS="fp32 bf16 fp16"

pack() {
  local py=$ROOT/.venv/bin/python shared=${DIFFSQL_SHARED:-$ROOT/../shared}
  local site tmp
  site=$("$py" -c "import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))") || exit 1
  [ -d "$shared/data/kitti/raw/$DRIVE" ] || { echo "no KITTI sample at $shared/data/kitti/raw/$DRIVE"; exit 1; }
  rm -rf "$PACK" && mkdir -p "$PACK/shared/data/kitti/raw/2011_09_26"
  tmp=$(mktemp -d) && mkdir "$tmp/kornia_rs"
  cat >"$tmp/kornia_rs/__init__.py" <<'EOF'
"""Stand-in for kornia_rs (kornia's compiled image I/O, built here for another Python): kornia
imports it at start-up; diffsql never reads or writes images through kornia. Any use raises."""


class _Absent:
    def __getattr__(self, name):
        raise ImportError(f"kornia_rs.io.{name}: kornia_rs is a stand-in here (bench/gpu_check.sh --pack)")


io = _Absent()
EOF
  tar -czf "$PACK/site.tar.gz" --exclude=__pycache__ -C "$site" diffusers kornia -C "$tmp" kornia_rs || exit 1
  rm -rf "$tmp"
  cp "$shared"/data/kitti/raw/2011_09_26/calib_*.txt "$PACK/shared/data/kitti/raw/2011_09_26/"
  cp -r "$shared/data/kitti/raw/$DRIVE" "$PACK/shared/data/kitti/raw/2011_09_26/"
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/.gpu_pack/" "$exclude" 2>/dev/null || echo "/.gpu_pack/" >>"$exclude"
  echo "packed $(du -sh "$PACK" | cut -f1) into $PACK (git-ignored through $exclude):"
  echo "  $(tar -tzf "$PACK/site.tar.gz" | grep -c .) files of diffusers, kornia, the kornia_rs stand-in; KITTI $DRIVE"
  echo "run it on the GPU machine with the device tool: command 'bash bench/gpu_check.sh', carry ['.gpu_pack']"
}

pick_python() {
  local cand
  for cand in "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
      PY=$cand
      return 0
    fi
  done
  return 1
}

NEEDED="torch torchvision diffusers kornia cv2 numpy scipy yaml tqdm pytest"
missing() { "$PY" -c "import importlib.util as u; print(' '.join(m for m in '$NEEDED'.split() if u.find_spec(m) is None))"; }

setup_python() {
  if ! pick_python; then
    echo "python: none with torch found (.venv/bin/python, python3, python)"
    return 1
  fi
  local why="system python"
  [ "$PY" = "$ROOT/.venv/bin/python" ] && why="the repo's .venv"
  echo "python: $PY ($why): $("$PY" -c "import sys, torch; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}')")"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  local lack
  lack=$(missing)
  if [ -n "$lack" ] && [ -f "$PACK/site.tar.gz" ]; then
    echo "missing: $lack; using the packed modules of .gpu_pack/site.tar.gz"
    mkdir -p /tmp/gpu_check_site && tar -xzf "$PACK/site.tar.gz" -C /tmp/gpu_check_site
    export PYTHONPATH=$ROOT:/tmp/gpu_check_site${PYTHONPATH#"$ROOT"}
    lack=$(missing)
  fi
  if [ -n "$lack" ]; then
    echo "missing: $lack; trying pip with the pins of requirements.txt (fails fast without an index)"
    local pins
    pins=$(grep -E "^(diffusers|kornia)==" requirements.txt | tr '\n' ' ')
    timeout 120 "$PY" -m pip install -q --retries 0 --timeout 10 --target /tmp/gpu_check_site $pins \
      && export PYTHONPATH=$PYTHONPATH:/tmp/gpu_check_site
    lack=$(missing)
  fi
  [ -z "$lack" ] || echo "STILL MISSING: $lack (the stages below will fail; run --pack where .venv exists)"
}

setup_data() {
  if [ -n "${DIFFSQL_SHARED:-}" ]; then :
  elif [ -d "$ROOT/../shared/data/kitti/raw/$DRIVE" ]; then export DIFFSQL_SHARED=$ROOT/../shared
  elif [ -d "$PACK/shared/data/kitti/raw/$DRIVE" ]; then export DIFFSQL_SHARED=$PACK/shared
  fi
  echo "data: ${DIFFSQL_SHARED:-NOT FOUND (neither ../shared nor .gpu_pack/shared: run --pack)}"
}

# name, time limit (s), command... : runs it, records ok / failed / timed out in SUMMARY.
SUMMARY=()
FAILED=0
stage() {
  local name=$1 limit=$2 t0 rc status
  shift 2
  echo
  echo "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED=1
  SUMMARY+=("$name: $status, $(($(date +%s) - t0)) s")
}

# The stages: name, time limit in seconds, command. Set once PY and the output folder are known.
define_stages() {
  local out=$1
  TESTS=("$PY" -m pytest test/test_cuda.py test/test_runtimes_cuda.py -q -p no:cacheprovider --junitxml "$out/test_cuda.xml")
  # shellcheck disable=SC2206  # the preset and precision lists are meant to split
  SPEED=("$PY" bench/model_speed.py --device cuda --presets $PRESETS --precisions $PRECISIONS
    --height 192 --width 640 --runs 20 --threads "$(nproc)" --json "$out/model_speed.json")
  # shellcheck disable=SC2206
  TRAIN=("$PY" bench/train_step.py --device cuda --presets $PRESETS --precision $PRECISIONS
    --size 192x640 --batch 8 --steps 5 --json "$out/train_step.json")
  MULTI=("$PY" bench/multi_camera.py --device cuda --precision bf16 --cameras 1 2 4 --runs 10 --processes --seconds 3)
  TABLE=("$PY" bench/gpu_table.py "$out/model_speed.json" "$out/train_step.json")
}

plan() {
  echo "plan (each stage bounded by 'timeout'; worst case ~7.8 min in all):"
  echo "  1. (10 + 10 s) nvidia-smi --query-gpu=..., torch's view of the GPU"
  echo "  2. (170 s) ${TESTS[*]}"
  echo "  3. (120 s) ${SPEED[*]}"
  echo "  4. (100 s) ${TRAIN[*]}"
  echo "  5. (60 s) ${MULTI[*]}"
  echo "  6.         ${TABLE[*]} -> $1/table.md"
}

TORCH_GPU='import torch
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"torch sees cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; cuDNN {torch.backends.cudnn.version()}")'

main() {
  local out=$1 t_start
  t_start=$(date +%s)
  echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), $(nproc) cores; repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  setup_python || { PY=python3; define_stages "$out"; plan "$out"; echo "skipping: no python with torch"; return 0; }
  setup_data
  define_stages "$out"
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    plan "$out"
    echo "skipping: no CUDA"
    return 0
  fi
  plan "$out"
  export PYTHONUNBUFFERED=1
  stage "GPU" 10 nvidia-smi --format=csv \
    --query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm,clocks.max.sm
  stage "torch's GPU" 10 "$PY" -c "$TORCH_GPU"
  stage "CUDA tests" 170 "${TESTS[@]}"
  stage "forward speed" 120 "${SPEED[@]}"
  stage "training speed" 100 "${TRAIN[@]}"
  stage "multi-camera batching" 60 "${MULTI[@]}"
  echo
  echo "=== table"
  "${TABLE[@]}" | tee "$out/table.md"
  echo
  echo "=== summary ($(($(date +%s) - t_start)) s in all)"
  printf '  %s\n' "${SUMMARY[@]}"
  return "$FAILED"
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  return 0  # sourced (to test a function): define only
fi
if [ "${1:-}" = "--pack" ]; then
  pack
  exit
fi
OUTDIR=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUTDIR"
echo "writing the log and results to $OUTDIR"
main "$OUTDIR" 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
