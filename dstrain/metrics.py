"""Where metrics go, from rank 0 only: the console, a metrics file in the run directory, and the trackers
that logger.* turns on (W&B, TensorBoard, MLflow). Each destination is a `MetricsSink` that gets the same rows.
"""

import csv
import json
import logging
import numbers
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from tqdm import tqdm

from dstrain.config import LoggerConfig, MlflowConfig, WandbConfig, flatten

log = logging.getLogger("dstrain")


class MetricsSink:
    def write(self, step: int, metrics: Dict[str, float]) -> None:
        raise NotImplementedError

    def checkpoint_saved(self, step: int, path: Path) -> None:
        """Most sinks record a save by its row alone (checkpoint_step, checkpoint_save_s)."""

    def close(self) -> None:
        raise NotImplementedError


class JsonlSink(MetricsSink):
    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvSink(MetricsSink):
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


class TensorBoardSink(MetricsSink):
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


class WandbSink(MetricsSink):
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


class MlflowSink(MetricsSink):
    """One MLflow run per training run: its id is kept in every checkpoint, so a resumed or requeued job logs on
    into the same run. The resolved config becomes the run's params, every row its metrics, and every save a
    tag `checkpoint/<tag>` holding the checkpoint's path. MLflow trouble never stops training: a store that
    cannot be reached at start, or a call that fails later, turns MLflow off with one warning."""

    def __init__(self, cfg: MlflowConfig, run_dir: Path, config: dict, run_id: Optional[str]):
        from mlflow.tracking import MlflowClient

        # Where MLflow cannot start, the checkpoint keeps the id it had, for the next resume to continue.
        self.run_id = run_id
        self._client = None
        tracking_uri = cfg.tracking_uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            self.run_id, logged = _mlflow_run(client, cfg, tracking_uri, run_dir.name, run_id)
            _log_config(client, self.run_id, mlflow_params(config), logged, cfg.tags)
        except Exception as error:  # noqa: BLE001 - no server, a bad URI, a locked database: all the same to training
            log.warning("MLflow could not start at %s (%s: %s); MLflow is off for this run, the metrics file keeps "
                        "everything.", tracking_uri, type(error).__name__, " ".join(str(error).split())[:500])
            return
        self._client = client
        log.info("MLflow run %s at %s", self.run_id, tracking_uri)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        # Only numbers are metrics in MLflow.
        values = [Metric(_mlflow_key(key), float(value), timestamp, step)
                  for key, value in metrics.items() if isinstance(value, numbers.Real)]
        self._call(lambda client: client.log_batch(self.run_id, metrics=values))

    def checkpoint_saved(self, step: int, path: Path) -> None:
        self._call(lambda client: client.set_tag(self.run_id, f"checkpoint/{path.name}", str(path)))

    def close(self) -> None:
        self._call(lambda client: client.set_terminated(self.run_id, "FINISHED"))

    def _call(self, call: Callable) -> None:
        if self._client is None:
            return
        try:
            call(self._client)
        except Exception as error:  # noqa: BLE001
            log.warning("MLflow logging failed (%s: %s); MLflow is off for the rest of this run, the metrics file "
                        "keeps everything.", type(error).__name__, " ".join(str(error).split())[:500])
            self._client = None


def _mlflow_run(client, cfg: MlflowConfig, tracking_uri: str, default_name: str,
                run_id: Optional[str]) -> Tuple[str, Dict[str, str]]:
    """The run to log into, and the params it already holds: the checkpoint's run, or a new one."""
    from mlflow.exceptions import MlflowException

    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("the checkpoint's MLflow run %s is not in %s (another tracking_uri?); starting a new MLflow "
                        "run", run_id, tracking_uri)
        else:
            client.update_run(run_id, status="RUNNING")
            return run_id, run.data.params
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=_artifact_location(tracking_uri))
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=cfg.run_name or default_name)
    return run.info.run_id, {}


def _artifact_location(tracking_uri: str) -> Optional[str]:
    """A SQLite store's artifacts go next to its database: MLflow's default is ./mlruns in whatever directory
    training was started from. A server has an artifact store of its own."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return str(Path(tracking_uri[len(prefix):]).resolve().parent / "mlflow-artifacts")


def _log_config(client, run_id: str, params: Dict[str, str], logged: Dict[str, str], tags: Dict[str, str]) -> None:
    """MLflow refuses to change a param, so a resumed run keeps the values it started with; a setting the
    resume changed (a larger trainer.max_steps, say) is recorded as the tag `resumed_with/<key>`."""
    from mlflow.entities import Param, RunTag

    new = [Param(key, value) for key, value in params.items() if key not in logged]
    changed = {f"resumed_with/{key}": value for key, value in params.items() if key in logged and logged[key] != value}
    client.log_batch(run_id, params=new, tags=[RunTag(key, str(value)) for key, value in {**tags, **changed}.items()])


# MLflow's limit on a param's value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH); longer ones are cut to fit.
MLFLOW_PARAM_LENGTH = 6000
CUT_MARK = "...[cut]"


def mlflow_params(config: dict) -> Dict[str, str]:
    """The resolved config as MLflow params: flattened keys (model.hidden_size) and values as text."""
    params = {}
    for key, value in flatten(config).items():
        text = str(value)
        if len(text) > MLFLOW_PARAM_LENGTH:
            text = text[: MLFLOW_PARAM_LENGTH - len(CUT_MARK)] + CUT_MARK
        params[_mlflow_key(key)] = text
    return params


def _mlflow_key(key: str) -> str:
    """MLflow names allow letters, digits, _ - . : / and spaces, up to 250 characters; keys under a mapping of
    the user's (data.fields.*) may hold anything else."""
    return re.sub(r"[^\w\-.:/ ]", "_", key)[:250]


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
        config: dict, tracker_run_id: Optional[str], mlflow_run_id: Optional[str] = None,
    ):
        self.is_rank0 = is_rank0
        self.sinks: List[MetricsSink] = []
        self.progress = None
        # The runs this training logs into (W&B's, MLflow's), for the checkpoints to keep.
        self.tracker_run_id, self.mlflow_run_id = tracker_run_id, mlflow_run_id
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
        if cfg.mlflow.enabled:
            mlflow_sink = MlflowSink(cfg.mlflow, run_dir, config, mlflow_run_id)
            self.mlflow_run_id = mlflow_sink.run_id
            self.sinks.append(mlflow_sink)
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

    def checkpoint_saved(self, step: int, path: Path, save_s: float) -> None:
        self.log(step, {"checkpoint_step": step, "checkpoint_save_s": save_s}, echo=False)
        for sink in self.sinks:
            sink.checkpoint_saved(step, path)

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
