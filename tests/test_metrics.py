"""The metrics file that rank 0 writes into the run directory."""

import csv
import json

from dstrain.metrics import MetricsLogger


def test_jsonl_rows_hold_step_and_metrics(tmp_path):
    logger = MetricsLogger(tmp_path, "jsonl", is_rank0=True, max_steps=10, start_step=0)
    logger.log(1, {"loss": 5.5, "lr": 1e-4})
    logger.log(2, {"eval_loss": 4.0, "eval_perplexity": 54.6})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 5.5, "lr": 1e-4}, {"step": 2, "eval_loss": 4.0, "eval_perplexity": 54.6}]


def test_csv_is_long_form_and_appends_across_restarts(tmp_path):
    for step in (1, 2):
        logger = MetricsLogger(tmp_path, "csv", is_rank0=True, max_steps=10, start_step=step - 1)
        logger.log(step, {"loss": float(step)})
        logger.close()
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["step", "metric", "value"], ["1", "loss", "1.0"], ["2", "loss", "2.0"]]


def test_other_ranks_write_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, "jsonl", is_rank0=False, max_steps=10, start_step=0)
    logger.log(1, {"loss": 5.5})
    logger.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""
