"""GGUF export: being written."""

from pathlib import Path
from typing import Optional, Tuple

from dstrain.loading import TrainedModel


class GgufFormat:
    quantize_choices: Tuple[Optional[str], ...] = (None,)
    holds_adapter = False

    def write(self, trained: TrainedModel, staging: Path, merged: bool, quantize: Optional[str]) -> None:
        raise NotImplementedError
