"""Where metrics go, from rank 0 only: the console, a metrics file in the run directory, and the trackers
that logger.* turns on (W&B, TensorBoard). Each destination is a `MetricsSink` that gets the same rows.
"""

import csv
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Protocol

from tqdm import tqdm

from dstrain.config import LoggerConfig, WandbConfig

log = logging.getLogger("dstrain")


class MetricsSink(Protocol):
    def write(self, step: int, metrics: Dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvSink:
    """Train and eval rows have different keys, so each row is written in long form: step, metric, value."""

    def __init__(self, path: Path):
        is_new = not path.exists()
        self._file = open(path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file)
        if is_new:
            self._writer.writerow(["step", "metric", "value"])

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        self._writer.writerows([step, key, value] for key, value in metrics.items())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, directory: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run may repeat steps that a killed run already wrote: purge_step hides those.
        self._writer = SummaryWriter(str(directory), purge_step=start_step + 1 if start_step else None, flush_secs=10)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per training run: its id is kept in every checkpoint, so a resumed or requeued job logs on
    into the same run. W&B trouble never stops training: init falls back to offline, and a failing log call
    turns W&B off for the rest of the run, each with one warning."""

    def __init__(self, cfg: WandbConfig, directory: Path, name: str, config: dict, run_id: Optional[str]):
        import wandb

        self._wandb = wandb
        # A W&B sweep agent names the run it created for this point in WANDB_RUN_ID.
        self.run_id = run_id or os.environ.get("WANDB_RUN_ID") or secrets.token_hex(6)
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        settings = dict(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags), name=cfg.name or name,
            config=config, id=self.run_id, resume="allow", dir=str(directory),
        )
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        try:
            self._run = wandb.init(**settings, mode=mode, settings=wandb.Settings(init_timeout=cfg.init_timeout_s))
        except Exception as error:  # noqa: BLE001 - no key, no network, a server error: all the same to training
            if mode != "online":
                raise
            log.warning(
                "W&B could not start online (%s: %s); logging offline to %s instead. Upload later with "
                "`wandb sync %s`.", type(error).__name__, " ".join(str(error).split()), directory / "wandb", directory / "wandb" / "offline-run-*",
            )
            # The failed attempt still holds the run id in W&B's service process; start a fresh one.
            wandb.teardown()
            self._run = wandb.init(**settings, mode="offline")
        log.info("W&B run %s (%s)", self.run_id, self._run.settings.mode)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B logging failed (%s: %s); W&B is off for the rest of this run, the metrics file "
                        "keeps everything.", type(error).__name__, error)
            self._run = None

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()


# Kept in the sinks for checking a run afterwards, not worth a place on the console.
NOT_ON_CONSOLE = {"batch_digest"}


def _format(metrics: Dict[str, float]) -> str:
    """One console line; per-rank values (memory_gb/rank3) stay in the sinks, the console gets their maximum."""
    parts = []
    for key, value in metrics.items():
        if "/rank" in key or key in NOT_ON_CONSOLE:
            continue
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}" if abs(value) < 1e4 else f"{key}={value:.0f}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLogger:
    """Rank 0 writes every row to every sink, and shows a progress bar on a terminal; elsewhere (a SLURM log,
    a pipe) the echoed rows are plain lines with an ETA. Other ranks do nothing."""

    def __init__(
        self, run_dir: Path, cfg: LoggerConfig, is_rank0: bool, max_steps: int, start_step: int,
        config: dict, tracker_run_id: Optional[str],
    ):
        self.is_rank0 = is_rank0
        self.sinks: List[MetricsSink] = []
        self.progress = None
        self.tracker_run_id = tracker_run_id
        self._max_steps, self._start_step = max_steps, start_step
        self._started = time.perf_counter()
        if not is_rank0:
            return
        self.sinks.append(JsonlSink(run_dir / "metrics.jsonl") if cfg.file == "jsonl" else CsvSink(run_dir / "metrics.csv"))
        if cfg.tensorboard.enabled:
            self.sinks.append(TensorBoardSink(run_dir / "tensorboard", start_step))
        if cfg.wandb.enabled:
            wandb_sink = WandbSink(cfg.wandb, run_dir, run_dir.name, config, tracker_run_id)
            self.tracker_run_id = wandb_sink.run_id
            self.sinks.append(wandb_sink)
        if sys.stderr.isatty():
            self.progress = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: Dict[str, float], echo: bool = True) -> None:
        if not self.is_rank0:
            return
        for sink in self.sinks:
            sink.write(step, metrics)
        if echo:
            line = f"step {step} {_format(metrics)}"
            if self.progress is not None:
                self.progress.write(line)
            else:
                log.info("%s%s", line, self._eta(step))

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0 or step >= self._max_steps:
            return ""
        return f" eta={_duration((time.perf_counter() - self._started) / done * (self._max_steps - step))}"

    def advance(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
            self.progress.set_postfix(loss=f"{loss:.4f}", tokens_per_s=f"{tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        for sink in self.sinks:
            sink.close()
