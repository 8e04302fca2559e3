"""Which checkpoint trainer.resume picks, without training: CheckpointManager on directories the test writes."""

import json

import pytest

from dstrain.checkpoint import MANIFEST, CheckpointManager
from dstrain.errors import ConfigError


def _manager(directory):
    return CheckpointManager(directory, rank=0, world_size=1, fingerprint={}, config={}, keep_last=3, keep_every=0)


def _complete(directory, step):
    path = directory / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"step": step, "files": {}}))
    return path


def test_resume_must_without_any_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.resume=must, but .* holds no complete checkpoint"):
        _manager(tmp_path / "checkpoints").candidates("must")


def test_resume_must_and_auto_try_the_newest_complete_checkpoint_first(tmp_path):
    directory = tmp_path / "checkpoints"
    older, newer = _complete(directory, 4), _complete(directory, 8)
    (directory / ".staging-step_00000012").mkdir()
    (directory / "step_00000016").mkdir()  # no manifest: never a candidate
    for resume in ("must", "auto"):
        assert _manager(directory).candidates(resume) == [newer, older]


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    _complete(tmp_path / "checkpoints", 4)
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest: step_00000004\)"):
        _manager(tmp_path / "checkpoints").candidates("never")
