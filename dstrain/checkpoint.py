"""Checkpoints that cannot be half-written, and resume that never trusts one that was.

Layout under <run dir>/checkpoints:
    step_00000100/      a complete checkpoint: DeepSpeed's files, rng_state_rank*.pt, manifest.json
    .staging-step_...   a save in progress (or one cut short): never loaded, removed by the next save
    latest              the newest complete tag, replaced atomically
    best                with trainer.early_stopping: the tag of the best evaluation's step, replaced atomically

Every rank writes its shards into the staging directory. After a barrier, rank 0 writes the manifest (every
file with its size, step, world size, ZeRO stage, parameter shapes), renames the directory into place, points
`latest` at it and prunes old checkpoints. A directory without a manifest, or whose files no longer match it,
is skipped with a log line saying why, and resume falls back to the one before.

With early stopping, the checkpoint that `best` names says so in its manifest ("best": true, with the
metric and its value), and pruning never removes it; one that was the best once and no longer is says
"best": false.
"""

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from importlib.metadata import version
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from dstrain.distributed import all_ranks_agree
from dstrain.errors import CheckpointError, ConfigError
from dstrain.optim import replay_adam_bias_correction

log = logging.getLogger("dstrain")

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
LATEST = "latest"
BEST = "best"
UNIVERSAL = "universal"
CONVERTED = "conversion_complete"
# Settings that say how to start or where the run lives, not what is trained: a change in these is not worth
# a warning.
RESUME_INDEPENDENT_KEYS = {"trainer.resume", "run.root", "run.name"}


@dataclass
class TrainState:
    step: int = 0
    # The data position: epoch and offset within it follow from this and the seed (dstrain.data.BatchPlan).
    samples_consumed: int = 0
    # The W&B run this training logs into, so that a resumed or requeued job continues it.
    tracker_run_id: Optional[str] = None
    # The same for MLflow; None in checkpoints from before dstrain logged to MLflow.
    mlflow_run_id: Optional[str] = None
    # Early stopping (dstrain.early_stopping): the best value of its metric so far, the step it was measured
    # at, and the evaluations since then that did not improve on it. Checkpoints from before early stopping
    # existed load with these defaults.
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        # Dropout on a GPU draws from the device's generator, not the CPU's.
        state["accelerator"] = accelerator.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_directory(path: Path) -> None:
    """Make renames in path durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def follow_pointer(path: Path) -> Path:
    """checkpoints/latest or checkpoints/best as the step directory it names; any other path as it is."""
    if path.name in (LATEST, BEST) and path.is_file():
        return path.parent / path.read_text().strip()
    return path


def problem_with(path: Path) -> Optional[str]:
    """Why the checkpoint at path cannot be loaded, or None if it looks whole."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as error:
        return f"no readable {MANIFEST} ({error})"
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        if file.suffix == ".pt":
            try:
                # mmap reads the archive's index and pickled structure, not the tensor data.
                torch.load(file, map_location="cpu", mmap=True, weights_only=False)
            except Exception as error:  # noqa: BLE001 - any unreadable file disqualifies the checkpoint
                return f"{name} cannot be read ({type(error).__name__}: {error})"
    return None


@dataclass(frozen=True)
class DataIdentity:
    """What a checkpoint records of the data it was trained on (dstrain.preparation)."""

    # The data fingerprint: inputs' contents, data settings, tokenizer. Empty: not known (nothing to compare).
    fingerprint: str = ""
    # The chat template that rendered instruction data; generation and export build prompts with it.
    chat_template: Optional[str] = None


