"""`dstrain report RUN_DIR`: PNG plots from a run's metrics file. No training: the tests write the file."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dstrain.commands import main
from dstrain.report import load_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_PIXELS = (450, 800)  # height, width: report.SIZE_IN at report.DPI
SUMMARY_PIXELS = (800, 1200)


def _dstrain(*args) -> subprocess.CompletedProcess:
    """The installed `dstrain` script, found next to this Python first (a virtualenv need not be activated)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("dstrain", path=search)
    assert script, "the dstrain command is not installed: pip install -e ."
    env = dict(os.environ, MPLBACKEND="")  # the report must not need a display or a backend setting
    return subprocess.run([script, "report", *map(str, args)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def _train_row(step: int, loss: float, full: bool) -> dict:
    row = {"step": step, "loss": loss, "lr": 1e-4 * min(step, 10) / 10}
    if full:  # an echoed step; the others carry only loss and lr
        row.update(grad_norm=loss / 10, tokens_per_s=1000.0 + step, samples_per_s=2.0, epoch=0,
                   loss_scale=65536.0, memory_gb_rank0=0.5)
    return row


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))  # json.dumps writes NaN as NaN


def _killed_and_resumed_rows():
    """Steps 1-7 (checkpoint at 4), killed; resumed from step 4 with another log_every, on to step 10."""
    rows = []
    for step in range(1, 8):
        rows.append(_train_row(step, 10.0 + step, full=step % 3 == 1))  # 'killed' losses: 11..17
        if step == 4:
            rows.append({"step": 4, "eval_loss": 9.5, "eval_perplexity": math.exp(9.5)})
            rows.append({"step": 4, "checkpoint_step": 4, "checkpoint_save_s": 0.1})
    for step in range(5, 11):
        rows.append(_train_row(step, float(step), full=step % 2 == 0))
    rows[-1]["loss"] = float("nan")  # a diverged last step
    rows[-1]["update_skipped"] = True
    rows.append({"step": 10, "eval_loss": 4.0, "eval_perplexity": math.exp(4.0)})
    return rows


def test_later_rows_replace_the_steps_a_resumed_run_repeated(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", _killed_and_resumed_rows())
    paths, series = load_metrics(tmp_path)
    assert paths == [tmp_path / "metrics.jsonl"]
    loss = series["loss"]
    assert sorted(loss) == list(range(1, 11))
    assert [loss[step] for step in range(1, 10)] == [11.0, 12.0, 13.0, 14.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert math.isnan(loss[10])
    # The killed run's grad_norm at step 7 is gone too, although the resumed run (log_every=2) logged none there.
    assert sorted(series["grad_norm"]) == [1, 4, 6, 8, 10]
    assert series["grad_norm"][4] == pytest.approx(1.4) and series["grad_norm"][6] == pytest.approx(0.6)
    assert series["eval_loss"] == {4: 9.5, 10: 4.0}
    assert "update_skipped" not in series  # not a number to plot


def test_report_writes_one_png_per_plot_and_a_summary(tmp_path):
    import matplotlib.image

    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    rows = _killed_and_resumed_rows()
    _write_jsonl(run_dir / "metrics.jsonl", rows)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 11, "loss": 3.')  # the last line of a run killed while writing it
    completed = _dstrain(run_dir)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert f"read {len(rows)} rows from {run_dir / 'metrics.jsonl'}" in completed.stdout
    assert f"skipped 1 unreadable line(s): {len(rows) + 1}" in completed.stdout
    names = ["loss.png", "lr.png", "grad_norm.png", "throughput.png", "summary.png"]
    for name in names:
        assert f"wrote {run_dir / 'report' / name}" in completed.stdout
    assert sorted(path.name for path in (run_dir / "report").iterdir()) == sorted(names)
    for name in names:
        path = run_dir / "report" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == (SUMMARY_PIXELS if name == "summary.png" else PLOT_PIXELS), name
        assert image.std() > 0.05, f"{name} looks blank"


def test_report_reads_long_form_csv_and_skips_absent_metrics(tmp_path, capsys):
    run_dir, output = tmp_path / "csv-run", tmp_path / "plots"
    run_dir.mkdir()
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "metric", "value"])
        for step in (1, 2, 3, 2, 3):  # resumed from step 1
            writer.writerows([[step, "loss", 5.0 - step], [step, "lr", 1e-3]])
        writer.writerows([[4, "loss", float("nan")], [4, "lr", 1e-3], [4, "update_skipped", True]])
        writer.writerow([4, "eval_loss", 3.5])
    main(["report", str(run_dir), "--output", str(output)])
    out = capsys.readouterr().out
    assert "skipped grad_norm.png: no grad_norm" in out
    assert "skipped throughput.png: no tokens_per_s" in out
    assert sorted(path.name for path in output.iterdir()) == ["loss.png", "lr.png", "summary.png"]
    assert not (run_dir / "report").exists()
    _, series = load_metrics(run_dir)
    assert [series["loss"][step] for step in (1, 2, 3)] == [4.0, 3.0, 2.0] and math.isnan(series["loss"][4])
    assert series["lr"] == {step: 1e-3 for step in (1, 2, 3, 4)} and series["eval_loss"] == {4: 3.5}


def test_report_without_a_metrics_file_is_a_clear_error(tmp_path):
    completed = _dstrain(tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        f"dstrain: config error: no metrics file in {tmp_path}: looked for metrics.jsonl and metrics.csv"
    )
    assert not (tmp_path / "report").exists()
