"""`dstrain report RUN_DIR`: PNG plots of a run's metrics file, for runs without W&B or TensorBoard.

The metrics file is the run directory's `metrics.jsonl` (one object per row) or `metrics.csv` (long form:
step, metric, value), or both when a resumed run switched `logger.file`. A run resumed from a checkpoint
appends, and repeats the steps after that checkpoint: a row that goes back to an earlier step (or repeats a
metric at the last step) replaces everything logged from that step on, as TensorBoard's purge_step does.
"""

import csv
import json
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from dstrain.errors import ConfigError

METRICS_FILES = ("metrics.jsonl", "metrics.csv")
Series = Dict[str, Dict[int, float]]  # metric -> step -> value
Row = Tuple[int, Dict[str, float]]

# (file name, title, metrics drawn on the same axes)
PLOTS = (
    ("loss", "loss", ("loss", "eval_loss")),
    ("lr", "learning rate", ("lr",)),
    ("grad_norm", "gradient norm", ("grad_norm",)),
    ("throughput", "throughput (tokens/s)", ("tokens_per_s",)),
)
SIZE_IN, SUMMARY_SIZE_IN, DPI = (8, 4.5), (12, 8), 100  # 800x450 and 1200x800 pixels


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # update_skipped, and anything else that is not a number
    return float(value)


def _jsonl_rows(path: Path, bad_lines: List[int]) -> Iterator[Row]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # json reads the NaN and Infinity that json.dumps wrote
                step = int(row.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                bad_lines.append(number)  # e.g. a line cut short by a killed run
                continue
            yield step, {key: v for key, v in ((key, _number(value)) for key, value in row.items()) if v is not None}


def _csv_rows(path: Path, bad_lines: List[int]) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as handle:
        for number, fields in enumerate(csv.reader(handle), 1):
            if not fields or fields == ["step", "metric", "value"]:
                continue
            if len(fields) == 3 and fields[2] in ("True", "False"):
                continue  # update_skipped
            try:
                step, metric, text = fields
                row = int(step), {metric: float(text)}  # float() reads nan and inf
            except ValueError:
                bad_lines.append(number)
                continue
            yield row


def _merge(rows: Iterator[Row], series: Series) -> int:
    count, last_step = 0, None
    for step, values in rows:
        repeats = step == last_step and any(step in series.get(metric, {}) for metric in values)
        if last_step is not None and (step < last_step or repeats):
            # A run resumed from an earlier checkpoint: its rows replace what the killed run logged from here on.
            for points in series.values():
                for stale in [s for s in points if s >= step]:
                    del points[stale]
        for metric, value in values.items():
            series.setdefault(metric, {})[step] = value
        count, last_step = count + 1, step
    return count


def load_metrics(run_dir) -> Tuple[List[Path], Series]:
    """The metrics file(s) of RUN_DIR, oldest first, and every numeric metric as {step: value}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory (expected a run directory with {' or '.join(METRICS_FILES)})")
    paths = [run_dir / name for name in METRICS_FILES if (run_dir / name).is_file()]
    paths.sort(key=lambda path: path.stat().st_mtime)  # both: a resumed run switched logger.file
    if not paths:
        raise ConfigError(f"no metrics file in {run_dir}: looked for {' and '.join(METRICS_FILES)}")
    series: Series = {}
    for path in paths:
        bad_lines: List[int] = []
        reader = _jsonl_rows if path.suffix == ".jsonl" else _csv_rows
        count = _merge(reader(path, bad_lines), series)
        print(f"read {count} rows from {path}")
        if bad_lines:
            print(f"  skipped {len(bad_lines)} unreadable line(s): {', '.join(map(str, bad_lines[:10]))}")
    return paths, series


def _draw(axes, series: Series, metrics, title: str) -> None:
    from matplotlib.ticker import EngFormatter, MaxNLocator

    labelled = 0
    for metric in metrics:
        points = series.get(metric)
        if not points:
            continue
        steps = sorted(points)
        values = [points[s] if math.isfinite(points[s]) else math.nan for s in steps]  # NaN/inf: a gap
        few = metric.startswith("eval_") or len(steps) <= 50
        axes.plot(steps, values, label=metric, marker="o" if few else None, markersize=3, linewidth=1.2)
        labelled += 1
    bad = sorted({s for metric in metrics for s, v in series.get(metric, {}).items() if not math.isfinite(v)})
    if bad:  # marked along the bottom of the axes, whatever the y range
        axes.scatter(bad, [0.02] * len(bad), marker="x", color="red", transform=axes.get_xaxis_transform(),
                     label=f"NaN/inf ({len(bad)} step{'s' if len(bad) > 1 else ''})", zorder=3)
        labelled += 1
    if metrics == ("lr",):
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    elif metrics == ("tokens_per_s",):
        axes.yaxis.set_major_formatter(EngFormatter())
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if labelled > 1:
        axes.legend()


def write_report(run_dir, output: Optional[str] = None) -> List[Path]:
    """Write one PNG per plot that has data, and summary.png with all of them; return the paths written."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    run_dir = Path(run_dir)
    _, series = load_metrics(run_dir)
    name = run_dir.resolve().name
    present = [plot for plot in PLOTS if any(series.get(metric) for metric in plot[2])]
    for file_name, _, metrics in PLOTS:
        if all(not series.get(metric) for metric in metrics):
            print(f"skipped {file_name}.png: no {' or '.join(metrics)} in the metrics")
    if not present:
        wanted = ", ".join(metric for plot in PLOTS for metric in plot[2])
        raise ConfigError(f"nothing to plot in {run_dir}: the metrics have none of {wanted}")

    out_dir = Path(output) if output else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, title, metrics in present:
        figure = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
        _draw(figure.add_subplot(), series, metrics, f"{name}: {title}")
        written.append(out_dir / f"{file_name}.png")
        figure.savefig(written[-1], dpi=DPI)

    figure = Figure(figsize=SUMMARY_SIZE_IN, dpi=DPI, layout="constrained")
    figure.suptitle(name)
    for axes, (file_name, title, metrics) in zip(figure.subplots(2, 2).flat, PLOTS):
        if (file_name, title, metrics) in present:
            _draw(axes, series, metrics, title)
        else:
            axes.set_title(title)
            axes.text(0.5, 0.5, f"no {' or '.join(metrics)} logged", ha="center", va="center", transform=axes.transAxes)
            axes.set_axis_off()
    written.append(out_dir / "summary.png")
    figure.savefig(written[-1], dpi=DPI)
    return written
