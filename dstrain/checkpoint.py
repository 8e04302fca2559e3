"""DeepSpeed checkpoints in <run dir>/checkpoints/step_NNNNNNNN, each completed by a manifest.

Every rank calls save and load (ZeRO shards live on every rank). A checkpoint counts only once rank 0 has
written `manifest.json` after all ranks finished writing, so a save cut short is never resumed from.
"""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from dstrain.config import ConfigError

MANIFEST = "manifest.json"


@dataclass
class TrainState:
    step: int = 0
    samples_consumed: int = 0


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class CheckpointManager:
    def __init__(self, directory: Path, rank: int, world_size: int, fingerprint: dict):
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self.fingerprint = fingerprint

    def complete_checkpoints(self):
        """Complete checkpoint directories, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [path for path in self.directory.glob("step_*") if (path / MANIFEST).is_file()]
        return sorted(found, key=lambda path: json.loads((path / MANIFEST).read_text())["step"])

    def save(self, engine, state: TrainState) -> Path:
        tag = f"step_{state.step:08d}"
        client_state = {
            "train_state": asdict(state),
            # ds_to_universal needs this key to convert ZeRO-1/2 checkpoints for another world size.
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state)
        path = self.directory / tag
        torch.save(_rng_state(), path / f"rng_state_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            manifest = {
                "step": state.step,
                "samples_consumed": state.samples_consumed,
                "world_size": self.world_size,
                "zero_stage": engine.zero_optimization_stage(),
                "parameters": self.fingerprint,
            }
            (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        dist.barrier()
        return path

    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint that trainer.resume asks for, or None for a fresh start."""
        existing = self.complete_checkpoints()
        if resume == "auto":
            return existing[-1] if existing else None
        if resume == "never":
            if existing:
                raise ConfigError(
                    f"{self.directory} already holds checkpoints (newest: {existing[-1].name}). "
                    f"Continue with trainer.resume=auto, or start a separate run with run.name=<new name>."
                )
            return None
        path = Path(resume).resolve()
        if not (path / MANIFEST).is_file():
            raise ConfigError(
                f"trainer.resume={resume}: {path} is not a complete dstrain checkpoint (no {MANIFEST}). "
                f"Point it at a step_* directory that has one, or use trainer.resume=auto."
            )
        return path

    def load(self, engine, path: Path) -> TrainState:
        manifest = json.loads((path / MANIFEST).read_text())
        self._check_same_model(path, manifest["parameters"])
        _, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client_state is None:
            raise ConfigError(f"DeepSpeed could not load the checkpoint at {path}")
        rng_file = path / f"rng_state_rank{self.rank}.pt"
        if manifest["world_size"] == self.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return TrainState(**client_state["train_state"])

    def _check_same_model(self, path: Path, saved: dict) -> None:
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
        raise ConfigError(
            f"the checkpoint {path} is from another model: {'; '.join(details)}. "
            f"Resume with the model config it was trained with, or start a new run with run.name=<new name>."
        )
