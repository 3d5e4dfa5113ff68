#!/usr/bin/env bash
# kmoe-data + kmoe-train end to end (ctest Train.*): a few steps at W = 1 and 2, resume equal to
# uninterrupted (bitwise at the same W; within 1e-6 at another W), SIGTERM then resume, and the
# bad inputs. usage: driver.sh CASE BIN_DIR TEXT WORK MPIEXEC
set -euo pipefail
case_name=$1 bin=$2 text=$3 work=$4 mpiexec=$5
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export OMP_NUM_THREADS=1 OMP_PROC_BIND=false
mpirun() { "$mpiexec" --allow-run-as-root --oversubscribe -n "$@"; }
"$bin/kmoe-data" "$text" tokens.h5 > /dev/null

config() {  # config OUT_DIR BATCH [extra JSON members]
  cat <<JSON
{"data": "tokens.h5", "out_dir": "$1", "batch_size": $2, "seq_len": 16, "steps": 12, "log_every": 2,
 "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "keep_checkpoints": 2, "seed": 5,
 "model_config": {"d_model": 32, "n_layers": 2, "n_heads": 2, "att_n_experts": 2, "ff_n_experts": 4,
                  "ff_expert_size": 16, "ff_k": 2, "group_size": 1}${3:-}}
JSON
}
last_row() { tail -n 1 "$1/metrics.csv" | cut -d, -f1-6; }  # step, losses, lr, grad norm
expect_fail() {  # expect_fail EXIT_CODE PATTERN command...
  local want=$1 pattern=$2; shift 2
  set +e; "$@" > out.txt 2>&1; local rc=$?; set -e
  if [[ $rc -ne $want ]] || ! grep -q -- "$pattern" out.txt; then
    echo "FAILED: '$*' exited $rc (expected $want) and said:"; cat out.txt; exit 1
  fi
}

