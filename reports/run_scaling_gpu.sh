#!/usr/bin/env bash
# The scaling report (issue 7): stage-2 distillation (full fine-tune, FSDP) of a ~320M-parameter all-Lattice student
# with the same global batch and steps on 1 GPU and on every larger GPU count the machine has (2, 4, 8):
#   1. pretrain the attention teacher recipes/pretrain/teacher-300m.yaml briefly on the shipped text, 1 GPU;
#   2. convert it (all layers);
#   3. lattice distill --config recipes/distill/scale-300m-fsdp.yaml --devices N for N = 1, 2, 4, 8 (up to the GPUs
#      present), then summarize tokens/s per GPU, scaling efficiency, peak memory per GPU and loss-curve agreement.
# Reports (JSON), logs and a summary land in $OUT (results.tar.gz, summary.json, run.log).
# DRY=1 shrinks the model to run on a CPU in a few minutes (a rehearsal: 1 process, strategy auto).
# Run it with the device tool: OUT=$OUT bash reports/run_scaling_gpu.sh (kind nvidia-h100-x2 or larger, carry .whl).
WORK=${WORK:-/tmp/lattice-scaling-work}
source "$(dirname "$0")/gpu_common.sh"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$DRY" = 1 ]; then
  TEACHER=(--model_config.n_layer 2 --model_config.n_embd 64 --model_config.n_head 4 --model_config.n_query_groups 4
           --model_config.intermediate_size 128 --model_config.block_size 128 --train.max_tokens 32768
           --train.micro_batch_size 8 --precision 32-true)
  DISTILL=(--train.max_seq_length 128 --stage2.max_steps 4 --precision 32-true --strategy auto)
  COUNTS=(1)
else
  TEACHER=()
  DISTILL=(${STEPS:+--stage2.max_steps "$STEPS"})  # STEPS=N: a shorter run than the recipe's 40 steps
  COUNTS=(1)  # then the largest count first: the new number is in even if the call runs out of time
  for n in 8 4 2; do [ "$n" -le "$GPUS" ] && COUNTS+=("$n"); done
fi
step corpus 120 $L corpus "$W/corpus" --force
step teacher 300 env LATTICE_COMPILE=${LATTICE_COMPILE:-0} $L pretrain --config recipes/pretrain/teacher-300m.yaml \
  --out_dir "$W/teacher" --tokenizer_dir "$W/corpus/tokenizer" --data.init_args.train_data_path "$W/corpus/train" \
  --data.init_args.val_data_path "$W/corpus/val" "${TEACHER[@]}"
keep_teacher_metrics
step convert 120 $L convert "$W/teacher/final" --out "$W/student" --force
use_checked_backend "$W/student"

for n in "${COUNTS[@]}"; do
  step "scale_${n}gpu" 300 $L distill --config recipes/distill/scale-300m-fsdp.yaml --teacher_dir "$W/teacher/final" \
    --student_dir "$W/student" --data.init_args.train_data_path "$W/corpus/train" \
    --data.init_args.val_data_path "$W/corpus/val" --out_dir "$W/d-scale-${n}gpu-fsdp" --devices "$n" "${DISTILL[@]}"
done
python3 reports/summarize_distill.py "$W/reports" > "$OUT/summary.json" 2>>"$LOG"
cat "$OUT/summary.json"
pack
log "done"
