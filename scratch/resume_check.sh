#!/bin/bash
# Usage: resume_check.sh <workdir> <resume_step> [nprocs] -- <overrides...>
# Runs the command uninterrupted (saving every 4 steps, keeping all), then copies the run directory,
# drops the checkpoints after <resume_step>, reruns the same command (it resumes) and compares losses
# per step and the final fp32 weights.
set -e
source /work/wt13/scratch/env.sh
WORK=$1; RESUME=$2; NP=$3; shift 4
mkdir -p $WORK && cd $WORK
run() {
  if [ "$NP" = 1 ]; then timeout 900 python /work/wt13/launch/train.py "$@"
  else timeout 900 deepspeed --num_gpus $NP --master_port $((20000 + RANDOM % 20000)) /work/wt13/launch/train.py "$@"; fi
}
COMMON="trainer.max_steps=40 trainer.save_every=4 trainer.eval_every=0 data.seq_len=64 trainer.keep_last=0 run.root=$WORK/out"
if [ ! -f $WORK/out/ref/checkpoints/step_00000040/manifest.json ]; then
  run "$@" $COMMON run.name=ref > $WORK/ref.log 2>&1 || { echo ref failed; tail -20 $WORK/ref.log; exit 1; }
fi
rm -rf $WORK/out/res; mkdir -p $WORK/out/res
cp -r $WORK/out/ref/.hydra $WORK/out/res/ 2>/dev/null || true
mkdir -p $WORK/out/res/checkpoints
cp -r $WORK/out/ref/checkpoints/step_$(printf %08d $RESUME) $WORK/out/res/checkpoints/
echo step_$(printf %08d $RESUME) > $WORK/out/res/checkpoints/latest
run "$@" $COMMON run.name=res > $WORK/res.log 2>&1 || { echo res failed; tail -20 $WORK/res.log; exit 1; }
python /work/wt13/scratch/compare_runs.py $WORK/out/ref $WORK/out/res
