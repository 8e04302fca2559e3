"""Early stopping and the gradient-norm watch: the judging classes in process, the best checkpoint's pointer,
mark and retention through CheckpointManager.save on a one-process group, and real runs that stop early,
keep `best`, export it, and resume with the early-stopping state intact."""

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import train
from dstrain.checkpoint import BEST, MANIFEST, CheckpointManager, TrainState, follow_pointer, read_manifest
from dstrain.checks import validate
from dstrain.config import EarlyStoppingConfig, TrainConfig
from dstrain.early_stopping import EarlyStopping
from dstrain.errors import CheckpointError, ConfigError
from dstrain.grad_norm import GradNormWatch


def _judge_all(early_stopping, values, every=2):
    """Judge one evaluation per value, at steps every, 2 * every, ...; the state and which steps were new bests."""
    state, bests = TrainState(), []
    for index, value in enumerate(values, start=1):
        state, improved = early_stopping.judge(replace(state, step=index * every), {"eval_loss": value, "score": value})
        if improved:
            bests.append(state.step)
    return state, bests


def test_early_stopping_in_min_mode_counts_evaluations_that_do_not_beat_the_best_by_min_delta():
    early_stopping = EarlyStopping(EarlyStoppingConfig(enabled=True, patience=2, min_delta=0.1))
    state, bests = _judge_all(early_stopping, [3.0, 2.5, 2.45, 2.3])
    # 2.45 is not 0.1 below 2.5; 2.3 is: the count starts again.
    assert bests == [2, 4, 8]
    assert (state.best_value, state.best_step, state.evals_since_best) == (2.3, 8, 0)
    assert not early_stopping.patience_ran_out(state)

    state, bests = _judge_all(early_stopping, [3.0, 2.5, 2.45, 2.41])
    assert bests == [2, 4] and state.evals_since_best == 2 and early_stopping.patience_ran_out(state)
    message = early_stopping.stop_message(state)
    assert "early stopping at step 8" in message and "best eval_loss: 2.5 at step 4" in message


def test_early_stopping_in_max_mode_wants_higher_values_and_never_takes_a_nan():
    early_stopping = EarlyStopping(EarlyStoppingConfig(enabled=True, metric="score", mode="max", patience=3))
    state, bests = _judge_all(early_stopping, [math.nan, 0.2, 0.1, 0.2, 0.3])
    assert bests == [4, 10] and state.best_value == 0.3
    state, bests = _judge_all(early_stopping, [0.5, math.nan, 0.4, 0.5])
    assert bests == [2] and early_stopping.patience_ran_out(state)


def test_early_stopping_that_is_off_never_improves_or_stops_and_names_no_metric():
    early_stopping = EarlyStopping(EarlyStoppingConfig())
    state, bests = _judge_all(early_stopping, [3.0, 4.0, 5.0, 6.0, 7.0])
    assert bests == [] and state.best_step is None and not early_stopping.patience_ran_out(state)
    assert early_stopping.metric is None


def test_a_checkpoint_from_before_early_stopping_loads_with_an_empty_judgement():
    saved_by_an_older_version = {"step": 40, "samples_consumed": 640, "tracker_run_id": None}
    state = TrainState(**saved_by_an_older_version)
    assert (state.best_value, state.best_step, state.evals_since_best) == (None, None, 0)


def test_the_grad_norm_watch_warns_once_per_episode_outside_the_band(caplog):
    watch = GradNormWatch([0.1, 10.0], patience=3, speaks=True)
    norms = {1: 5.0, 2: 20.0, 3: 30.0, 4: 0.01, 5: 40.0, 6: 50.0, 7: 60.0, 8: 1.0, 9: 20.0, 10: 20.0, 11: 20.0}
    with caplog.at_level(logging.WARNING, logger="dstrain"):
        warned = {step: watch.observe(step, norm) for step, norm in norms.items()}
    # Above and below the band are one episode; it ends at step 8, and the next one warns again.
    assert [step for step, warning in warned.items() if warning] == [4, 11]
    assert "outside [0.1, 10] for 3 steps in a row, since step 2" in warned[4]
    assert "since step 9" in warned[11] and "lower optim.lr" in warned[11]
    assert [record.getMessage() for record in caplog.records] == [warned[4], warned[11]]


