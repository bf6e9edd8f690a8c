#!/usr/bin/env bash
# Issues 15 and 16 in one device call (at most 10 minutes): the training bench (bench/train_gpu.py: fused-kernel
# checks, first-use build, model-level rows at SEQ_LENS), then the generation bench (bench/gpu_generation.py).
# Results are packed into $OUT/perf.tar.gz after each step (the device returns at most 8 files), with $OUT/run.log.
# MQAR_S > 0 ends the call with MQAR rows of MQAR_MIXERS (default attention) trained MQAR_STEPS steps; the other
# settings of reports/run_recall_gpu.sh (PART, PAIRS, LRS, PARALLEL, STOP_AT, EXTRA) come from the environment.
#   OUT=$OUT SEQ_LENS=2048,8192,32768 TRAIN_S=330 GEN_S=110 bash bench/gpu_perf.sh     (carry .whl)
source "$(dirname "$0")/../reports/gpu_common.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl || log "fla wheels did not install: FLA rows are skipped"
mkdir -p "$W/perf"
pack_perf() { tar -czf "$OUT/perf.tar.gz.tmp" -C "$W" perf reports && mv "$OUT/perf.tar.gz.tmp" "$OUT/perf.tar.gz"; }
if [ "${TRAIN_S:-330}" -gt 0 ]; then
  step train "${TRAIN_S:-330}" env OUT="$W/perf" SEQ_LENS="${SEQ_LENS:-2048,8192}" OTHER_VARIANTS=0 \
    NEXT_IF_BEFORE_S="${NEXT_IF_BEFORE_S:-200}" python3 bench/train_gpu.py
  pack_perf
fi
if [ "${GEN_S:-200}" -gt 0 ]; then
  step generation "${GEN_S:-200}" env OUT="$W/perf" GEN_SKIP_CHECKS=1 GEN_BUDGET_S=$(( ${GEN_S:-200} - 25 )) \
    python3 bench/gpu_generation.py
  pack_perf
fi
if [ "${MQAR_S:-0}" -gt 0 ]; then  # the recall part last: it shares the GPU between processes (no timings above)
  step mqar "$MQAR_S" env INSTALL=0 SITE="$SITE" BUDGET_S=$(( MQAR_S - 30 )) OUT="$W/perf" \
    MIXERS="${MQAR_MIXERS:-attention}" STEPS="${MQAR_STEPS:-6000}" bash reports/run_recall_gpu.sh
  pack_perf
fi
rm -f "$OUT/results.tar.gz"  # gpu_common's pack: its logs are in perf.tar.gz too
log "done"
