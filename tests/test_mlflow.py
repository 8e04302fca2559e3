"""MLflow for real: runs logged into SQLite stores (and a server that is not there), read back with
MlflowClient. One training run, stopped at max_steps and continued with a larger one, logs to W&B (offline) and
MLflow at once; the slow tests read it."""

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import train
from dstrain.checkpoint import TrainState
from dstrain.compose import compose
from dstrain.config import TrainConfig
from dstrain.metrics import CUT_MARK, MLFLOW_PARAM_LENGTH, MetricsLogger, mlflow_params
from wandb_offline import find_runs

MLFLOW_RUN_LINE = re.compile(r"MLflow run (\w+) at sqlite:///")


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _logger(run_dir: Path, cfg: TrainConfig, mlflow_run_id=None) -> MetricsLogger:
    return MetricsLogger(run_dir, cfg.logger, is_rank0=True, max_steps=10, start_step=0, config=asdict(cfg),
                         tracker_run_id=None, mlflow_run_id=mlflow_run_id)


def test_the_mlflow_option_turns_mlflow_on_with_a_store_in_the_run_directory_by_default():
    cfg = compose(["+logger=mlflow", "+logger.mlflow.tags.team=nlp"], run_name="x")
    mlflow = cfg.logger.mlflow
    assert mlflow.enabled and mlflow.tracking_uri is None and mlflow.run_name is None
    assert mlflow.experiment == "dstrain" and mlflow.tags == {"team": "nlp"}
    assert cfg.logger.file == "jsonl" and not cfg.logger.wandb.enabled


def test_params_are_the_flattened_config_cut_to_mlflow_limits():
    config = asdict(TrainConfig())
    config["data"]["fields"] = {"prompt (en)!": "instruction"}
    config["data"]["train_files"] = [f"/data/shard-{index:05d}.jsonl" for index in range(400)]
    params = mlflow_params(config)
    assert params["model.hidden_size"] == "64" and params["optim.lr"] == "0.001"
    assert params["data.clean.min_chars"] == "0" and params["logger.mlflow.tracking_uri"] == "None"
    assert params["data.fields.prompt _en__"] == "instruction", "MLflow refuses ( ) and ! in names"
    files = params["data.train_files"]
    assert len(files) == MLFLOW_PARAM_LENGTH and files.endswith(CUT_MARK) and files.startswith("['/data/shard-00000")


def test_a_checkpoint_from_before_mlflow_resumes_without_an_mlflow_run():
    saved_before_mlflow = {"step": 8, "samples_consumed": 64, "tracker_run_id": "abc123"}
    assert TrainState(**saved_before_mlflow) == TrainState(8, 64, "abc123", mlflow_run_id=None)


def test_a_run_id_the_store_does_not_have_starts_a_new_run_with_a_warning(tmp_path, caplog):
    cfg = TrainConfig()
    cfg.logger.mlflow.enabled = True
    cfg.logger.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg.logger.mlflow.run_name = "moved"
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="dstrain"):
        logger = _logger(tmp_path / "run", cfg, mlflow_run_id="0" * 32)
    logger.log(1, {"loss": 2.5, "lr": 0.001, "note": "not a number, not a metric"})
    logger.close()
    assert "the checkpoint's MLflow run 00000000000000000000000000000000 is not in" in caplog.text
    run = _client(cfg.logger.mlflow.tracking_uri).get_run(logger.mlflow_run_id)
    assert run.info.run_name == "moved" and run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 2.5, "lr": 0.001}
    # Artifacts of a SQLite store go next to the database, not into the directory training started from.
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlflow-artifacts"))


def test_a_server_that_is_not_there_turns_mlflow_off_and_keeps_the_checkpoints_run_id(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = TrainConfig()
    cfg.logger.mlflow.enabled = True
    # Nothing listens on port 9.
    cfg.logger.mlflow.tracking_uri = "http://127.0.0.1:9"
    with caplog.at_level(logging.WARNING, logger="dstrain"):
        logger = _logger(tmp_path, cfg, mlflow_run_id="f" * 32)
        logger.log(1, {"loss": 2.5})
        logger.checkpoint_saved(1, tmp_path / "checkpoints" / "step_00000001", 0.1)
        logger.close()
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("MLflow could not start at http://127.0.0.1:9"), warnings
    assert logger.mlflow_run_id == "f" * 32, "the next resume may reach the server: keep the run to continue"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 1, "checkpoint_step": 1, "checkpoint_save_s": 0.1}]