class CheckpointManager:
    def __init__(
        self, directory: Path, rank: int, world_size: int, fingerprint: dict, config: dict, keep_last: int,
        keep_every: int, data: DataIdentity = DataIdentity(), changed_data: str = "refuse",
        best_metric: Optional[str] = None,
    ):
        self.directory = directory
        # The metric early stopping judges by (None: off): a state's best step is marked, named `best`, kept.
        self.best_metric = best_metric
        self.data = data
        # data.changed_on_resume: "refuse" or "warn" when a checkpoint's data fingerprint differs.
        self.changed_data = changed_data
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.fingerprint = fingerprint
        self.keep_last = keep_last
        self.keep_every = keep_every

    def checkpoints(self) -> List[Path]:
        """Directories that have a manifest, oldest first. Whether their files are whole is checked at load."""
        if not self.directory.is_dir():
            return []
        found = [path for path in self.directory.glob("step_*") if (path / MANIFEST).is_file()]
        return sorted(found, key=lambda path: read_manifest(path)["step"])

    def save(self, engine, state: TrainState) -> Path:
        tag = f"step_{state.step:08d}"
        staging = self.directory / f"{STAGING_PREFIX}{tag}"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(leftover)
        dist.barrier()
        client_state = {
            "train_state": asdict(state),
            # ds_to_universal needs this key to convert ZeRO-1/2 checkpoints for another world size.
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }
        engine.save_checkpoint(str(self.directory), tag=staging.name, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), staging / f"rng_state_rank{self.rank}.pt")
        # DeepSpeed writes its shards without fsync; the manifest must not reach the disk before they do, or a
        # host crash could leave a "complete" checkpoint with missing data.
        os.sync()
        dist.barrier()
        final = self.directory / tag
        if self.rank == 0:
            files = {
                str(file.relative_to(staging)): file.stat().st_size for file in sorted(staging.rglob("*")) if file.is_file()
            }
            manifest = {
                "step": state.step,
                "samples_consumed": state.samples_consumed,
                "world_size": self.world_size,
                "zero_stage": engine.zero_optimization_stage(),
                "versions": {name: version(name) for name in ("dstrain", "deepspeed", "torch", "transformers")},
                "config": self.config,
                "parameters": self.fingerprint,
                "data": asdict(self.data),
                "files": files,
                **self._best_mark(state, state.best_step == state.step),
            }
            _write_atomically(staging / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # the same step saved again after resuming from an older checkpoint
                shutil.rmtree(final)
            os.rename(staging, final)
            _write_atomically(self.directory / LATEST, tag)
            self._point_best_at(state)
            _fsync_directory(self.directory)
            self._prune()
        dist.barrier()
        return final

    def _best_mark(self, state: TrainState, best: bool) -> dict:
        """What a manifest says about early stopping: nothing when it is off."""
        if self.best_metric is None:
            return {}
        if not best:
            return {"best": False}
        return {"best": True, "best_metric": self.best_metric, "best_value": state.best_value}

    def best(self) -> Optional[Path]:
        """The checkpoint `best` names, or None."""
        pointer = self.directory / BEST
        return follow_pointer(pointer) if pointer.is_file() else None

    def _point_best_at(self, state: TrainState) -> None:
        """Make `best` name the saved state's best step, and only that checkpoint's manifest say best; rank 0.
        The pointer follows the state just saved, so a run resumed from an older checkpoint points back at
        that state's best."""
        if self.best_metric is None or state.best_step is None:
            return
        best, previous = self.directory / f"step_{state.best_step:08d}", self.best()
        if best == previous or not (best / MANIFEST).is_file():
            return
        # Saved as best, unless a run resumed from an older checkpoint comes back to a best it had unmarked.
        if read_manifest(best).get("best") is not True:
            self._mark(best, state, True)
        _write_atomically(self.directory / BEST, best.name)
        if previous is not None and (previous / MANIFEST).is_file():
            self._mark(previous, state, False)

    def _mark(self, path: Path, state: TrainState, best: bool) -> None:
        manifest = {key: value for key, value in read_manifest(path).items() if not key.startswith("best")}
        _write_atomically(path / MANIFEST, json.dumps({**manifest, **self._best_mark(state, best)}, indent=1))

    def _prune(self) -> None:
        """Keep the newest keep_last checkpoints, every keep_every-th step and the one `best` names; called on
        rank 0 only, after the newest checkpoint is complete."""
        if self.keep_last <= 0:
            return
        existing, best = self.checkpoints(), self.best()
        for path in existing[: -self.keep_last]:
            step = read_manifest(path)["step"]
            if (self.keep_every and step % self.keep_every == 0) or path == best:
                continue
            shutil.rmtree(path)

    def candidates(self, resume: str) -> List[Path]:
        """Checkpoints to try, in order, for trainer.resume; empty for a fresh start."""
        existing = self.checkpoints()
        if resume == "auto":
            return existing[::-1]
        if resume == "must":
            if not existing:
                raise ConfigError(
                    f"trainer.resume=must, but {self.directory} holds no complete checkpoint: check run.name and "
                    f"run.root, or use trainer.resume=auto to start there from step 0."
                )
            return existing[::-1]
        if resume == "never":
            if existing:
                raise ConfigError(
                    f"{self.directory} already holds checkpoints (newest: {existing[-1].name}). "
                    f"Continue with trainer.resume=auto, or start a separate run with run.name=<new name>."
                )
            return []
        path = Path(resume).resolve()
        if not (path / MANIFEST).is_file():
            raise ConfigError(
                f"trainer.resume={resume}: {path} is not a complete dstrain checkpoint (no {MANIFEST}). "
                f"Point it at a step_* directory that has one, or use trainer.resume=auto."
            )
        return [path]

    def choose(self, resume: str) -> Optional[Path]:
        """The newest checkpoint that trainer.resume allows and whose files are whole; None for a fresh start.
        Called before the engine exists, so that a checkpoint from another world size can be converted."""
        candidates = self.candidates(resume)
        for path in candidates:
            self.check_same_model(path)
            self.check_same_data(path)
            problem = problem_with(path)
            if all_ranks_agree(problem is None):
                return path
            if resume not in ("auto", "must"):
                raise CheckpointError(
                    f"trainer.resume={resume}: the checkpoint is damaged: {problem or 'another rank found a bad file'}."
                    f" Point trainer.resume at another step_* directory, or use trainer.resume=auto."
                )
            if problem is not None:
                log.warning("skipping checkpoint %s: %s", path, problem)
        if resume == "must":
            raise CheckpointError(
                f"trainer.resume=must, but no checkpoint in {self.directory} can be loaded (the warnings above say "
                f"why): use trainer.resume=auto to start there from step 0."
            )
        if candidates:
            log.warning("no loadable checkpoint in %s; starting from step 0", self.directory)
        return None

    def needs_universal(self, path: Path) -> bool:
        """ZeRO shards are cut for the world size they were saved on; loading them on another world size
        goes through DeepSpeed's universal checkpoint format."""
        manifest = read_manifest(path)
        return manifest["world_size"] != self.world_size and manifest["zero_stage"] > 0

    def convert_to_universal(self, path: Path) -> None:
        """Convert once, on rank 0, into <checkpoint>/universal; later restarts reuse the result."""
        target = path / UNIVERSAL
        if self.rank == 0 and not (target / CONVERTED).is_file():
            log.info("converting %s from %d ranks to DeepSpeed's universal format for %d ranks",
                     path, read_manifest(path)["world_size"], self.world_size)
            shutil.rmtree(target, ignore_errors=True)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                       "--input_folder", str(path), "--output_folder", str(target)]
            converted = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if converted.returncode != 0:
                raise RuntimeError(f"ds_to_universal failed on {path}:\n{converted.stdout[-4000:]}")
            (target / CONVERTED).touch()
        dist.barrier()

    def load(self, engine, path: Path) -> TrainState:
        manifest = read_manifest(path)
        self._warn_about_changed_settings(manifest.get("config", {}))
        load_dir, tag = (path, UNIVERSAL) if self.needs_universal(path) else (path.parent, path.name)
        _, client_state = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint at {path}")
        replay_adam_bias_correction(engine)
        rng_file = path / f"rng_state_rank{self.rank}.pt"
        if manifest["world_size"] == self.world_size:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("resumed from %s at step %d", path, manifest["step"])
        return TrainState(**client_state["train_state"])

    def _warn_about_changed_settings(self, saved: dict) -> None:
        changed = [
            f"{key}: {saved.get(key)!r} -> {value!r}"
            for key, value in self.config.items()
            if saved.get(key) != value and key not in RESUME_INDEPENDENT_KEYS
        ]
        if changed:
            log.warning("resuming with changed settings: %s", "; ".join(changed))

    def check_same_data(self, path: Path) -> None:
        saved = read_manifest(path).get("data", {}).get("fingerprint")
        if not saved or not self.data.fingerprint or saved == self.data.fingerprint:
            return
        what = (f"the checkpoint {path} was trained on other data (data fingerprint {saved}; this run's is "
                f"{self.data.fingerprint}): an input file's contents, a data.* setting or the tokenizer changed")
        if self.changed_data == "warn":
            log.warning("%s; resuming anyway (data.changed_on_resume=warn), so the data order is not the one the "
                        "checkpoint continued", what)
            return
        raise CheckpointError(
            f"{what}. Resuming would not continue the same run. Restore the data, start a new run with "
            f"run.name=<new name>, or resume anyway with data.changed_on_resume=warn."
        )

    def check_same_model(self, path: Path) -> None:
        saved = read_manifest(path)["parameters"]
        if saved == self.fingerprint:
            return
        missing = sorted(set(saved) - set(self.fingerprint))
        extra = sorted(set(self.fingerprint) - set(saved))
        reshaped = sorted(name for name in set(saved) & set(self.fingerprint) if saved[name] != self.fingerprint[name])
        details = []
        if reshaped:
            name = reshaped[0]
            details.append(f"{name} is {saved[name]} in the checkpoint but {self.fingerprint[name]} in this model")
        if missing:
            details.append(f"{len(missing)} checkpoint parameters are not in this model (first: {missing[0]})")
        if extra:
            details.append(f"{len(extra)} model parameters are not in the checkpoint (first: {extra[0]})")
        raise CheckpointError(
            f"the checkpoint {path} is from another model: {'; '.join(details)}. "
            f"Resume with the model config it was trained with, or start a new run with run.name=<new name>."
        )