def test_the_grad_norm_watch_skips_nonfinite_norms_is_silent_off_rank_zero_and_can_be_off(caplog):
    quiet = GradNormWatch([0.1, 10.0], patience=2, speaks=False)
    with caplog.at_level(logging.WARNING, logger="dstrain"):
        warned = [quiet.observe(1, 20.0), quiet.observe(2, math.inf), quiet.observe(3, 20.0)]
    assert warned[:2] == [None, None] and warned[2] is not None and caplog.records == []
    for off in (GradNormWatch([], 3, speaks=True), GradNormWatch([0.1, 10.0], 0, speaks=True)):
        assert [off.observe(step, 1e6) for step in range(1, 10)] == [None] * 9


def _config(**early_stopping) -> TrainConfig:
    cfg = TrainConfig()
    cfg.trainer.early_stopping = EarlyStoppingConfig(enabled=True, **early_stopping)
    return cfg


def test_early_stopping_needs_evaluations_and_a_metric_they_report():
    validate(_config(metric="eval_perplexity", mode="max"))
    cfg = _config()
    cfg.trainer.eval_every = 0
    with pytest.raises(ConfigError, match=r"trainer\.eval_every=0 never evaluates"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"metric='bleu' is not a metric .* one of \['eval_loss', 'eval_perplexity'\]"):
        validate(_config(metric="bleu"))
    with pytest.raises(ConfigError, match=r"patience=0 must be at least 1"):
        validate(_config(patience=0))
    cfg = TrainConfig()
    cfg.trainer.grad_norm_band = [10.0, 1.0]
    with pytest.raises(ConfigError, match=r"grad_norm_band=\[10.0, 1.0\] must be \[low, high\]"):
        validate(cfg)