case $case_name in
  w1|w2)
    W=${case_name#w}
    config a 2 > a.json
    mpirun "$W" "$bin/kmoe-train" a.json > a.txt
    grep -q "on $W MPI rank" a.txt && grep -q "step 12/12" a.txt && grep -q "wrote a/checkpoint-00000012.h5" a.txt
    [[ $(ls a/checkpoint-*.h5 | wc -l) -eq 2 ]] || { echo "keep_checkpoints = 2 not kept"; exit 1; }
    # Resume equals uninterrupted, bitwise at the same W.
    config b 2 > b.json
    mpirun "$W" "$bin/kmoe-train" b.json --stop-after 6 > b1.txt
    grep -q "stopped on request after step 6" b1.txt
    mpirun "$W" "$bin/kmoe-train" b.json --resume > b2.txt
    grep -q "resumed from b/checkpoint-00000006.h5" b2.txt
    [[ "$(last_row a)" == "$(last_row b)" ]] || { echo "resumed: $(last_row b) vs uninterrupted: $(last_row a)"; exit 1; }
    echo "resume at W = $W equals the uninterrupted run: $(last_row a)"
    ;;
  other_w)
    # The same global batch (4 sequences) at W = 2 then W = 1: within 1e-6 of the run at W = 1.
    config a 4 > a.json
    "$bin/kmoe-train" a.json > a.txt
    config b 2 > b2.json
    config b 4 > b1.json
    mpirun 2 "$bin/kmoe-train" b2.json --stop-after 6 > b1.txt
    "$bin/kmoe-train" b1.json --resume > b2.txt
    awk -F, -v a="$(last_row a)" 'BEGIN { split(a, x, ","); } { for (i = 2; i <= 3; ++i) { d = $i - x[i]; if (d < 0) d = -d;
        if (d > 1e-6 * (x[i] < 0 ? -x[i] : x[i])) { print "column " i ": " $i " vs " x[i]; bad = 1 } } } END { exit bad }' \
        <<< "$(last_row b)"
    echo "resume at W = 1 of a run at W = 2 matches: $(last_row b) vs $(last_row a)"
    ;;
  sigterm)
    config a 2 ', "steps": 4000' | sed 's/"steps": 12,//' > a.json
    "$bin/kmoe-train" a.json > a1.txt 2>&1 &
    pid=$!
    for _ in $(seq 100); do [[ -f a/metrics.csv ]] && [[ $(wc -l < a/metrics.csv) -ge 3 ]] && break; sleep 0.1; done
    kill -TERM $pid
    wait $pid
    grep -q "stopped on request after step" a1.txt
    stopped=$(grep -o "stopped on request after step [0-9]*" a1.txt | grep -o "[0-9]*$")
    sed -i 's/"steps": 4000/"steps": '$((stopped + 4))'/' a.json
    "$bin/kmoe-train" a.json --resume > a2.txt
    grep -q "resumed from a/checkpoint-$(printf %08d "$stopped").h5" a2.txt
    grep -q "step $((stopped + 4))/$((stopped + 4))" a2.txt
    echo "SIGTERM after step $stopped: checkpoint written, resumed to step $((stopped + 4))"
    ;;
  regression)
    # The regression task learns a known function: eval MSE below 0.02 in 300 steps (the targets'
    # variance is about 0.21); resume at W = 2 equals the uninterrupted W = 2 run bitwise;
    # kmoe-infer gives the same outputs on 1 and 3 ranks; each runner refuses the other's task.
    "$bin/kmoe-data" --regression reg.h5 > /dev/null
    regression_config() {  # OUT_DIR STEPS
      cat <<JSON
{"task": "regression", "model": "moe_stack", "data": "reg.h5", "out_dir": "$1", "batch_size": 64, "steps": $2,
 "lr": 3e-3, "min_lr": 1e-4, "log_every": 50, "eval_every": 100, "eval_batches": 4, "checkpoint_every": 100,
 "model_config": {"d_model": 32, "n_blocks": 2, "moe_kind": "sigma_moe", "moe": {"n_experts": 8, "expert_size": 32, "k": 2}}}
JSON
    }
    regression_config learn 300 > learn.json
    "$bin/kmoe-train" learn.json > learn.txt
    grep -q "| load [0-9.]* |" learn.txt || { echo "moe_stack: no expert load in the progress lines"; exit 1; }
    awk -F, 'END { if (!($3 < 0.02)) { print "eval MSE " $3 " is not below 0.02"; exit 1 } }' learn/metrics.csv
    echo "learned: eval MSE $(tail -n 1 learn/metrics.csv | cut -d, -f3) after 300 steps"
    regression_config a 40 > a.json
    regression_config b 40 > b.json
    mpirun 2 "$bin/kmoe-train" a.json > a.txt
    mpirun 2 "$bin/kmoe-train" b.json --stop-after 20 > b1.txt
    mpirun 2 "$bin/kmoe-train" b.json --resume > b2.txt
    [[ "$(last_row a)" == "$(last_row b)" ]] || { echo "resumed: $(last_row b) vs uninterrupted: $(last_row a)"; exit 1; }
    "$bin/kmoe-infer" learn/checkpoint-00000300.h5 --input reg.h5 --output out1.h5 > /dev/null
    mpirun 3 "$bin/kmoe-infer" learn/checkpoint-00000300.h5 --input reg.h5 --output out3.h5 --batch 500 > /dev/null
    h5diff -d 1e-6 out1.h5 out3.h5
    config lm 2 > lm.json
    "$bin/kmoe-train" lm.json > /dev/null
    expect_fail 2 "not a regression model" "$bin/kmoe-infer" lm/checkpoint-00000012.h5 --input reg.h5 --output x.h5
    expect_fail 2 "not a language model" "$bin/kmoe-generate" learn/checkpoint-00000300.h5 --prompt "x"
    sed 's/"d_model": 32,/"d_model": 32, "d_in": 5,/' learn.json > wide.json
    expect_fail 2 "d_in = 5, but /inputs of reg.h5 has 3 columns" "$bin/kmoe-train" wide.json
    sed 's/"model": "moe_stack"/"model": "moeut_lm"/' learn.json > wrong.json
    expect_fail 2 "the regression task trains model 'moe_stack'" "$bin/kmoe-train" wrong.json
    # The lm task with moe_lm (σ-MoE or ST-MoE feed-forwards) at W = 2: it learns and resumes bitwise.
    for kind in sigma_moe st_moe; do
      moe='{"n_experts": 4, "expert_size": 16, "k": 2}'
      [[ $kind == st_moe ]] && moe='{"num_experts": 4, "expert_hidden_mult": 2}'
      for run in u r; do
        cat > $kind-$run.json <<JSON
{"data": "tokens.h5", "out_dir": "$kind-$run", "model": "moe_lm", "batch_size": 2, "seq_len": 16, "steps": 12,
 "log_every": 2, "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "seed": 5,
 "model_config": {"d_model": 32, "n_layers": 2, "n_heads": 2, "moe_kind": "$kind", "moe": $moe}}
