"""The OpenAI API's shapes, as `dstrain serve` speaks them: requests (pydantic models, so that a value of the
wrong type is reported by its field), the sampling options they ask for, answers, streamed chunks, and error
bodies `{"error": {"message", "type", "param", "code"}}`.

Beyond OpenAI's fields, requests may set `top_k` and `repetition_penalty` (as vLLM's API does)."""

import time
import uuid
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

from pydantic import BaseModel

from dstrain.generation import Generated, OptionError, SamplingOptions



class ApiError(Exception):
    """A request that gets an error answer: the status, and the body's fields."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind, param, code)


def error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def invalid_option(error: OptionError, prompt_field: str, max_tokens_field: str = "max_tokens") -> ApiError:
    """A 400 naming the request's field: `prompt_field` is where the prompt came from (prompt or messages),
    `max_tokens_field` the name the request gave max_new_tokens."""
    fields = {"prompt": prompt_field, "messages": prompt_field, "max_new_tokens": max_tokens_field}
    param = fields.get(error.field, error.field)
    return ApiError(400, f"{param} {error.problem}", param=param, code="invalid_value")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model: str
    max_tokens: Optional[int] = None
    # OpenAI's default: sampling. Ask for temperature 0 to get greedy, repeatable answers.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    n: int = 1
    # OpenAI options this server does not implement: refused when set, rather than silently ignored.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_tokens"

    def sampling_options(self, default_max_tokens: int) -> SamplingOptions:
        """The options asked for, checked; max_new_tokens is still to be capped by the context."""
        if self.n != 1:
            raise ApiError(400, f"n is {self.n}: this server answers with one choice, n=1", param="n",
                           code="invalid_value")
        for name, alternative in (("frequency_penalty", "use repetition_penalty"),
                                  ("presence_penalty", "use repetition_penalty"), ("logprobs", "leave it out")):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server: {alternative}", param=name,
                               code="unsupported_parameter")
        requested = self.requested_max_tokens()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        options = SamplingOptions(max_new_tokens=default_max_tokens if requested is None else requested,
                                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  repetition_penalty=self.repetition_penalty, stop=stop, seed=self.seed)
        try:
            options.check()
        except OptionError as error:
            raise invalid_option(error, "prompt", self.max_tokens_field()) from None
        return options


class CompletionRequest(SamplingRequest):
    # A list holds one prompt per choice; one is what this server answers.
    prompt: Union[str, List[str]]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"prompt has {len(self.prompt)} prompts: send one per request", param="prompt",
                           code="invalid_value")
        return self.prompt[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, List[TextPart]]

    def as_turn(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": content}


class ChatRequest(SamplingRequest):
    messages: List[Message]
    # The newer name of max_tokens for chat; either may be given.
    max_completion_tokens: Optional[int] = None

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def turns(self) -> List[dict]:
        if not self.messages:
            raise ApiError(400, "messages is empty: give at least one message", param="messages", code="invalid_value")
        return [message.as_turn() for message in self.messages]


@dataclass
class Reply:
    """One request's answer, whole or as a stream of chunks, all under one id."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, choices: list, streamed: bool) -> dict:
        if self.chat:
            kind, prefix = ("chat.completion.chunk" if streamed else "chat.completion"), "chatcmpl-"
        else:
            kind, prefix = "text_completion", "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def whole(self, generated: Generated) -> dict:
        choice = {"index": 0, "finish_reason": generated.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": generated.text}
        else:
            choice["text"] = generated.text
        return {**self._envelope([choice], streamed=False), "usage": usage(generated)}

    def chunk(self, text: str = "", finish_reason: Optional[str] = None, first: bool = False) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice["delta"] = delta
        else:
            choice["text"] = text
        return self._envelope([choice], streamed=True)

    def usage_chunk(self, generated: Generated) -> dict:
        return {**self._envelope([], streamed=True), "usage": usage(generated)}


def usage(generated: Generated) -> dict:
    return {"prompt_tokens": generated.prompt_tokens, "completion_tokens": generated.completion_tokens,
            "total_tokens": generated.prompt_tokens + generated.completion_tokens}
