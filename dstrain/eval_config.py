"""The `eval` section of the schema (dstrain.config): evaluation by generation, dstrain.evaluation.Generation."""

from dataclasses import dataclass, field
from typing import List

from dstrain.config_fields import in_range


@dataclass
class EvalConfig:
    # Every this many steps (and after the last), generate answers to the first eval.max_prompts validation
    # prompts and score them against the references (dstrain.evaluation.Generation); a multiple of
    # trainer.eval_every, as it runs with an evaluation. 0: never.
    generate_every: int = in_range(0, at_least=0)
    # How many validation prompts: always the first ones of the split, so every evaluation answers the same.
    max_prompts: int = in_range(32, at_least=1)
    # Tokens generated per answer at most (greedy decoding; it stops earlier at the end-of-turn token).
    max_new_tokens: int = in_range(64, at_least=1)
    # The scores reported, each as eval_<name>: bleu, rouge1, rouge2, rougeL, exact_match (dstrain.scoring).
    metrics: List[str] = field(default_factory=lambda: ["bleu", "rouge1", "rouge2", "rougeL", "exact_match"])
