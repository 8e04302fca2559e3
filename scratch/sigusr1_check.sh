#!/bin/bash
# Usage: sigusr1_check.sh <workdir with out/ref from resume_check.sh> <stop after step> -- <overrides>
# Starts the same command on 2 ranks under run.name=sig, sends SIGUSR1 to rank 1 once step N is logged
# (it saves and exits 75), reruns it (it resumes), then compares with the uninterrupted out/ref.
source /work/wt13/scratch/env.sh
WORK=$1; STOP=$2; shift 3
cd $WORK; rm -rf out/sig
COMMON="trainer.max_steps=40 trainer.save_every=4 trainer.eval_every=0 data.seq_len=64 trainer.keep_last=0 run.root=$WORK/out"
launch() { timeout 900 deepspeed --num_gpus 2 --master_port $((20000 + RANDOM % 20000)) /work/wt13/launch/train.py "$@" $COMMON run.name=sig; }
launch "$@" > sig1.log 2>&1 &
until grep -q "\"step\": $STOP[,}]" out/sig/metrics.jsonl 2>/dev/null; do sleep 0.2; done
pid=$(pgrep -f -- "--local_rank=1 .*run.name=sig" | head -1); kill -USR1 $pid; wait; echo "first launch exit: $(grep -o 'exits with return code = [0-9]*' sig1.log | tail -1)"
grep -o "saved at step [0-9]*" sig1.log | head -1
launch "$@" > sig2.log 2>&1; echo "rerun exit $?; $(grep -o 'resumed from .* at step [0-9]*' sig2.log | head -1)"
python /work/wt13/scratch/compare_runs.py out/ref out/sig 2>&1 | grep -E "^steps|^final"
