"""Walk two DSTRAIN_DUMP directories in step order and report the first quantity that differs bitwise."""
import sys
from pathlib import Path

import torch


def flat(prefix, obj, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            flat(f"{prefix}.{k}", v, out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flat(f"{prefix}[{i}]", v, out)
    else:
        out[prefix] = obj


def same(a, b):
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


a_dir, b_dir = Path(sys.argv[1]), Path(sys.argv[2])
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 5
names = sorted({p.name for p in b_dir.glob("*.pt")} & {p.name for p in a_dir.glob("*.pt")},
               key=lambda n: (n.split("_")[1], n.split("_")[2], ["pre", "bwd", "post"].index(n.split("_")[3][:-3])))
shown = 0
for name in names:
    fa, fb = {}, {}
    flat("", torch.load(a_dir / name, weights_only=False), fa)
    flat("", torch.load(b_dir / name, weights_only=False), fb)
    diffs = []
    for k in fa:
        if "opt_ptrs" in k:
            continue
        if k not in fb:
            diffs.append(f"{k}: missing in second")
        elif not same(fa[k], fb[k]):
            if torch.is_tensor(fa[k]) and fa[k].is_floating_point() and fa[k].shape == fb[k].shape:
                d = (fa[k].double() - fb[k].double()).abs()
                diffs.append(f"{k}: {int((d > 0).sum())}/{d.numel()} elems differ, max {d.max().item():.3g}"
                             f"{' dtype ' + str(fa[k].dtype) + ' vs ' + str(fb[k].dtype) if fa[k].dtype != fb[k].dtype else ''}")
            else:
                diffs.append(f"{k}: {fa[k]!r} vs {fb[k]!r}"[:300])
    if diffs:
        print(f"== {name}: {len(diffs)} differences")
        for d in diffs[:40]:
            print("   ", d)
        shown += 1
        if shown >= limit:
            break
    else:
        print(f"== {name}: identical")
