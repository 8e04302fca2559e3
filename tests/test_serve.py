"""`dstrain serve`: a real uvicorn server on a free loopback port (in a thread of the test, or as a `python -m
dstrain serve` process), answered to the official `openai` client and to plain HTTP. The answers are checked
against transformers' own greedy generate on the same model. SmolLM2-135M-Instruct is the real chat model;
the tiny random model, given ChatML, is the quick one for bad requests and the load test.
"""

import concurrent.futures
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from conftest import _env, _free_port
from dstrain.chat import BUILTIN_TEMPLATES
from dstrain.inference import load_model_to_use
from dstrain.serve import create_app

TINY, SMOL = "tiny", "smol"


class RunningServer:
    """uvicorn serving `app` on a free loopback port, in a thread, until close()."""

    def __init__(self, app):
        import uvicorn

        self.url = f"http://127.0.0.1:{_free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)


def greedy(target, prompt_ids, max_new_tokens: int) -> tuple:
    """transformers' greedy generate on the served model: (the answer's text, its token count)."""
    ids = torch.tensor([prompt_ids])
    output = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, use_cache=True, eos_token_id=target.stop_token_ids,
                                   pad_token_id=target.tokenizer.eos_token_id)
    new = output[0, len(prompt_ids):]
    return target.tokenizer.decode(new, skip_special_tokens=True), len(new)


def chat_ids(target, question: str) -> list:
    return target.chat_prompt_ids([{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def tiny(tiny_pretrained_dir):
    target = load_model_to_use(tiny_pretrained_dir)
    target.tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    return target


@pytest.fixture(scope="module")
def tiny_server(tiny):
    server = RunningServer(create_app(tiny, TINY, queue_size=64, request_timeout_s=300))
    yield server
    server.close()


@pytest.fixture(scope="module")
def smol(smollm2_model_dir):
    return load_model_to_use(smollm2_model_dir)


@pytest.fixture(scope="module")
def smol_server(smol):
    server = RunningServer(create_app(smol, SMOL, queue_size=64, request_timeout_s=600))
    yield server
    server.close()


def test_models_and_health(tiny_server):
    assert [model.id for model in tiny_server.client().models.list()] == [TINY]
    health = httpx.get(f"{tiny_server.url}/health").json()
    assert health == {"status": "ok", "model": TINY, "generating": False, "waiting": 0}


@pytest.mark.slow
def test_the_openai_client_chats_with_smollm2_whole_and_streamed(smol_server, smol):
    question = "What is the capital of France?"
    expected, tokens = greedy(smol, chat_ids(smol, question), 12)
    client = smol_server.client()
    messages = [{"role": "user", "content": question}]
    whole = client.chat.completions.create(model=SMOL, messages=messages, temperature=0, max_tokens=12)
    assert whole.choices[0].message.content == expected and "Paris" in expected
    assert whole.choices[0].message.role == "assistant"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(chat_ids(smol, question)), tokens)

    chunks = list(client.chat.completions.create(model=SMOL, messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == tokens


@pytest.mark.slow
def test_the_openai_client_completes_text_whole_and_streamed_and_stops_at_a_stop_string(smol_server, smol):
    prompt = "The three primary colors are"
    expected, tokens = greedy(smol, smol.text_prompt_ids(prompt), 10)
    client = smol_server.client()
    whole = client.completions.create(model=SMOL, prompt=prompt, temperature=0, max_tokens=10)
    assert whole.choices[0].text == expected
    assert whole.usage.completion_tokens == tokens and whole.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=SMOL, prompt=prompt, temperature=0, max_tokens=10, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    stop = expected.split()[1]
    stopped = client.completions.create(model=SMOL, prompt=prompt, temperature=0, max_tokens=10, stop=[stop])
    assert stopped.choices[0].text == expected[:expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def _post(server, path: str, body) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=120)


COMPLETION = {"model": TINY, "prompt": "the cat", "max_tokens": 4, "temperature": 0}
CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "stop": [".", ""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "seed": -1}, "seed"),
    ("/v1/completions", {**COMPLETION, "n": 2}, "n"),
    ("/v1/completions", {**COMPLETION, "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 1.0}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 600}, "prompt"),
    ("/v1/completions", {key: value for key, value in COMPLETION.items() if key != "prompt"}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 600}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "stream": "sometimes"}, "stream"),
    ("/v1/chat/completions", "{not json", None),
    ("/v1/chat/completions", "[1, 2]", None),
])
def test_a_bad_request_is_a_400_naming_the_field(tiny_server, path, body, param):
    response = _post(tiny_server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param:
        assert error["message"].startswith(param)


def test_an_unknown_model_or_path_is_a_404_and_the_server_keeps_answering(tiny_server, tiny):
    wrong_model = _post(tiny_server, "/v1/completions", {**COMPLETION, "model": "gpt-4"})
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    assert httpx.get(f"{tiny_server.url}/v1/nothing").json()["error"]["message"] == "Not Found"
    answer = _post(tiny_server, "/v1/completions", COMPLETION).json()
    assert answer["choices"][0]["text"] == greedy(tiny, tiny.text_prompt_ids("the cat"), 4)[0]


def test_max_tokens_is_capped_by_the_context(tiny_server, tiny):
    prompt = "x" * (tiny.context_length - 3)
    answer = _post(tiny_server, "/v1/completions", {**COMPLETION, "prompt": prompt, "max_tokens": 100}).json()
    assert answer["usage"] == {"prompt_tokens": tiny.context_length - 3, "completion_tokens": 3,
                               "total_tokens": tiny.context_length}
    assert answer["choices"][0]["finish_reason"] == "length"


def test_a_request_whose_generation_fails_is_answered_alone(tiny):
    from dstrain.inference import ModelToUse

    class FailsOnSeed13(ModelToUse):
        """A model whose generation raises for one request (seed 13): a stand-in for any failure inside it."""

        def generate(self, prompt_ids, options, **kwargs):
            if options.seed == 13:
                raise RuntimeError("out of memory")
            return super().generate(prompt_ids, options, **kwargs)

    server = RunningServer(create_app(FailsOnSeed13(tiny.model, tiny.tokenizer, tiny.context_length,
                                                    tiny.stop_token_ids), TINY))
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda seed: _post(server, "/v1/completions", {**COMPLETION, "seed": seed}),
                                    [1, 13, 2, 3]))
        assert [answer.status_code for answer in answers] == [200, 500, 200, 200]
        assert answers[1].json()["error"] == {"message": "generation failed: out of memory", "type": "server_error",
                                              "param": None, "code": None}
        assert _events(server, {**COMPLETION, "seed": 13, "stream": True})[-2]["error"]["type"] == "server_error"
        assert _post(server, "/v1/completions", COMPLETION).status_code == 200
    finally:
        server.close()


