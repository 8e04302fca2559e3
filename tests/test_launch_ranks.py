"""tests/launch_ranks.py, which most 2-rank tests start their ranks with, against DeepSpeed's launcher: the same
environment and arguments for each rank, and the same exit when a rank fails."""

import json
import subprocess
import sys

import pytest

from conftest import LAUNCH_RANKS, _env, _free_port

# Each rank writes what the launcher gave it, then rank 1 fails with FAIL_CODE if asked while rank 0 waits.
RANK_SCRIPT = """
import json, os, sys, time
from pathlib import Path
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")
out = Path(os.environ["OUT"])
seen = {key: os.environ.get(key) for key in keys}
(out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"env": seen, "argv": sys.argv[1:]}))
print(f"rank {os.environ['RANK']} here", flush=True)
if os.environ.get("FAIL_CODE"):
    if os.environ["RANK"] == "1":
        sys.exit(int(os.environ["FAIL_CODE"]))
    time.sleep(600)
"""


def _launch(tmp_path, launcher, name, **env):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(_free_port())
    command = [*launcher, "--num_gpus", "2", "--master_port", port, str(script), "+model=tiny", "x=1"]
    done = subprocess.run(command, cwd=tmp_path, env=dict(_env(), OUT=str(out), **env), capture_output=True,
                          text=True, timeout=120)
    seen = {path.name: json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))}
    for rank in seen.values():
        assert rank["env"].pop("MASTER_PORT") == port
    return done, seen


@pytest.mark.slow
def test_each_rank_gets_what_deepspeeds_launcher_gives_it(tmp_path):
    ours, ours_seen = _launch(tmp_path, [sys.executable, str(LAUNCH_RANKS)], "ours")
    theirs, theirs_seen = _launch(tmp_path, ["deepspeed"], "theirs")
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert sorted(ours_seen) == ["rank0.json", "rank1.json"]
    assert ours_seen == theirs_seen
    assert ours_seen["rank1.json"]["argv"] == ["--local_rank=1", "+model=tiny", "x=1"]
    assert "rank 0 here" in ours.stdout and "rank 1 here" in ours.stdout


@pytest.mark.slow
def test_a_failed_rank_stops_the_others_and_its_code_is_the_launchers(tmp_path):
    """Rank 0 would wait 600 s, past the 120 s timeout; both launchers terminate it when rank 1 exits 3, and exit 3."""
    ours, _ = _launch(tmp_path, [sys.executable, str(LAUNCH_RANKS)], "ours", FAIL_CODE="3")
    theirs, _ = _launch(tmp_path, ["deepspeed"], "theirs", FAIL_CODE="3")
    assert ours.returncode == theirs.returncode == 3
