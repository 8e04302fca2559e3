"""Early stopping: each evaluation is judged against the best so far, and the run ends once `patience`
evaluations in a row have not improved on it.

The judgement lives in TrainState (best_value, best_step, evals_since_best), which every checkpoint holds, so
a resumed run stops at the step the uninterrupted run would have. The loop saves every new best's step, and
dstrain.checkpoint marks that checkpoint, names it checkpoints/best and keeps it from pruning.
"""

import math
from dataclasses import replace
from typing import Optional, Tuple

from dstrain.checkpoint import TrainState
from dstrain.config import EarlyStoppingConfig


class EarlyStopping:
    """Called by the loop once per evaluation; with trainer.early_stopping off it never improves or stops."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg

    @property
    def metric(self) -> Optional[str]:
        """The metric that judges, or None when early stopping is off."""
        return self.cfg.metric if self.cfg.enabled else None

    def judge(self, state: TrainState, metrics: dict) -> Tuple[TrainState, bool]:
        """The state after the evaluation at state.step, and whether that step is a new best."""
        if not self.cfg.enabled:
            return state, False
        value = float(metrics[self.cfg.metric])
        if self.improves(value, state.best_value):
            return replace(state, best_value=value, best_step=state.step, evals_since_best=0), True
        return replace(state, evals_since_best=state.evals_since_best + 1), False

    def improves(self, value: float, best: Optional[float]) -> bool:
        # A NaN or infinite metric never counts as an improvement, not even as the first best.
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if self.cfg.mode == "min":
            return value < best - self.cfg.min_delta
        return value > best + self.cfg.min_delta

    def patience_ran_out(self, state: TrainState) -> bool:
        return self.cfg.enabled and state.evals_since_best >= self.cfg.patience

    def stop_message(self, state: TrainState) -> str:
        metric = self.cfg.metric
        best = "none finite" if state.best_value is None else f"{state.best_value:.6g} at step {state.best_step}"
        return (f"early stopping at step {state.step}: {metric} has not improved by more than "
                f"{self.cfg.min_delta:g} for {state.evals_since_best} evaluations "
                f"(trainer.early_stopping.patience={self.cfg.patience}); best {metric}: {best} (checkpoints/best)")
