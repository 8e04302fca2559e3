"""Compare two run directories: per-step losses (bitwise) and the final checkpoint's fp32 weights."""
import json
import sys
from pathlib import Path

import torch


def losses(run):
    out = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def fp32_weights(run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = Path(run) / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    manifest = json.loads((ckpt / tag / "manifest.json").read_text())
    if manifest["zero_stage"] == 0:
        sd = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


a, b = sys.argv[1:3]
la, lb = losses(a), losses(b)
common = sorted(set(la) & set(lb))
diff = [s for s in common if la[s] != lb[s]]
print(f"steps compared {common[0]}..{common[-1]}; first differing step: {diff[0] if diff else None}"
      f"{'' if not diff else f' ({la[diff[0]]!r} vs {lb[diff[0]]!r}); {len(diff)} differ'}")
wa, wb = fp32_weights(a), fp32_weights(b)
worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
equal = all(torch.equal(wa[k], wb[k]) for k in wa)
print(f"final fp32 weights equal: {equal} (max abs diff {worst:.3g})")
