#!/usr/bin/env bash
# `lattice recall` on one GPU, in calls of at most 10 minutes (issue 17). Every part resumes: the rows already in
# reports/recall/<part>.json are copied to $OUT first and skipped, new rows are appended to $OUT/<part>.json as they
# finish (atomically), and a row that would overrun BUDGET_S is left for the next call. After each call, copy the
# returned files over reports/recall/ and commit them, so that the next call carries them and continues.
#   PART=mqar    MIXERS=... PAIRS=16,32,64,128 SLOTS=64 LRS=3e-4,1e-3,3e-3,1e-2 STEPS=6000 [STOP_AT=0.99]
#                (accuracy vs K)
#   PART=slots   same rows file, default MIXERS=lattice_exact SLOTS=16,32,64,128 (m = 64 rows are reused) (vs m)
#   PART=grids   GRIDS="N ARGS; N ARGS; ...": several MQAR grids side by side into the same rows file, N processes
#                each; ARGS are `lattice recall mqar` options (--mixers, --pairs, --slots, --lrs, --seq-len, ...) and
#                STEPS, STOP_AT, BUDGET_S apply to every grid (a grid's own --steps or --stop-at wins)
#   PART=lm      MIXERS=... TOKENS=3276800                                     (perplexity and tokens/s per mixer)
#   PART=passkey  corpus with PASSKEY_DOCS answered pass-key documents (default 40000) -> teacher-small (pretrain) ->
#                convert -> distill small -> lattice_passkey at and beyond 256 tokens (one H100, 8000 documents: 546 s;
#                if a call ends first, run it again on the still-warm machine to continue; see the part below)
#   PART=checks  bench/fla_peer_check.py: every mixer's causality at the LM and MQAR shapes, FLA's GLA and DeltaNet
#                kernels against FLA's own recurrences -> fla_peer_check.json, saved after every entry (its own call:
#                beside 14 MQAR processes its 540 s covered six of the eight mixers' causality entries, no kernel check)
# Run it with the device tool from the repository root (carry .whl):  OUT=$OUT PART=mqar bash reports/run_recall_gpu.sh
# EXTRA="..." adds flags to the recall command (e.g. a CPU rehearsal: EXTRA="--device cpu --vocab-size 64 ...").
# MQAR runs PARALLEL=4 processes on the one GPU (disjoint rows, one results file); their accuracy is unaffected, their
# tokens/s are not speed measurements (`lattice recall lm` runs alone and gives those).
# FLA's layers (gla, deltanet, gated_deltanet) run when .whl holds the fla_core and flash_linear_attention wheels.
# INSTALL=0 installs nothing (parts run side by side after one install, each with its own OUT and WORK).
[ -d .whl ] || { [ -d ../../.whl ] && ln -s ../../.whl .whl; }  # run from a worktree in .wt/NAME of the checkout
source "$(dirname "$0")/gpu_common.sh"
if [ "${INSTALL:-1}" = 1 ] && [ -d .whl ] && ls .whl/flash_linear_attention-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl || log "fla wheels did not install: FLA rows are skipped"
fi
PART=${PART:-mqar}
if [ "${INSTALL:-1}" = 1 ] && [ "$PART" = passkey ]; then  # lm-eval and what it needs beyond the image (gpu_common.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/lmeval/*.whl || { log "PART=passkey needs the lm-eval wheels in .whl/lmeval (see gpu_common.sh)"; exit 1; }
fi
BUDGET_S=${BUDGET_S:-420}   # of the call's 600 s: the install, the last row's overrun and the copy-back need the rest
R=reports/recall
resume() {  # resume NAME: the committed rows of NAME.json become the starting point in $OUT
  [ -f "$R/$1.json" ] && cp "$R/$1.json" "$OUT/$1.json"
  return 0
}
PARALLEL=${PARALLEL:-4}  # MQAR rows are small: this many processes share the GPU (--shard), each its own rows
grids() {  # every grid of GRIDS ("N ARGS; ...") at once, N shards each, into $OUT/mqar.json; then the summary of all rows
  local grid n args i g=0 pids=()
  [ -n "${GRIDS:-}" ] || { log "PART=grids needs GRIDS=\"N ARGS; N ARGS; ...\""; exit 2; }
  while IFS= read -r grid; do
    read -r n args <<< "$grid"
    [ -n "${n:-}" ] || continue
    log "== grid $g: $n shards of: $L recall mqar $args (steps ${STEPS:-6000}, budget $BUDGET_S s)"
    for ((i = 0; i < n; i++)); do
      timeout 580 $L recall mqar --steps "${STEPS:-6000}" ${STOP_AT:+--stop-at $STOP_AT} $args --budget-s "$BUDGET_S" \
        --results "$OUT/mqar.json" --shard "$i/$n" ${EXTRA:-} > "$W/reports/mqar-grid$g-shard$i.log" 2>&1 &
      pids+=($!)
    done
    g=$((g + 1))
  done <<< "$(tr ';' '\n' <<< "$GRIDS")"
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; done
  for f in "$W"/reports/mqar-grid*.log; do log "   ${f##*/}: $(grep -c 'row done' "$f") rows"; tail -n 3 "$f" >> "$LOG"; done
  $L recall mqar --mixers attention --pairs 1 --seq-len 4 --budget-s 0 --results "$OUT/mqar.json" > /dev/null  # summary
  rm -f "$OUT/mqar.json.lock"
  pack
}
one_grid() {  # the grid of PART=mqar and PART=slots: PARALLEL shards over MIXERS x PAIRS x SLOTS x LRS
  echo "$PARALLEL" --mixers "$MIXERS" --pairs "${PAIRS:-16,32,64,128}" --slots "$SLOTS" --lrs "${LRS:-3e-4,1e-3,3e-3,1e-2}"
}
case "$PART" in
  mqar)
    MIXERS=${MIXERS:-all} SLOTS=${SLOTS:-64}
    resume mqar
    GRIDS=$(one_grid) grids
    cat "$OUT/mqar.md" ;;
  slots)
    MIXERS=${MIXERS:-lattice_exact} SLOTS=${SLOTS:-16,32,64,128}
    resume mqar
    GRIDS=$(one_grid) grids
    cat "$OUT/mqar.md" ;;
  grids)
    resume mqar
    grids
    cat "$OUT/mqar.md" ;;
  lm)
    resume lm
    step lm 580 $L recall lm --mixers "${MIXERS:-all}" --tokens "${TOKENS:-3276800}" --budget-s "$BUDGET_S" \
      --work "$W/lm" --results "$OUT/lm.json" ${EXTRA:-}
    cat "$OUT/lm.md" ;;
  passkey)
    # The teacher learns the task's format from answered documents up to 160 words (~210 tokens, within its 256).
    # On the CPU a tiny teacher needed 8000 such documents and 1600 steps to reach 0.3-0.55 at its training length,
    # seeing each document 3 times (README): hence TEACHER_TOKENS (1000 steps of 64 x 256) and STAGE2_TOKENS above the
    # recipes', and PASSKEY_DOCS so that this teacher too sees each document about 3 times (5.6M of the 16.4M tokens).
    # With 8000 documents (11 times each) the H100 teacher scored 0 at every length. That run fit one 10-minute call
    # (546 s: the teacher step 210 s, 141 s of it litgpt's data preparation; the distillation 215 s); the teacher's
    # limit leaves room for the larger corpus. A call that ends first is continued by the same command on the
    # still-warm machine (its $WORK is kept): it skips every finished step and resumes the distillation from its last
    # checkpoint.
    finished() {  # finished PATH NAME: PATH, which its step writes atomically or last, exists: say so (litgpt's
      # final checkpoint writes model_config.yaml after the weights and the tokenizer)
      [ -e "$1" ] && log "   $2: finished in an earlier call ($1)"
    }
    finished "$W/corpus/tokenizer" corpus ||
      step corpus 120 $L corpus "$W/corpus" --force --passkey-docs "${PASSKEY_DOCS:-40000}" --passkey-words 160
    finished "$W/teacher/final/model_config.yaml" teacher ||
      step teacher 420 env LATTICE_COMPILE=0 $L pretrain --config recipes/pretrain/teacher-small.yaml \
        --out_dir "$W/teacher" --tokenizer_dir "$W/corpus/tokenizer" --data.init_args.train_data_path "$W/corpus/train" \
        --data.init_args.val_data_path "$W/corpus/val" --train.max_tokens "${TEACHER_TOKENS:-16384000}"
    finished "$W/student" convert || step convert 120 $L convert "$W/teacher/final" --out "$W/student" --force
    use_checked_backend "$W/student"
    resume_distill=false  # an earlier call's checkpoints (stage<N>/step-*, stage1/final): continue them
    for c in "$W"/distill/stage*/step-* "$W"/distill/stage1/final; do [ -e "$c" ] && resume_distill=true; done
    finished "$W/distill/final" distill ||
      step distill 400 $L distill --config recipes/distill/small.yaml --teacher_dir "$W/teacher/final" \
        --student_dir "$W/student" --out_dir "$W/distill" --data.init_args.train_data_path "$W/corpus/train" \
        --data.init_args.val_data_path "$W/corpus/val" --devices 1 --stage2.max_tokens "${STAGE2_TOKENS:-1048576}" \
        --resume "$resume_distill"
    cp "$W/distill/report.json" "$OUT/passkey-distill-report.json" 2>/dev/null
    step passkey 150 $L recall passkey "$W/teacher/final" "$W/distill/final" \
      --lengths "${LENGTHS:-128,192,384,768,1536}" \
      --items "${ITEMS:-20}" --out "$W/passkey/passkey.json"
    cp "$W"/passkey/passkey.{json,md,png} "$OUT/" 2>/dev/null
    cat "$OUT/passkey.md" ;;
  checks)
    step checks 540 env OUT="$OUT" MIXERS="${MIXERS:-all}" python3 bench/fla_peer_check.py
    cat "$W/reports/checks.log" ;;
  *) log "unknown PART=$PART (mqar, slots, grids, lm, passkey, checks)"; exit 2 ;;
esac
log "done"
