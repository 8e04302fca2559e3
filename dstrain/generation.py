"""Sampling from a loaded model, one prompt at a time, with its text streamed: what `dstrain generate` and
`dstrain serve` share.

SamplingOptions holds what a user chooses (OpenAI's names where the API has one) and checks it, naming the
field. generate() runs transformers' generate with an explicit GenerationConfig: greedy at temperature 0,
seeded sampling otherwise, and always the KV cache (training saves use_cache=False in the model's generation
config, which would make every new token recompute the whole prefix). The text goes out as soon as it is
final; a stop string ends it and is not part of it, as in OpenAI's API.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dstrain.errors import ConfigError

# torch.manual_seed takes any 64-bit value; a JSON or command-line seed beyond that is a mistake.
MAX_SEED = 2**63 - 1


class OptionError(ConfigError):
    """A sampling option or prompt that cannot work. `field` is the option's name here (SamplingOptions' field,
    or `prompt`/`messages`); the command line and the server each name it their own way."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name} {problem}")
        self.field = field_name
        self.problem = problem


@dataclass
class SamplingOptions:
    max_new_tokens: int = 256
    # 0: greedy (deterministic); above 0, sampling at this temperature.
    temperature: float = 0.0
    # Sampling keeps the top_k most likely tokens (0: all) ...
    top_k: int = 0
    # ... then the smallest set whose probability reaches top_p (1: all).
    top_p: float = 1.0
    # Above 1, tokens already in the prompt or the answer become less likely (1: off).
    repetition_penalty: float = 1.0
    # The answer ends before the first of these (which is left out).
    stop: List[str] = field(default_factory=list)
    # Makes sampling repeatable; None: a fresh draw each time.
    seed: Optional[int] = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"is {self.max_new_tokens}: give at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise OptionError("temperature", f"is {self.temperature}: give 0 (greedy) or more")
        if self.top_k < 0:
            raise OptionError("top_k", f"is {self.top_k}: give 0 (no cut) or more")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"is {self.top_p}: it must be in (0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise OptionError("repetition_penalty", f"is {self.repetition_penalty}: give 1 (off) or another value above 0")
        if any(not stop for stop in self.stop):
            raise OptionError("stop", "has an empty string, which would end every answer at once: leave it out")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise OptionError("seed", f"is {self.seed}: give an integer from 0 to {MAX_SEED}")

    def check_fits(self, prompt_tokens: int, context_length: int) -> None:
        """The prompt and the answer's max_new_tokens together within the model's context."""
        check_prompt(prompt_tokens, context_length)
        if prompt_tokens + self.max_new_tokens > context_length:
            raise OptionError("max_new_tokens", f"is {self.max_new_tokens}, but the prompt has {prompt_tokens} tokens "
                                                f"and the model's context is {context_length}: give at most "
                                                f"{context_length - prompt_tokens}")


    def capped(self, prompt_tokens: int, context_length: int) -> "SamplingOptions":
        """These options with max_new_tokens cut to what the context leaves after the prompt."""
        check_prompt(prompt_tokens, context_length)
        return replace(self, max_new_tokens=min(self.max_new_tokens, context_length - prompt_tokens))


def check_prompt(prompt_tokens: int, context_length: int) -> None:
    if prompt_tokens == 0:
        raise OptionError("prompt", "is empty: give some text")
    if prompt_tokens >= context_length:
        raise OptionError("prompt", f"has {prompt_tokens} tokens, which leaves no room for an answer in the model's "
                                    f"context of {context_length}: shorten it")


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # "stop": an end-of-turn token or a stop string; "length": max_new_tokens reached; "cancelled".
    finish_reason: str


class StopStringStream(BaseStreamer):
    """Takes generate()'s new tokens, decodes them, and passes on the text that is final. The first stop string
    ends the text (and generation). Text that could still become a stop string, and a multi-byte character
    whose bytes are not all there yet (decoded as U+FFFD), wait for the next token."""

    def __init__(self, tokenizer, stop: List[str], on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.stop_strings = stop
        self.on_text = on_text
        self.ids: List[int] = []
        self.text = ""  # what has been passed on
        self.stopped = False
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stops = [index for index in (decoded.find(stop) for stop in self.stop_strings) if index >= 0]
        if stops:
            self.stopped = True
            self._send(decoded[:min(stops)])
        else:
            self._send(decoded[:len(decoded) - self._undecided_tail(decoded)])

    def end(self) -> None:
        if not self.stopped:
            self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _undecided_tail(self, decoded: str) -> int:
        """How many of the last characters may still change: the longest end that starts a stop string, and
        an unfinished character."""
        held = max((size for stop in self.stop_strings for size in range(1, len(stop))
                    if decoded.endswith(stop[:size])), default=0)
        unfinished = len(decoded) - len(decoded.rstrip("\ufffd"))
        return max(held, unfinished)

    def _send(self, final_text: str) -> None:
        piece = final_text[len(self.text):]
        if piece:
            self.text = final_text
            self.on_text(piece)


class _StopWhen(StoppingCriteria):
    def __init__(self, condition: Callable[[], bool]):
        self.condition = condition

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.condition(), dtype=torch.bool, device=input_ids.device)


def generation_config(options: SamplingOptions, stop_token_ids: List[int], pad_token_id: int) -> GenerationConfig:
    settings = dict(max_new_tokens=options.max_new_tokens, num_beams=1, use_cache=True, eos_token_id=stop_token_ids,
                    pad_token_id=pad_token_id, repetition_penalty=options.repetition_penalty)
    if options.temperature > 0:
        settings.update(do_sample=True, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
    else:
        settings.update(do_sample=False)
    return GenerationConfig(**settings)


def generate(model, tokenizer, prompt_ids: List[int], options: SamplingOptions, stop_token_ids: List[int],
             on_text: Callable[[str], None] = lambda text: None,
             cancelled: Callable[[], bool] = lambda: False) -> Generated:
    """One answer to `prompt_ids` (checked to fit beforehand), its text passed to on_text piece by piece as it
    becomes final. `cancelled` is asked after every token: a True ends generation there."""
    from dstrain.data import pad_id

    stream = StopStringStream(tokenizer, options.stop, on_text)
    if options.temperature > 0 and options.seed is not None:
        torch.manual_seed(options.seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        output = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), streamer=stream,
            generation_config=generation_config(options, stop_token_ids, pad_id(tokenizer)),
            stopping_criteria=StoppingCriteriaList([_StopWhen(lambda: stream.stopped or cancelled())]),
        )
    new_tokens = output[0, len(prompt_ids):].tolist()
    if cancelled():
        reason = "cancelled"
    elif stream.stopped or (new_tokens and new_tokens[-1] in stop_token_ids):
        reason = "stop"
    else:
        reason = "length"
    return Generated(stream.text, len(prompt_ids), len(new_tokens), reason)