def _wait_until(server, condition, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition(httpx.get(f"{server.url}/health").json()):
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_full_queue_is_a_429_a_late_answer_a_504_and_neither_stops_the_server(smol):
    # One request generating, one waiting fills a queue of 1; each may take 4 s, waiting included.
    server = RunningServer(create_app(smol, SMOL, queue_size=1, request_timeout_s=4))
    try:
        endless = {"model": SMOL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            generating = pool.submit(_post, server, "/v1/completions", endless)
            _wait_until(server, lambda health: health["generating"])
            waiting = pool.submit(_post, server, "/v1/completions", endless)
            _wait_until(server, lambda health: health["waiting"] == 1)
            refused = _post(server, "/v1/completions", endless)
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert refused.json()["error"]["code"] == "queue_full"
            for late in (generating.result(), waiting.result()):
                assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout"
        _wait_until(server, lambda health: not health["generating"] and health["waiting"] == 0, timeout=30)
        after = _post(server, "/v1/completions", {**endless, "max_tokens": 2})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2

        # A stream past its deadline ends with an error event; one whose client goes away stops generating.
        events = _events(server, {**endless, "stream": True})
        assert events[-2]["error"]["code"] == "request_timeout" and events[-1] == "[DONE]"
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**endless, "stream": True}) as response:
            next(response.iter_lines())
        _wait_until(server, lambda health: not health["generating"], timeout=3)
    finally:
        server.close()


def _events(server, body: dict) -> list:
    """A streamed answer's server-sent events, each `data: ...` line's JSON (or the final [DONE])."""
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_a_stream_is_server_sent_events_ending_with_done(tiny_server, tiny):
    events = _events(tiny_server, {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert "".join(event["choices"][0]["text"] for event in events[:-2]) == \
        greedy(tiny, tiny.text_prompt_ids("the cat"), 4)[0]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 4 and events[-2]["choices"] == []


def test_32_concurrent_requests_are_all_answered_correctly(tiny_server, tiny, capsys):
    questions = ["the cat", "a dog sees", "my sister likes", "two blue boxes"]
    expected = {question: greedy(tiny, chat_ids(tiny, question), 16)[0] for question in questions}
    expected_text = {question: greedy(tiny, tiny.text_prompt_ids(question), 16)[0] for question in questions}
    client = tiny_server.client()

    def ask(index: int) -> tuple:
        question, chat, stream = questions[index % 4], index % 2 == 0, index % 3 == 0
        started = time.monotonic()
        if chat:
            reply = client.chat.completions.create(
                model=TINY, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16,
                stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
        else:
            reply = client.completions.create(model=TINY, prompt=question, temperature=0, max_tokens=16, stream=stream,
                                              **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(reply)
            text = "".join((chunk.choices[0].delta.content or "") if chat else chunk.choices[0].text
                           for chunk in chunks if chunk.choices)
            tokens = chunks[-1].usage.completion_tokens
        else:
            text = reply.choices[0].message.content if chat else reply.choices[0].text
            tokens = reply.usage.completion_tokens
        correct = text == (expected if chat else expected_text)[question]
        return time.monotonic() - started, tokens, correct

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    elapsed = time.monotonic() - started
    assert all(correct for _, _, correct in results)
    latencies = sorted(latency for latency, _, _ in results)
    p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    tokens = sum(count for _, count, _ in results)
    with capsys.disabled():
        print(f"\n32 concurrent requests: p50 {p50:.2f} s, p99 {p99:.2f} s, {tokens / elapsed:.1f} tokens/s "
              f"({tokens} tokens in {elapsed:.1f} s)")


# --- Done when: a LoRA fine-tune of a real pretrained model, chatted with and served ----------------------------



@pytest.mark.slow
def test_a_lora_finetune_of_smollm2_chats_in_the_terminal_and_streams_to_the_openai_client(smollm2_lora_checkpoint):
    checkpoint = smollm2_lora_checkpoint
    question = "What are the three primary colors?"
    finetuned = load_model_to_use(checkpoint)
    expected, _ = greedy(finetuned, chat_ids(finetuned, question), 16)

    chatted = subprocess.run([sys.executable, "-m", "dstrain", "generate", str(checkpoint), "--chat",
                              "--max-new-tokens", "16"], input=question + "\n", capture_output=True, text=True,
                             env=_env(), timeout=300)
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout == expected + "\n"

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "dstrain", "serve", str(checkpoint), "--port", str(port),
                               "--model-name", "lora"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        stream = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=16, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected
    finally:
        server.terminate()
        server.wait(timeout=60)
