#!/usr/bin/env bash
# The GPU distillation report (issue 5): on one machine with 2 GPUs,
#   1. pretrain the small attention teacher (recipes/pretrain/teacher-small.yaml) on the shipped text, 1 GPU;
#   2. convert it: all layers, and a hybrid keeping every 4th layer as attention (a quarter);
#   3. distill both with recipes/distill/small.yaml on 1 GPU (5% of the teacher's training tokens);
#   4. distill the all-Lattice student again on 2 GPUs with DDP and with FSDP (same global batch and tokens).
# Reports (JSON), logs and a summary land in $OUT (results.tar.gz, summary.json, run.log).
# DRY=1 shrinks everything to run on a CPU in a few minutes (a rehearsal; FSDP is skipped there).
# The GPU image lacks litgpt, jsonargparse and litdata: carry them as wheels in .whl/ (ignored by git), made here with
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser==0.18.0 typeshed-client==2.15.0 litdata==0.2.59 \
#     boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
# and run it with the device tool: OUT=$OUT bash reports/run_distill_gpu.sh (kind nvidia-h100-x2, carry .whl).
set -u -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LITDATA_DISABLE_VERSION_CHECK=1   # the GPU machines reach no network
SITE=${SITE:-/tmp/site}
if [ -d .whl ] && [ "${INSTALL:-1}" = 1 ]; then  # the GPU image lacks litgpt, jsonargparse, litdata: carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/litgpt-*.whl .whl/jsonargparse-*.whl .whl/docstring_parser-*.whl .whl/typeshed_client-*.whl \
    .whl/litdata-*.whl .whl/boto3-*.whl .whl/botocore-*.whl .whl/s3transfer-*.whl .whl/jmespath-*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . || exit 1
  export PYTHONPATH="$SITE" PYTHONSAFEPATH=1  # the installed plugin, not the source folder in the working dir
fi
OUT=${OUT:-out/gpu-report}
W=${WORK:-/tmp/distill-work}
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
L="python3 -m lattice_plugin"
if [ "$DRY" = 1 ]; then
  TEACHER=(--model_config.n_layer 4 --model_config.n_embd 64 --model_config.n_head 4 --model_config.n_query_groups 2
           --model_config.intermediate_size 128 --model_config.block_size 64 --train.max_tokens 65536
           --train.global_batch_size 16 --train.micro_batch_size 16 --precision 32-true --data.init_args.num_workers 0)
  DISTILL=(--train.max_seq_length 64 --stage1.max_tokens 2048 --stage2.max_tokens 2048 --precision 32-true
           --data.init_args.num_workers 0 --eval.decode_tokens 16 --eval.prompt_tokens 16 --eval.interval 2)
  STRATEGIES=(ddp)
else
  TEACHER=()
  DISTILL=()
  STRATEGIES=(ddp fsdp)
fi
log "host: $(hostname); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tr '\n' ';')"
python3 -c "import torch, lightning, litgpt, litdata, jsonargparse; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'lightning', lightning.__version__, 'litgpt', litgpt.__version__ if hasattr(litgpt, '__version__') else '?')" 2>&1 | tee -a "$LOG"

step corpus 120 $L corpus "$W/corpus" --force
step teacher 240 env LATTICE_COMPILE=${LATTICE_COMPILE:-0} $L pretrain --config recipes/pretrain/teacher-small.yaml \
  --out_dir "$W/teacher" --tokenizer_dir "$W/corpus/tokenizer" --data.init_args.train_data_path "$W/corpus/train" \
  --data.init_args.val_data_path "$W/corpus/val" "${TEACHER[@]}"
cp "$W/teacher/final/hyperparameters.yaml" "$W/reports/teacher-hyperparameters.yaml" 2>/dev/null
cp "$W"/teacher/logs/csv/version_*/metrics.csv "$W/reports/teacher-metrics.csv" 2>/dev/null
step convert_all 120 $L convert "$W/teacher/final" --out "$W/all" --force
step convert_hybrid 120 $L convert "$W/teacher/final" --out "$W/hybrid" --layers attention_every:4 --force

# the Triton kernels are on-going work: if they fail a small check here, the students run the PyTorch backend
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
BACKEND=$(cat /tmp/lattice_backend 2>/dev/null || echo auto)
if [ "$BACKEND" = torch ]; then
  log "using lattice_backend: torch for the students"
  sed -i 's/^lattice_backend: .*/lattice_backend: torch/' "$W/all/model_config.yaml" "$W/hybrid/model_config.yaml"
fi

D=(--config recipes/distill/small.yaml --teacher_dir "$W/teacher/final" --data.init_args.train_data_path "$W/corpus/train"
   --data.init_args.val_data_path "$W/corpus/val" "${DISTILL[@]}")
step all_1gpu 200 $L distill "${D[@]}" --student_dir "$W/all" --out_dir "$W/d-all-1gpu" --devices 1
step hybrid_1gpu 200 $L distill "${D[@]}" --student_dir "$W/hybrid" --out_dir "$W/d-hybrid-1gpu" --devices 1
for s in "${STRATEGIES[@]}"; do
  step "all_2gpu_$s" 200 $L distill "${D[@]}" --student_dir "$W/all" --out_dir "$W/d-all-2gpu-$s" --devices 2 --strategy "$s"
done
python3 reports/summarize_distill.py "$W/reports" > "$OUT/summary.json" 2>>"$LOG"
cat "$OUT/summary.json"
pack
log "done"
