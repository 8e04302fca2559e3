"""`dstrain generate`: answers streamed from a checkpoint or an exported directory, checked against transformers'
own greedy generate, run as a real `python -m dstrain` process. SmolLM2-135M-Instruct (tests/conftest.py) is
the real chat model; the tiny random model (byte-level tokenizer, no chat template, a context of 512) is the
quick one, for what does not depend on the answers' quality. The end-to-end check, a LoRA fine-tune of SmolLM2
chatted with in the terminal and through the server, is in tests/test_serve.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import _env
from dstrain.chat import BUILTIN_TEMPLATES
from dstrain.data import byte_level_tokenizer
from dstrain.generation import OptionError, SamplingOptions, StopStringStream
from dstrain.inference import load_model_to_use
from test_generation_eval import _base_tokenizer_with_chatml_tokens, chatml_model_that_always_ends_its_turn

QUESTION = "What is the capital of France?"


def dstrain_generate(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstrain", "generate", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=_env(), timeout=300)


def greedy_reference(model_dir: Path, max_new_tokens: int, messages=None, text=None) -> str:
    """transformers' own greedy generate with the KV cache, on the model as from_pretrained loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if messages is not None:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                            use_cache=True, eos_token_id=[tokenizer.eos_token_id, model.config.eos_token_id],
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_a_prompt_is_answered_with_the_chat_template_as_greedy_generate_answers_it(smollm2_model_dir):
    completed = dstrain_generate(smollm2_model_dir, "--prompt", QUESTION, "--max-new-tokens", 24)
    assert completed.returncode == 0, completed.stderr
    expected = greedy_reference(smollm2_model_dir, 24, messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in expected
    assert completed.stdout == expected + "\n"


@pytest.mark.slow
def test_chat_answers_each_line_with_the_conversation_so_far(smollm2_model_dir):
    turns = ["Hi! My name is Ada.", "What is my name?"]
    completed = dstrain_generate(smollm2_model_dir, "--chat", "--max-new-tokens", 16, "--system", "Be brief.",
                                 stdin="".join(turn + "\n" for turn in turns))
    assert completed.returncode == 0, completed.stderr
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        messages.append({"role": "assistant", "content": greedy_reference(smollm2_model_dir, 16, messages=messages)})
    assert completed.stdout.splitlines() == [message["content"] for message in messages[2::2]]


@pytest.mark.parametrize("args, line", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p is 0.0: it must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p is 1.5: it must be in (0, 1]"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature is -1.0"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens is 0"),
    (["--prompt", "hi", "--max-new-tokens", "600"],
     "--max-new-tokens is 600, but the prompt has 2 tokens and the model's context is 512: give at most 510"),
    (["--prompt", "x" * 600], "--prompt has 600 tokens, which leaves no room for an answer in the model's context"),
    (["--chat"], "--chat needs a chat template, and this model has none"),
    (["--prompt", "hi", "--system", "Be brief."], "--system needs a chat template, and this model has none"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_pretrained_dir, args, line):
    completed = dstrain_generate(tiny_pretrained_dir, *args)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dstrain: config error: {line}"), completed.stderr
    assert "Traceback" not in completed.stderr and completed.stdout == ""


def test_something_that_is_not_a_model_is_refused(tmp_path):
    completed = dstrain_generate(tmp_path, "--prompt", "hi")
    assert completed.returncode == 2
    assert "is neither a dstrain checkpoint" in completed.stderr


def test_generation_uses_the_kv_cache_even_when_the_saved_config_turns_it_off(tiny_pretrained_dir, tmp_path):
    import shutil

    model_dir = shutil.copytree(tiny_pretrained_dir, tmp_path / "model")
    # What training writes: a model config and generation config with use_cache=False.
    (model_dir / "generation_config.json").write_text(json.dumps({"use_cache": False}))
    target = load_model_to_use(model_dir)
    lengths = []
    target.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    prompt = target.text_prompt_ids("the cat sees")
    answer = target.generate(prompt, SamplingOptions(max_new_tokens=5))
    assert answer.completion_tokens == 5 and answer.finish_reason == "length"
    assert lengths == [len(prompt), 1, 1, 1, 1], "each new token is one position on top of the cached ones"


def test_an_answer_ends_at_the_end_of_turn_of_the_template_the_model_was_saved_with(tmp_path):
    """A base model fine-tuned with data.template=chatml: its EOS is </s>, its turns end with <|im_end|>."""
    tokenizer = _base_tokenizer_with_chatml_tokens()
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    model = chatml_model_that_always_ends_its_turn(tokenizer)
    # The config's EOS is the tokenizer's, as training leaves it; the saved tokenizer carries the template.
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    target = load_model_to_use(tmp_path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert target.stop_token_ids == sorted([tokenizer.eos_token_id, im_end])
    # from_pretrained builds Llama's head without a bias; the one that always ends the turn goes back in.
    target.model.lm_head = model.lm_head
    answer = target.generate(target.chat_prompt_ids([{"role": "user", "content": "Hi"}]),
                             SamplingOptions(max_new_tokens=8))
    assert (answer.finish_reason, answer.completion_tokens, answer.text) == ("stop", 1, "")


def test_sampling_with_a_seed_repeats_and_greedy_needs_none(tiny_pretrained_dir):
    target = load_model_to_use(tiny_pretrained_dir)
    prompt = target.text_prompt_ids("the cat sees")

    def text(**options) -> str:
        return target.generate(prompt, SamplingOptions(max_new_tokens=12, **options)).text

    sampled = text(temperature=1.0, top_k=50, top_p=0.9, seed=3)
    assert text(temperature=1.0, top_k=50, top_p=0.9, seed=3) == sampled
    assert text(temperature=1.0, top_k=50, top_p=0.9, seed=4) != sampled
    assert text() == text() != sampled


def test_a_stop_string_ends_the_text_and_is_left_out(tiny_pretrained_dir):
    target = load_model_to_use(tiny_pretrained_dir)
    prompt = target.text_prompt_ids("the cat sees")
    full = target.generate(prompt, SamplingOptions(max_new_tokens=20)).text
    stop = full[5:7]
    pieces = []
    stopped = target.generate(prompt, SamplingOptions(max_new_tokens=20, stop=[stop]), on_text=pieces.append)
    assert stopped.text == full[:full.index(stop)] == "".join(pieces)
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 20


def _streamed(text: str, stop) -> list:
    """The pieces a StopStringStream passes on when `text` arrives one byte-level token at a time."""
    tokenizer = byte_level_tokenizer()
    pieces = []
    stream = StopStringStream(tokenizer, stop, pieces.append)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt, which is not streamed
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        stream.put(torch.tensor([token]))
        if stream.stopped:
            break
    stream.end()
    return pieces


def test_the_stream_holds_back_what_may_become_a_stop_string_or_a_character():
    assert "".join(_streamed("hello world. more", ["wor"])) == "hello "
    # "wo" waited to see whether "r" came; it did not, so it went out after all.
    pieces = _streamed("hello wo!", ["wor"])
    assert "".join(pieces) == "hello wo!" and "wo" not in pieces[:6]
    # "é" is two bytes, two tokens: never half a character.
    assert _streamed("café", []) == ["c", "a", "f", "é"]


@pytest.mark.parametrize("options, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(seed=-1), "seed"),
])
def test_each_impossible_option_is_named(options, field):
    with pytest.raises(OptionError) as raised:
        SamplingOptions(**options).check()
    assert raised.value.field == field and str(raised.value).startswith(field)
