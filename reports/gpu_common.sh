# Shared by the GPU report scripts (reports/run_*_gpu.sh): install the carried wheels, logging, steps that never stop
# the script, packing of what is done so far into $OUT, and the Triton backend check. Source it, don't run it.
# The GPU image lacks litgpt, jsonargparse and litdata: carry them as wheels in .whl/ (ignored by git), made here with
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser==0.18.0 typeshed-client==2.15.0 litdata==0.2.59 \
#     boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
# and, for reports/run_recall_gpu.sh PART=passkey, lm-eval and what it needs beyond the image, in .whl/lmeval/:
#   pip wheel --no-deps -w .whl/lmeval lm_eval==0.4.13 datasets==5.0.1 dill==0.4.1 chardet==6.0.0.post1 pytz==2026.6 \
#     evaluate==0.4.6 more_itertools==11.2.1 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 \
#     pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 rouge_score==0.1.2 nltk==3.10.4 \
#     sqlitedict==2.1.0 word2number==1.1
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl/lmeval \
#     multiprocess==0.70.19                                                          (its wheels are per Python version)
set -u -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LITDATA_DISABLE_VERSION_CHECK=1   # the GPU machines reach no network
SITE=${SITE:-/tmp/site}
if [ -d .whl ] && [ "${INSTALL:-1}" = 1 ]; then  # the GPU image lacks litgpt, jsonargparse, litdata: carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/litgpt-*.whl .whl/jsonargparse-*.whl .whl/docstring_parser-*.whl .whl/typeshed_client-*.whl \
    .whl/litdata-*.whl .whl/boto3-*.whl .whl/botocore-*.whl .whl/s3transfer-*.whl .whl/jmespath-*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . || exit 1
  export PYTHONPATH="$SITE" PYTHONSAFEPATH=1  # the installed plugin, not the source folder in the working dir
fi
OUT=${OUT:-out/gpu-report}
W=${WORK:-/tmp/lattice-gpu-work}
DRY=${DRY:-0}
mkdir -p "$OUT" "$W/reports"
LOG="$OUT/run.log"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT CMD...: run, keep its output, never stop the script
  local name=$1 limit=$2; shift 2
  log "== $name: $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$W/reports/$name.log" 2>&1
  local rc=$?
  log "   $name: exit $rc after $(( $(date +%s) - t0 ))s"
  tail -n 25 "$W/reports/$name.log" >> "$LOG"
  pack
  return $rc
}
pack() {  # what is done so far comes back even if the call runs out of time
  for d in "$W"/d-*; do [ -f "$d/report.json" ] && cp "$d/report.json" "$W/reports/distill-${d##*/d-}.json"; done
  tar -czf "$OUT/results.tar.gz" -C "$W" reports 2>/dev/null
}
keep_teacher_metrics() {  # the newest CSV log of the teacher's pretraining (an earlier run in $W leaves older ones)
  local newest
  newest=$(ls -d "$W"/teacher/logs/csv/version_* 2>/dev/null | sort -V | tail -n 1)
  [ -n "$newest" ] && cp "$newest/metrics.csv" "$W/reports/teacher-metrics.csv"
}
L="python3 -m lattice_plugin"
log "host: $(hostname); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tr '\n' ';')"
python3 -c "import torch, lightning, litgpt, litdata, jsonargparse; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'lightning', lightning.__version__)" 2>&1 | tee -a "$LOG"

use_checked_backend() {  # use_checked_backend CHECKPOINT_DIR...: the Triton kernels are on-going work: if they fail a
  # small check here, the given students run the PyTorch backend
  python3 - <<'PY' 2>&1 | tee -a "$LOG"
import sys, torch
from lattice_plugin.ops import lattice_attention
if not torch.cuda.is_available():
    print("backend check: no CUDA"); sys.exit(0)
torch.manual_seed(0)
B, T, H, d, m = 2, 300, 4, 64, 64
q = torch.softmax(torch.randn(B, T, H, m, device="cuda"), -1); k = torch.softmax(torch.randn(B, T, H, m, device="cuda"), -1)
v = torch.nn.functional.normalize(torch.randn(B, T, H, d, device="cuda"), dim=-1); beta = torch.rand(B, T, H, device="cuda")
s0 = torch.randn(H, d, m, device="cuda")
ref, _ = lattice_attention(q, k, v, beta, s0, backend="torch", chunk_size=64)
try:
    out, _ = lattice_attention(q, k, v, beta, s0, backend="triton", chunk_size=64)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"backend check: triton vs torch relative error {err:.2e}")
    ok = err < 1e-2
except Exception as e:
    print("backend check: triton failed:", type(e).__name__, str(e)[:200]); ok = False
open("/tmp/lattice_backend", "w").write("auto" if ok else "torch")
PY
  if [ "$(cat /tmp/lattice_backend 2>/dev/null || echo auto)" = torch ]; then
    log "using lattice_backend: torch for the students"
    for dir in "$@"; do sed -i 's/^lattice_backend: .*/lattice_backend: torch/' "$dir/model_config.yaml"; done
  fi
}
