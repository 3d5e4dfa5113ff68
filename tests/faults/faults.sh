#!/usr/bin/env bash
# Fault injection (ctest Faults.*): what a crash, a full disk or a lost rank leaves behind.
#   faults.sh CASE BIN_DIR WRITER TEXT WORK MPIEXEC
#   kill_save    a checkpoint writer SIGKILLed at 60 or more random moments (15 or more inside a
#                save): after each, the target is a complete checkpoint (kmoe-inspect --verify
#                clean) no older than the last one seen; the next save removes the temporary
#                files the killed writers left
#   full_disk    kmoe-train with out_dir on a 1.2 MB tmpfs that fills up: it stops with an I/O
#                error naming the checkpoint and the full disk, leaves no temporary file, and the
#                last checkpoint it wrote verifies and resumes once there is room
#   rank_killed  rank 1, then rank 0 (the one that renames checkpoints into place) of a 2-rank
#                kmoe-train SIGKILLed mid-run: the job ends (non-zero) within 60 s, no rank hangs,
#                and the last checkpoint verifies and resumes
set -euo pipefail
case_name=$1 bin=$2 writer=$3 text=$4 work=$5 mpiexec=$6
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export OMP_NUM_THREADS=1 OMP_PROC_BIND=false OMP_WAIT_POLICY=passive
"$bin/kmoe-data" "$text" tokens.h5 > /dev/null

config() {  # config OUT_DIR STEPS [extra JSON members]
  cat <<JSON
{"data": "tokens.h5", "out_dir": "$1", "batch_size": 2, "seq_len": 16, "steps": $2, "log_every": 2,
 "eval_every": 1000, "eval_batches": 1, "checkpoint_every": 4, "keep_checkpoints": 2, "seed": 5,
 "model_config": {"d_model": 32, "n_layers": 2, "n_heads": 2, "att_n_experts": 2, "ff_n_experts": 4,
                  "ff_expert_size": 16, "ff_k": 2, "group_size": 1}${3:-}}
JSON
}
verify() {  # verify CHECKPOINT: kmoe-inspect --verify must find it complete
  "$bin/kmoe-inspect" --verify "$1" > verify.txt 2>&1 || { echo "FAILED: $1 does not verify:"; cat verify.txt; exit 1; }
}
stored_seed() { "$bin/kmoe-inspect" --json "$1" | grep -o '"seed": *[0-9]*' | head -n 1 | grep -o '[0-9]*$'; }

