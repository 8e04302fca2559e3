"""The metrics file that rank 0 writes into the run directory."""

import csv
import json

from dstrain.config import LoggerConfig
from dstrain.metrics import MetricsLogger


def _logger(directory, file, is_rank0=True, start_step=0):
    return MetricsLogger(directory, LoggerConfig(file=file), is_rank0=is_rank0, max_steps=10, start_step=start_step,
                         config={}, tracker_run_id=None)


def test_jsonl_rows_hold_step_and_metrics(tmp_path):
    logger = _logger(tmp_path, "jsonl")
    logger.log(1, {"loss": 5.5, "lr": 1e-4})
    logger.log(2, {"eval_loss": 4.0, "eval_perplexity": 54.6})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 5.5, "lr": 1e-4}, {"step": 2, "eval_loss": 4.0, "eval_perplexity": 54.6}]


def test_csv_is_long_form_and_appends_across_restarts(tmp_path):
    for step in (1, 2):
        logger = _logger(tmp_path, "csv", start_step=step - 1)
        logger.log(step, {"loss": float(step)})
        logger.close()
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["step", "metric", "value"], ["1", "loss", "1.0"], ["2", "loss", "2.0"]]


def test_other_ranks_write_nothing(tmp_path, capsys):
    logger = _logger(tmp_path, "jsonl", is_rank0=False)
    logger.log(1, {"loss": 5.5})
    logger.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""