class _Engine:
    """What CheckpointManager.save asks of a DeepSpeed engine: one file per checkpoint."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, Path(directory) / tag / "mp_rank_00_model_states.pt")

    def zero_optimization_stage(self):
        return 0


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _saving_run(directory, keep_last):
    """save(state) as the loop saves: after judging, with the manager the trainer builds."""
    early_stopping = EarlyStopping(EarlyStoppingConfig(enabled=True, patience=3))
    manager = CheckpointManager(directory, 0, 1, {}, {}, keep_last, 0, best_metric=early_stopping.metric)
    state = TrainState()

    def evaluate_and_save(step, eval_loss):
        nonlocal state
        state, _ = early_stopping.judge(replace(state, step=step), {"eval_loss": eval_loss})
        manager.save(_Engine(), state)
        return state

    return manager, evaluate_and_save


def test_best_is_marked_pointed_at_unmarked_when_beaten_and_never_pruned(tmp_path, one_process_group):
    directory = tmp_path / "checkpoints"
    manager, evaluate_and_save = _saving_run(directory, keep_last=3)
    evaluate_and_save(2, 3.0)
    evaluate_and_save(4, 2.5)
    assert (directory / BEST).read_text() == "step_00000004"
    assert read_manifest(directory / "step_00000002")["best"] is False
    assert {key: value for key, value in read_manifest(directory / "step_00000004").items() if "best" in key} == {
        "best": True, "best_metric": "eval_loss", "best_value": 2.5}
    for step in (6, 8, 10):
        state = evaluate_and_save(step, 2.7)
    assert state.evals_since_best == 3
    assert [path.name for path in manager.checkpoints()] == ["step_00000004", "step_00000006", "step_00000008",
                                                            "step_00000010"]
    assert manager.best() == directory / "step_00000004" == follow_pointer(directory / BEST)
    assert read_manifest(directory / "step_00000010")["best"] is False


def test_a_run_resumed_from_an_older_checkpoint_points_best_back_at_that_state_s_best(tmp_path, one_process_group):
    directory = tmp_path / "checkpoints"
    manager, evaluate_and_save = _saving_run(directory, keep_last=0)
    evaluate_and_save(2, 3.0)
    evaluate_and_save(4, 2.5)
    # Resumed from step 2, whose state knows nothing of step 4; it saves step 3.
    manager.save(_Engine(), TrainState(step=3, best_value=3.0, best_step=2))
    assert manager.best() == directory / "step_00000002"
    assert read_manifest(directory / "step_00000002")["best"] is True
    assert read_manifest(directory / "step_00000004")["best"] is False


def test_best_and_latest_name_a_step_directory_and_a_missing_best_is_explained(tmp_path):
    from dstrain.loading import checked_manifest

    directory = tmp_path / "checkpoints"
    (directory / "step_00000004").mkdir(parents=True)
    (directory / "latest").write_text("step_00000004")
    assert follow_pointer(directory / "latest") == directory / "step_00000004"
    assert follow_pointer(directory / "step_00000004") == directory / "step_00000004"
    with pytest.raises(CheckpointError, match=r"checkpoints/best only when it trains with trainer\.early_stopping"):
        checked_manifest(follow_pointer(directory / BEST))


# A tiny run that evaluates every 2 steps and judges by a min_delta no evaluation can beat: the first
# evaluation (step 2) is the best, and with patience 3 the run stops at step 8, long before max_steps.
EARLY = (
    "trainer.eval_every=2", "trainer.eval_batches=1", "trainer.micro_batch_size=4", "trainer.save_every=0",
    "trainer.keep_last=1", "scheduler.warmup_steps=2", "trainer.early_stopping.enabled=true",
    "trainer.early_stopping.patience=3", "trainer.early_stopping.min_delta=100",
)


@pytest.mark.slow
def test_a_run_stops_early_keeps_best_through_pruning_and_exports_it(tmp_path):
    from dstrain.export import export_checkpoint

    # The gradient-norm watch rides along: this model's norms (about 2) stay above a band that ends at 0.5.
    run = train(tmp_path, *EARLY, "trainer.max_steps=40", "trainer.grad_norm_band=[0.1,0.5]",
                "trainer.grad_norm_patience=3", ranks=0)
    assert run.returncode == 0
    assert max(row["step"] for row in run.metrics()) == 8
    warnings = re.findall(r"gradient norm \S+ at step (\d+): outside \[0.1, 0.5\] for 3 steps in a row", run.output)
    assert warnings == ["3"], run.output[-3000:]
    assert re.search(r"early stopping at step 8: eval_loss has not improved by more than 100 for 3 evaluations.*"
                     r"best eval_loss: [0-9.]+ at step 2", run.output), run.output[-3000:]
    checkpoints = run.run_dir / "checkpoints"
    # keep_last=1 keeps the stop step's checkpoint, and the best survives it.
    assert sorted(path.name for path in checkpoints.glob("step_*")) == ["step_00000002", "step_00000008"]
    assert (checkpoints / BEST).read_text() == "step_00000002"
    manifest = json.loads((checkpoints / "step_00000002" / MANIFEST).read_text())
    eval_loss = {row["step"]: row["eval_loss"] for row in run.metrics() if "eval_loss" in row}
    assert (manifest["best"], manifest["best_metric"], manifest["best_value"]) == (True, "eval_loss", eval_loss[2])
    assert json.loads((checkpoints / "step_00000008" / MANIFEST).read_text())["best"] is False

    exported = export_checkpoint(checkpoints / BEST, tmp_path / "exported")
    assert exported.step == 2 and (tmp_path / "exported" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_resumed_run_keeps_the_early_stopping_state_and_stops_where_it_would_have(tmp_path):
    # Ended at step 6 by max_steps, two evaluations past the best; continued, the third (step 8) stops it, as
    # it stops the uninterrupted run above. A resume that forgot the state would take step 8 for a new best
    # and train on to step 14.
    interrupted = train(tmp_path, *EARLY, "trainer.max_steps=6", ranks=0)
    assert "done: step 6 of 6" in interrupted.output
    best = {row["step"]: row["eval_loss"] for row in interrupted.metrics() if "eval_loss" in row}[2]
    resumed = train(tmp_path, *EARLY, "trainer.max_steps=40", ranks=0)
    assert "resumed from" in resumed.output
    assert "early stopping at step 8: eval_loss has not improved by more than 100 for 3 evaluations" in resumed.output
    assert f"best eval_loss: {best:.6g} at step 2" in resumed.output
    assert max(row["step"] for row in resumed.metrics()) == 8
    assert (resumed.run_dir / "checkpoints" / BEST).read_text() == "step_00000002"

    # Started again, a run that stopped early has nothing left to do.
    again = train(tmp_path, *EARLY, "trainer.max_steps=40", ranks=0)
    assert "early stopping at step 8" in again.output and "saved checkpoint" not in again.output
