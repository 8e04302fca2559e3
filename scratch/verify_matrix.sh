#!/bin/bash
# For each configuration: an uninterrupted 2-rank run, then resumes from its step-12 checkpoint with the
# fix (default) and, if OFF=1, with it disabled (needs the temporary DSTRAIN_NO_ADAM_REPLAY toggle).
NP=${NP:-2}
BASE=${BASE:-/tmp/i13/m}
i=0
while read -r name overrides; do
  { [ -z "$name" ] || [ "${name:0:1}" = "#" ]; } && continue
  echo "### $name: $overrides"
  W=$BASE/$name
  /work/wt13/scratch/resume_check.sh $W 12 $NP -- $overrides 2>&1 | grep -v Warn | sed 's/^/  fix on : /'
  if [ "$OFF" = 1 ]; then
    mv $W/out/res $W/out/res_on
    DSTRAIN_NO_ADAM_REPLAY=1 /work/wt13/scratch/resume_check.sh $W 12 $NP -- $overrides 2>&1 | grep -v Warn | sed 's/^/  fix off: /'
  fi
done <<'CONFIGS'
z0_fp32 +zero=0 +precision=fp32 trainer.micro_batch_size=2
z1_fp32 +zero=1 +precision=fp32 trainer.micro_batch_size=2
z1_bf16 +zero=1 +precision=bf16 trainer.micro_batch_size=2
z1_bf16_ga3 +zero=1 +precision=bf16 trainer.gradient_accumulation_steps=3 trainer.micro_batch_size=2
z2_fp32 +zero=2 +precision=fp32 trainer.micro_batch_size=2
z2_bf16 +zero=2 +precision=bf16 trainer.micro_batch_size=2
z3_fp32 +zero=3 +precision=fp32 trainer.micro_batch_size=2
z3_bf16 +zero=3 +precision=bf16 trainer.micro_batch_size=2
CONFIGS