JSON
      done
      mpirun 2 "$bin/kmoe-train" $kind-u.json > $kind-u.txt
      grep -q "| load [0-9.]* |" $kind-u.txt || { echo "moe_lm $kind: no expert load in the progress lines"; exit 1; }
      mpirun 2 "$bin/kmoe-train" $kind-r.json --stop-after 6 > /dev/null
      mpirun 2 "$bin/kmoe-train" $kind-r.json --resume > /dev/null
      [[ "$(last_row $kind-u)" == "$(last_row $kind-r)" ]] || { echo "moe_lm $kind resumed differently"; exit 1; }
      awk -F, 'NR == 2 { first = $2 } END { if (!($2 < first)) { print "moe_lm: loss did not drop"; exit 1 } }' \
          $kind-u/metrics.csv
    done
    echo "regression: learns, resumes bitwise, infers alike on 1 and 3 ranks, refuses the wrong task"
    ;;
  bf16)
    # Mixed precision ("precision": "bfloat16" in model_config) trains like float32: 60 steps of the
    # same model, data and seed; every logged training loss within 1% of the float32 run's, the
    # eval loss at the end within 1%, and both runs learn (final loss well below the first).
    config f32 2 ', "steps": 60, "log_every": 5, "eval_every": 60' | sed 's/"steps": 12, //' > f32.json
    sed 's/"out_dir": "f32"/"out_dir": "b16"/; s/"group_size": 1}/"group_size": 1, "precision": "bfloat16"}/' f32.json > b16.json
    grep -q '"precision": "bfloat16"' b16.json
    "$bin/kmoe-train" f32.json > f32.txt
    "$bin/kmoe-train" b16.json > b16.txt
    paste -d, <(tail -n +2 f32/metrics.csv | cut -d, -f1-3) <(tail -n +2 b16/metrics.csv | cut -d, -f1-3) | awk -F, '
      { if ($1 != $4) { print "step " $1 " vs " $4; bad = 1 }
        d = $5 - $2; if (d < 0) d = -d; if (d > 0.01 * $2) { print "step " $1 ": bf16 loss " $5 " vs float32 " $2; bad = 1 }
        if ($3 != "") { e = $6 - $3; if (e < 0) e = -e; if (e > 0.01 * $3) { print "step " $1 ": bf16 eval " $6 " vs " $3; bad = 1 } }
        if ($5 == $2) same++
        if (NR == 1) first = $2; last = $2; rows = NR; diff += d / $2 }
      END { if (same == rows) { print "bf16 losses equal float32 bitwise: the bf16 path did not run"; bad = 1 }
            if (last > 0.9 * first) { print "no learning: " first " -> " last; bad = 1 }
            printf "bf16 tracks float32 over %d logged steps: mean relative difference %.2e, loss %.4f -> %.4f\n", rows, diff / rows, first, last
            exit bad }'
    ;;
  bad_input)
    config a 2 > good.json
    sed 's/"seed": 5/"seed": 5, "colour": 1/' good.json > unknown.json
    expect_fail 2 "colour" "$bin/kmoe-train" unknown.json
    sed 's/tokens.h5/missing.h5/' good.json > missing.json
    expect_fail 2 "missing.h5: no such token dataset" "$bin/kmoe-train" missing.json
    echo "not hdf5" > text.h5
    sed 's/tokens.h5/text.h5/' good.json > notdata.json
    expect_fail 2 "not an HDF5 file" "$bin/kmoe-train" notdata.json
    sed 's/"ff_k": 2,/"ff_k": 2, "n_tokens": 100,/' good.json > vocab.json
    expect_fail 2 "smaller than the data's vocabulary of 256" "$bin/kmoe-train" vocab.json
    sed 's/"seq_len": 16/"seq_len": 1000000/' good.json > long.json
    expect_fail 2 "too few for seq_len" "$bin/kmoe-train" long.json
    expect_fail 2 "not valid JSON" "$bin/kmoe-train" <(echo '{"data": ')
    # A token dataset cut short: refused as damaged before step 1.
    head -c $(( $(stat -c %s tokens.h5) / 2 )) tokens.h5 > cut.h5
    sed 's/tokens.h5/cut.h5/' good.json > cut.json
    expect_fail 2 "cut.h5" "$bin/kmoe-train" cut.json
    # A checkpoint of another model in out_dir: refused before any step.
    "$bin/kmoe-train" good.json > /dev/null
    sed 's/"d_model": 32/"d_model": 48/' good.json > other.json
    expect_fail 2 "config" "$bin/kmoe-train" other.json --resume
    # A diverging run stops naming the step, keeping the last good checkpoint.
    sed 's/"seed": 5/"seed": 5, "lr": 1e30, "warmup_steps": 0, "clip_norm": 0, "out_dir": "nan"/; s/"out_dir": "a",//' \
        good.json > nan.json
    expect_fail 3 "step [0-9]*: .*NaN.*stopped" "$bin/kmoe-train" nan.json
    echo "bad inputs: every one refused with its message"
    ;;
esac