# A tiny run in one plain process: stopped after step 4 (a checkpoint), continued to step 8 (another).
TRACKED = ("+logger=[wandb,mlflow]", "+logger.mlflow.tags.team=nlp", "scheduler.warmup_steps=1",
           "trainer.eval_every=4", "trainer.eval_batches=1", "trainer.save_every=4", "logger.log_every=2",
           "trainer.micro_batch_size=4")


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """(the run directory, the first job's output, the resumed job's output)."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        first = train(tmp_path, *TRACKED, "trainer.max_steps=4", name="tracked", ranks=0)
        resumed = train(tmp_path, *TRACKED, "trainer.max_steps=8", name="tracked", ranks=0)
    assert "at step 4" in resumed.output
    return first.run_dir, first.output, resumed.output


def _the_mlflow_run(run_dir: Path):
    client = _client(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dstrain").experiment_id])
    return client, run


@pytest.mark.slow
def test_params_are_the_resolved_config_the_run_started_with(resumed_run):
    run_dir, _, _ = resumed_run
    _, run = _the_mlflow_run(run_dir)
    first_config = json.loads((run_dir / "checkpoints" / "step_00000004" / "manifest.json").read_text())["config"]
    params = run.data.params
    assert params == {key: str(value) for key, value in first_config.items()}
    assert params["model.hidden_size"] == "64" and params["zero.stage"] == "0" and params["optim.lr"] == "0.001"
    assert params["data.clean.near_dedup"] == "False" and params["logger.mlflow.enabled"] == "True"
    assert params["trainer.max_steps"] == "4", "MLflow params never change"
    assert run.data.tags["resumed_with/trainer.max_steps"] == "8"
    assert run.data.tags["team"] == "nlp" and run.info.run_name == "tracked" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_every_step_is_a_metric_and_the_resumed_job_continues_the_same_run(resumed_run):
    run_dir, first, resumed = resumed_run
    client, run = _the_mlflow_run(run_dir)
    (first_id,) = MLFLOW_RUN_LINE.findall(first)
    (resumed_id,) = MLFLOW_RUN_LINE.findall(resumed)
    assert first_id == resumed_id == run.info.run_id
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    assert sorted(losses) == list(range(1, 9))
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(metric.step, metric.value) for metric in history] == sorted(losses.items())
    eval_steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "eval_loss")]
    assert eval_steps == [4, 8]
    assert {metric.step for metric in client.get_metric_history(run.info.run_id, "grad_norm")} == {1, 2, 4, 6, 8}


@pytest.mark.slow
def test_every_save_is_recorded_with_its_path(resumed_run):
    run_dir, _, _ = resumed_run
    client, run = _the_mlflow_run(run_dir)
    saves = {key: value for key, value in run.data.tags.items() if key.startswith("checkpoint/")}
    checkpoints = run_dir / "checkpoints"
    assert saves == {f"checkpoint/{tag}": str(checkpoints / tag) for tag in ("step_00000004", "step_00000008")}
    steps = client.get_metric_history(run.info.run_id, "checkpoint_step")
    assert [(metric.step, metric.value) for metric in steps] == [(4, 4.0), (8, 8.0)]


@pytest.mark.slow
def test_the_checkpoint_keeps_both_the_wandb_and_the_mlflow_run(resumed_run):
    run_dir, _, _ = resumed_run
    _, run = _the_mlflow_run(run_dir)
    (wandb_id,) = {offline.run_id for offline in find_runs(run_dir / "wandb")}
    for tag in ("step_00000004", "step_00000008"):
        client_state = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
        assert client_state["train_state"]["tracker_run_id"] == wandb_id
        assert client_state["train_state"]["mlflow_run_id"] == run.info.run_id
