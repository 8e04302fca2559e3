"""Where metrics go: the console and a metrics file in the run directory, from rank 0 only.

A tracker (W&B, TensorBoard) is one more `MetricsSink`: it gets the same rows from `MetricsLogger.log`.
"""

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Protocol

from tqdm import tqdm

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


def _format(metrics: Dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}" if abs(value) < 1e4 else f"{key}={value:.0f}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: Path, format_name: str, is_rank0: bool, max_steps: int, start_step: int):
        self.is_rank0 = is_rank0
        self.sinks: List[MetricsSink] = []
        self.progress = None
        if not is_rank0:
            return
        self.sinks.append(JsonlSink(run_dir / "metrics.jsonl") if format_name == "jsonl" else CsvSink(run_dir / "metrics.csv"))
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
                log.info(line)

    def advance(self, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
            self.progress.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        for sink in self.sinks:
            sink.close()
