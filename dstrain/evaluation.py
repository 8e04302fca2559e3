"""What an evaluation reports: the evaluators trainer.eval_metrics names, each a component that takes the
engine and this rank's validation batches and returns metrics agreed by all ranks. Each declares the names it
`reports`, so that a config naming one (trainer.early_stopping.metric) is checked before training.

Evaluation by generation (eval.generate_every, the Generation component) answers the first eval.max_prompts
prompts of the split and scores the answers (dstrain.scoring). It is built so that `dstrain eval` on one
process gives the same numbers as the run did on many: greedy decoding, one prompt at a time (no padding),
an explicit generation config (not the model's saved one, which training leaves with use_cache=False), and
the scores computed from every rank's answers gathered in prompt order.
"""

import math
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.distributed as dist

from dstrain.chat import end_of_turn_token_id
from dstrain.config import TrainConfig
from dstrain.data import Batch, counted_tokens, pad_id
from dstrain.distributed import sum_over_ranks
from dstrain.eval_config import EvalConfig
from dstrain.loss import summed_token_loss
from dstrain.registry import Registry
from dstrain.scoring import score


class Perplexity:
    """Validation loss per counted token over every rank's batches, and its exponential."""

    reports = ("eval_loss", "eval_perplexity")

    def evaluate(self, engine, batches: Iterable[Batch], device) -> Dict[str, float]:
        return self.metrics(*sum_over_ranks(self.summed(engine, batches, device), device))

    @staticmethod
    def summed(model, batches: Iterable[Batch], device) -> Tuple[torch.Tensor, int]:
        """One rank's part: the summed token loss of its batches (float64) and their counted tokens."""
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
        with torch.no_grad():
            for batch in batches:
                batch = {key: value.to(device) for key, value in batch.items()}
                loss_sum += summed_token_loss(model, batch).double()
                count += counted_tokens(batch)
        return loss_sum, count

    @staticmethod
    def metrics(loss_sum: float, count: float) -> Dict[str, float]:
        loss = float(loss_sum) / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


EVALUATORS: Registry = Registry("trainer.eval_metrics")
EVALUATORS.register("perplexity")(Perplexity())


class Generation:
    """Greedy answers to the first eval.max_prompts prompts (columns prompt_ids, reference), scored."""

    def __init__(self, cfg: EvalConfig, seq_len: int, tokenizer, prompts, chat_template: str):
        self.cfg = cfg
        # The prompt keeps its last tokens so that prompt and answer fit the positions training used.
        self.prompt_tokens = seq_len - cfg.max_new_tokens
        self.tokenizer = tokenizer
        # The template the prompts were rendered with, whose end of turn ends an answer. Given, not read from
        # the tokenizer: during training the tokenizer carries its own template (or none), not data.template's.
        self.chat_template = chat_template
        self.prompts = prompts.select(range(min(cfg.max_prompts, len(prompts))))

    @staticmethod
    def reports(cfg: EvalConfig) -> List[str]:
        return [f"eval_{name}" for name in cfg.metrics]

    def due(self, step: int, max_steps: int) -> bool:
        every = self.cfg.generate_every
        return bool(every) and (step % every == 0 or step == max_steps)

    def evaluate(self, model, device, rank: int = 0, world_size: int = 1, synced: bool = False) -> Dict[str, float]:
        """`model` is the bare module (engine.module). Prompts are dealt out round-robin; under ZeRO-3 (synced)
        every rank makes the same number of generate calls, as its forward passes gather parameters together."""
        answers = self.answers(model, device, rank, world_size, synced)
        if world_size > 1:
            gathered: List[Dict[int, str]] = [{} for _ in range(world_size)]
            dist.all_gather_object(gathered, answers)
            answers = {index: text for part in gathered for index, text in part.items()}
        predictions = [answers[index] for index in range(len(self.prompts))]
        scores = score(predictions, list(self.prompts["reference"]), self.cfg.metrics)
        return {f"eval_{name}": value for name, value in scores.items()}

    def answers(self, model, device, rank: int, world_size: int, synced: bool) -> Dict[int, str]:
        mine = list(range(rank, len(self.prompts), world_size))
        calls = -(-len(self.prompts) // world_size) if synced else len(mine)
        generation_config = self.generation_config(model)
        answers = {}
        with torch.no_grad():
            for call in range(calls):
                # A rank out of prompts repeats one, and drops its answer, to keep stepping with the others.
                index = mine[call] if call < len(mine) else 0
                ids = torch.as_tensor(self.prompts[index]["prompt_ids"][-self.prompt_tokens:], device=device)[None]
                output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        generation_config=generation_config, synced_gpus=synced)
                if call < len(mine):
                    answers[index] = self.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
        return answers

    def generation_config(self, model):
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=self.cfg.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=stop_token_ids(self.tokenizer, model.config.eos_token_id, self.chat_template),
            pad_token_id=pad_id(self.tokenizer),
        )


def stop_token_ids(tokenizer, model_eos, chat_template) -> List[int]:
    """Generation ends at the chat template's end of turn (dstrain.chat.end_of_turn_token_id), the tokenizer's
    EOS or any of the model config's. The end of turn is the one the model learnt to emit after an answer:
    a base model fine-tuned with chatml or llama-3 has neither EOS name it, and would otherwise answer on
    past its turn. Ids that are not there (a tokenizer without EOS) are left out."""
    model_eos = [model_eos] if model_eos is None or isinstance(model_eos, int) else list(model_eos)
    candidates = {end_of_turn_token_id(tokenizer, chat_template), tokenizer.eos_token_id, *model_eos}
    return sorted(token for token in candidates if token is not None)


def reported_metrics(cfg: TrainConfig) -> Sequence[str]:
    """Every metric an evaluation of this config reports: what trainer.early_stopping.metric may name."""
    reported = [metric for name in cfg.trainer.eval_metrics for metric in EVALUATORS[name].reports]
    if cfg.eval.generate_every:
        reported += Generation.reports(cfg.eval)
    return reported
