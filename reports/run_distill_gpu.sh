#!/usr/bin/env bash
# The GPU distillation report (issue 5): on one machine with 2 GPUs,
#   1. pretrain the small attention teacher (recipes/pretrain/teacher-small.yaml) on the shipped text, 1 GPU;
#   2. convert it: all layers, and a hybrid keeping every 4th layer as attention (a quarter);
#   3. distill both with recipes/distill/small.yaml on 1 GPU (5% of the teacher's training tokens);
#   4. distill the all-Lattice student again on 2 GPUs with DDP and with FSDP (same global batch and tokens).
# Reports (JSON), logs and a summary land in $OUT (results.tar.gz, summary.json, run.log).
# DRY=1 shrinks everything to run on a CPU in a few minutes (a rehearsal; FSDP is skipped there).
# Shared setup (wheels to carry, logging, backend check): reports/gpu_common.sh.
# Run it with the device tool: OUT=$OUT bash reports/run_distill_gpu.sh (kind nvidia-h100-x2, carry .whl).
source "$(dirname "$0")/gpu_common.sh"
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
step corpus 120 $L corpus "$W/corpus" --force
step teacher 240 env LATTICE_COMPILE=${LATTICE_COMPILE:-0} $L pretrain --config recipes/pretrain/teacher-small.yaml \
  --out_dir "$W/teacher" --tokenizer_dir "$W/corpus/tokenizer" --data.init_args.train_data_path "$W/corpus/train" \
  --data.init_args.val_data_path "$W/corpus/val" "${TEACHER[@]}"
cp "$W/teacher/final/hyperparameters.yaml" "$W/reports/teacher-hyperparameters.yaml" 2>/dev/null
keep_teacher_metrics
step convert_all 120 $L convert "$W/teacher/final" --out "$W/all" --force
step convert_hybrid 120 $L convert "$W/teacher/final" --out "$W/hybrid" --layers attention_every:4 --force

use_checked_backend "$W/all" "$W/hybrid"

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