case $case_name in
  kill_save)
    target=$PWD/killed.h5
    "$writer" "$target" 1 & pid=$!
    for _ in $(seq 200); do [[ -f $target ]] && break; sleep 0.05; done
    kill -KILL $pid; wait $pid 2> /dev/null || true
    # At least 60 kills and at least 15 of them inside a save (fewer land there when the writer
    # runs slower, e.g. under a sanitizer), at most 300.
    rounds=0 mid_save=0 last_seed=0
    while ((rounds < 60 || (mid_save < 15 && rounds < 300))); do
      round=$((rounds += 1))
      "$writer" "$target" $((round * 1000)) & pid=$!
      # From its first save on (start-up takes longer under a sanitizer), the writer saves in a
      # loop: a kill at a random moment after it lands at a random point of some save.
      for _ in $(seq 500); do ls -a | grep -q "^\.killed\.h5\.tmp-.*-$pid-" && break; sleep 0.01; done
      sleep "0.$(printf %03d $((RANDOM % 400)))"
      kill -KILL $pid; wait $pid 2> /dev/null || true
      # A temporary file left by this writer: the kill landed inside a save.
      ls -a | grep -q "^\.killed\.h5\.tmp-.*-$pid-" && mid_save=$((mid_save + 1))
      verify "$target"
      seed=$(stored_seed "$target")
      [[ $seed -ge $last_seed ]] || { echo "FAILED: round $round: the checkpoint went back from seed $last_seed to $seed"; exit 1; }
      last_seed=$seed
    done
    left=$(ls -a | grep -c '^\.killed\.h5\.tmp-' || true)
    [[ $mid_save -ge 15 ]] || { echo "FAILED: only $mid_save of $rounds kills landed inside a save"; exit 1; }
    # One more save that completes removes what the killed writers left.
    "$writer" "$target" 999999 & pid=$!
    for _ in $(seq 400); do [[ $(stored_seed "$target" 2> /dev/null) -ge 999999 ]] 2> /dev/null && break; sleep 0.05; done
    kill -KILL $pid; wait $pid 2> /dev/null || true
    verify "$target"
    remaining=$(ls -a | grep '^\.killed\.h5\.tmp-' | grep -vc -- "-$pid-" || true)
    [[ $remaining -eq 0 ]] || { echo "FAILED: $remaining temporary files of killed writers remain"; ls -a; exit 1; }
    echo "SIGKILL at $rounds random moments ($mid_save inside a save): the checkpoint verified every time and never went back; each new writer removed the temporaries of the killed ones ($left left at the end, 0 after one more save)"
    ;;
  full_disk)
    mkdir -p disk
    if ! mount -t tmpfs -o size=1200k tmpfs disk 2> mount.txt; then
      echo "SKIPPED: cannot mount a tmpfs here ($(cat mount.txt)): the full-disk path is covered by Checkpoint.FailedWriteLeavesTheOldFileAndNoTemporary (a file size limit)"
      exit 77
    fi
    trap 'umount "$PWD/disk"' EXIT
    config disk/run 40 > a.json
    set +e; "$bin/kmoe-train" a.json > a.txt 2>&1; rc=$?; set -e
    [[ $rc -ne 0 ]] || { echo "FAILED: 40 steps of checkpoints fitted on a 1.2 MB disk without an error"; cat a.txt; exit 1; }
    failed=$(grep -o 'disk/run/checkpoint-[0-9]*\.h5: cannot reserve [0-9]* bytes.*No space left on device' a.txt | head -n 1)
    [[ -n $failed ]] || { echo "FAILED: the error does not name the checkpoint and the full disk:"; cat a.txt; exit 1; }
    failed_step=$(echo "$failed" | grep -o 'checkpoint-[0-9]*' | grep -o '[0-9]*$')
    [[ ! -e disk/run/checkpoint-$failed_step.h5 ]] || { echo "FAILED: the failed checkpoint exists"; exit 1; }
    [[ -z $(ls -a disk/run | grep '\.tmp-') ]] || { echo "FAILED: temporary files left on the full disk:"; ls -la disk/run; exit 1; }
    last=$(ls disk/run/checkpoint-*.h5 | tail -n 1)
    verify "$last"
    # Room again: the run resumes from the last checkpoint that was written, and finishes.
    mount -o remount,size=8m disk
    "$bin/kmoe-train" a.json --resume > b.txt 2>&1 || { echo "FAILED: resuming from $last"; cat b.txt; exit 1; }
    grep -q "resumed from $last" b.txt && grep -q "step 40/40" b.txt || { echo "FAILED: did not resume from $last"; cat b.txt; exit 1; }
    echo "kmoe-train on a full 1.2 MB tmpfs: exit $rc, '$(echo "$failed" | cut -c1-150)'; $last verified, no temporary file; resumed to step 40 once there was room"
    ;;
  rank_killed)
    summary=""
    for victim_rank in 1 0; do
      config run$victim_rank 100000 ', "checkpoint_every": 2' > a$victim_rank.json
      start=$SECONDS
      "$mpiexec" --allow-run-as-root --oversubscribe -n 2 "$bin/kmoe-train" a$victim_rank.json > a.txt 2>&1 & job=$!
      # Any checkpoint (keep_checkpoints rotates the early ones away, maybe before the first look).
      for _ in $(seq 600); do compgen -G "run$victim_rank/checkpoint-*.h5" > /dev/null && break; sleep 0.1; done
      compgen -G "run$victim_rank/checkpoint-*.h5" > /dev/null \
        || { echo "FAILED: no checkpoint after 60 s"; cat a.txt; kill $job; exit 1; }
      sleep "0.$((RANDOM % 9))"
      victim=""  # the kmoe-train process whose environment names the rank
      for p in $(pgrep -f "kmoe-train a$victim_rank.json"); do
        tr '\0' '\n' < /proc/$p/environ 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$victim_rank" && victim=$p
      done
      [[ -n $victim ]] || { echo "FAILED: rank $victim_rank not found"; kill $job; exit 1; }
      kill -KILL "$victim"
      killed_at=$SECONDS
      for _ in $(seq 600); do kill -0 $job 2> /dev/null || break; sleep 0.1; done
      if kill -0 $job 2> /dev/null; then
        echo "FAILED: the job still runs 60 s after rank $victim_rank died"; pkill -KILL -f "kmoe-train a$victim_rank.json"; exit 1
      fi
      set +e; wait $job; rc=$?; set -e
      ended_after=$((SECONDS - killed_at))
      [[ $rc -ne 0 ]] || { echo "FAILED: mpirun exited 0 after rank $victim_rank was killed"; exit 1; }
      [[ -z $(pgrep -f "kmoe-train a$victim_rank.json") ]] || { echo "FAILED: a rank is still running"; exit 1; }
      last=$(ls run$victim_rank/checkpoint-*.h5 | tail -n 1)
      verify "$last"
      sed -i 's/"steps": 100000/"steps": 60/' a$victim_rank.json
      "$mpiexec" --allow-run-as-root --oversubscribe -n 2 "$bin/kmoe-train" a$victim_rank.json --resume > b.txt 2>&1 \
        || { echo "FAILED: resuming from $last"; cat b.txt; exit 1; }
      grep -q "resumed from $last" b.txt || { echo "FAILED: did not resume from $last"; cat b.txt; exit 1; }
      summary+="rank $victim_rank SIGKILLed $((killed_at - start)) s into the run: the job ended ${ended_after} s later (exit $rc), $last verified and resumed. "
    done
    echo "$summary"
    ;;
esac
