"""`dstrain serve MODEL`: an OpenAI-compatible HTTP API on FastAPI and uvicorn.

/v1/models, /v1/completions (a plain-text prompt), /v1/chat/completions (messages rendered with the chat
template the run trained with, the assistant's turn opened), both with server-sent-event streaming
(`data: {...}` chunks, then `data: [DONE]`), and /health.

One worker owns the model and answers one request at a time, in a thread of its own so that the event loop
stays free to take requests, stream and time out. Requests wait in a bounded queue: when it is full the
answer is 429 at once. Each request has a deadline, waiting included; past it the answer is 504 (or, once a
stream has started, an error event) and its generation stops at the next token. A request's own failure
(bad input: 400 naming the field; an error while generating: 500) is answered to it alone.
"""

import asyncio
import copy
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, List, Optional, Union

from dstrain.errors import ConfigError
from dstrain.generation import Generated, OptionError, SamplingOptions
from dstrain.inference import ModelToUse
from dstrain.serve_api import (ApiError, ChatRequest, CompletionRequest, Reply, SamplingRequest, error_body,
                               invalid_option)

# An answer's length when the request gives no max_tokens (cut further by what the context leaves).
DEFAULT_MAX_TOKENS = 256


@dataclass
class Job:
    prompt_ids: List[int]
    options: SamplingOptions
    # What the worker sends back, in order: text pieces, then the Generated (or the exception that ended it).
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Set when the request gave up (deadline, client gone): the worker skips it, or stops generating it.
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationWorker:
    """The model's one user: takes jobs in order from a bounded queue and generates each in its thread."""

    def __init__(self, target: ModelToUse, queue_size: int):
        self.target = target
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dstrain-generate")
        self.current: Optional[Job] = None

    @property
    def generating(self) -> bool:
        return self.current is not None

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(429, f"the server is busy: {self.queue.maxsize} requests are already waiting. Try again "
                                f"shortly.", kind="rate_limit_error", code="queue_full") from None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if job.cancelled.is_set():
                continue
            self.current = job
            try:
                await loop.run_in_executor(self.thread, self._generate, job, loop)
            finally:
                self.current = None

    def stop(self) -> None:
        """At shutdown: the answer being generated ends at its next token, and the thread with it."""
        if self.current is not None:
            self.current.cancelled.set()
        self.thread.shutdown(wait=False, cancel_futures=True)

    def _generate(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        def send(event) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, event)

        try:
            send(self.target.generate(job.prompt_ids, job.options, on_text=send, cancelled=job.cancelled.is_set))
        except Exception as error:  # this request's failure, reported to it; the worker goes on with the next
            send(error)


class RequestTimeout(Exception):
    pass


def create_app(target: ModelToUse, model_name: str, queue_size: int = 64, request_timeout_s: float = 300.0):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    worker = GenerationWorker(target, queue_size)
    # Prompts are tokenised on the event loop while the worker's thread decodes: a tokenizer of their own, since
    # a fast tokenizer used from two threads at once can fail ("Already borrowed").
    prompts = replace(target, tokenizer=copy.deepcopy(target.tokenizer))

    @asynccontextmanager
    async def lifespan(app):
        running = asyncio.create_task(worker.run())
        yield
        running.cancel()
        worker.stop()

    app = FastAPI(title="dstrain serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return JSONResponse(validation_error_body(error.errors()), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return JSONResponse(error_body(f"internal error: {error}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "generating": worker.generating, "waiting": worker.queue.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "dstrain"}]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        ids = _prompt_ids(lambda: prompts.text_prompt_ids(request.prompt_text()), "prompt")
        return await answer(request, ids, "prompt", Reply(chat=False, model=model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        ids = _prompt_ids(lambda: prompts.chat_prompt_ids(request.turns()), "messages")
        return await answer(request, ids, "messages", Reply(chat=True, model=model_name))

    async def answer(request: SamplingRequest, prompt_ids: List[int], prompt_field: str, reply: Reply):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout_s
        if request.model != model_name:
            raise ApiError(404, f"model {request.model!r} is not served here: this server has {model_name!r}",
                           param="model", code="model_not_found")
        options = request.sampling_options(DEFAULT_MAX_TOKENS)
        try:
            options = options.capped(len(prompt_ids), target.context_length)
        except OptionError as error:
            raise invalid_option(error, prompt_field) from None
        job = Job(prompt_ids, options)
        worker.submit(job)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(_stream(job, deadline, reply, include_usage), media_type="text/event-stream")
        try:
            return reply.whole(await _result(job, deadline))
        except RequestTimeout:
            raise ApiError(504, f"the answer took longer than the server's limit of {request_timeout_s:g} s, waiting "
                                f"included", kind="timeout_error", code="request_timeout") from None

    return app


def _prompt_ids(render, prompt_field: str) -> List[int]:
    try:
        return render()
    except OptionError as error:
        raise invalid_option(error, prompt_field) from None


def validation_error_body(errors: list) -> dict:
    """The first problem pydantic found, as a 400 naming the field (`messages.0.role`)."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return error_body(f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error",
                          code="invalid_json")
    param = ".".join(location) or None
    if param is None:
        return error_body(f"the request body: {first.get('msg')}", "invalid_request_error", code="invalid_value")
    return error_body(f"{param}: {first.get('msg')}", "invalid_request_error", param, "invalid_value")


async def _next_event(job: Job, deadline: float) -> Union[str, Generated, Exception]:
    try:
        async with asyncio.timeout_at(deadline):
            return await job.events.get()
    except TimeoutError:
        job.cancelled.set()
        raise RequestTimeout() from None


async def _result(job: Job, deadline: float) -> Generated:
    try:
        while True:
            event = await _next_event(job, deadline)
            if isinstance(event, Exception):
                raise ApiError(500, f"generation failed: {event}", kind="server_error")
            if isinstance(event, Generated):
                return event
    finally:
        job.cancelled.set()  # a client that went away stops its generation too


async def _stream(job: Job, deadline: float, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    try:
        yield _event(reply.chunk(first=True))
        while True:
            event = await _next_event(job, deadline)
            if isinstance(event, str):
                yield _event(reply.chunk(event))
                continue
            if isinstance(event, Exception):
                yield _event(error_body(f"generation failed: {event}", "server_error"))
            else:
                yield _event(reply.chunk(finish_reason=event.finish_reason))
                if include_usage:
                    yield _event(reply.usage_chunk(event))
            break
    except RequestTimeout:
        yield _event(error_body("the answer took longer than the server's limit, waiting included", "timeout_error",
                                code="request_timeout"))
    finally:
        job.cancelled.set()
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def serve(path: Path, host: str, port: int, model_name: str, queue_size: int, request_timeout_s: float,
          int8: bool = False) -> None:
    import uvicorn

    from dstrain.inference import load_model_to_use

    if queue_size < 1:
        raise ConfigError(f"--queue-size is {queue_size}: give at least 1")
    if not request_timeout_s > 0:
        raise ConfigError(f"--request-timeout is {request_timeout_s}: give a number of seconds above 0")
    target = load_model_to_use(path, int8)
    print(f"serving {model_name} (context {target.context_length} tokens) at http://{host}:{port}/v1", file=sys.stderr)
    uvicorn.run(create_app(target, model_name, queue_size, request_timeout_s), host=host, port=port)
