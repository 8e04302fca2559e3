"""A warning when the gradient norm stays outside a healthy band: above it, the learning rate is often too
high or the data broken; below it, the weights hardly train (a frozen model, vanishing gradients). It shows
long before the loss does."""

import logging
import math
from typing import List, Optional

log = logging.getLogger("dstrain")


class GradNormWatch:
    """Fed every step's global gradient norm (before clipping); says, once per episode, when the norm has
    been outside [low, high] for `patience` steps in a row. An episode ends when the norm comes back inside.
    An empty band or a patience of 0 watches nothing. Every rank sees the same global norm and counts alike;
    only the one that `speaks` (rank 0) logs the warning."""

    def __init__(self, band: List[float], patience: int, speaks: bool):
        self.band = tuple(band)
        self.patience = patience
        self.speaks = speaks
        # The current episode: how many steps in a row the norm has been outside, from which step, and
        # whether it was warned about already.
        self.steps_outside = 0
        self.first_outside: Optional[int] = None
        self.warned = False

    def observe(self, step: int, norm: float) -> Optional[str]:
        """The warning this step gives (logged if this rank speaks), or None."""
        # A NaN/inf norm is trainer.nonfinite's business (and fp16's routine overflow), not a trend.
        if not self.band or not self.patience or not math.isfinite(norm):
            return None
        low, high = self.band
        if low <= norm <= high:
            self.steps_outside, self.first_outside, self.warned = 0, None, False
            return None
        self.steps_outside += 1
        if self.first_outside is None:
            self.first_outside = step
        if self.warned or self.steps_outside < self.patience:
            return None
        self.warned = True
        hint = ("lower optim.lr, or check the data" if norm > high
                else "check that the weights train (peft, optim.lr) and that the loss is not saturated")
        warning = (f"gradient norm {norm:.3g} at step {step}: outside [{low:g}, {high:g}] for {self.steps_outside} "
                   f"steps in a row, since step {self.first_outside} (trainer.grad_norm_band, "
                   f"trainer.grad_norm_patience); {hint}. Not repeated until the norm returns to the band.")
        if self.speaks:
            log.warning(warning)
        return warning
