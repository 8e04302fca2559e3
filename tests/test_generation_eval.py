"""Evaluation by generation (eval.*) and `dstrain eval`: the config checks, one-line refusals of bad input, a
2-rank ZeRO-3 run whose ranks generate together and whose logged scores a single-process `dstrain eval`
reproduces, and lm-evaluation-harness on a local task, offline. (The LoRA fine-tune of SmolLM2 that scores,
stops early and is evaluated again from checkpoints/best is in tests/test_finetune.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import _env, train
from dstrain.chat import BUILTIN_TEMPLATES
from dstrain.checks import validate
from dstrain.compose import compose
from dstrain.errors import ConfigError
from dstrain.evaluation import Generation, stop_token_ids

# Instruction data on the tiny model and its byte-level tokenizer, with the built-in alpaca template.
ALPACA = ("+data=alpaca", "data.template=alpaca", "data.seq_len=128", "data.train_files=[/nonexistent.json]")
GENERATION_SCORES = ("eval_bleu", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_exact_match")


def _config(*overrides: str):
    return compose([*ALPACA, "trainer.eval_every=10", *overrides])


def test_generation_scores_can_judge_early_stopping():
    validate(_config("eval.generate_every=10", "trainer.early_stopping.enabled=true",
                     "trainer.early_stopping.metric=eval_rougeL", "trainer.early_stopping.mode=max"))


@pytest.mark.parametrize("overrides, named", [
    (("eval.generate_every=15",), "eval.generate_every=15"),
    (("eval.generate_every=-1",), "eval.generate_every=-1"),
    (("eval.generate_every=10", "eval.max_new_tokens=128"), "eval.max_new_tokens=128"),
    (("eval.generate_every=10", "eval.max_prompts=0"), "eval.max_prompts=0"),
    (("eval.metrics=[bleu,meteor]",), "eval.metrics"),
    (("trainer.early_stopping.enabled=true", "trainer.early_stopping.metric=eval_rougeL"), "eval_rougeL"),
    (("eval.generate_every=20", "trainer.early_stopping.enabled=true", "trainer.early_stopping.metric=eval_bleu"),
     "eval.generate_every=10"),
])
def test_impossible_generation_settings_are_refused_naming_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        validate(_config(*overrides))


def test_plain_text_has_no_prompts_to_answer():
    with pytest.raises(ConfigError, match="data.format=text"):
        validate(compose(["trainer.eval_every=10", "eval.generate_every=10"]))


class _EchoModel:
    """Stands in for a causal LM: "generates" each prompt's last token id again, and counts its calls."""

    class config:
        eos_token_id = 257

    def __init__(self):
        self.prompts = []

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        assert generation_config.use_cache and not generation_config.do_sample and generation_config.num_beams == 1
        self.prompts.append(input_ids[0].tolist())
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)


def _generation(max_prompts: int = 5, max_new_tokens: int = 4):
    import datasets

    from dstrain.data import byte_level_tokenizer
    from dstrain.eval_config import EvalConfig

    prompts = datasets.Dataset.from_dict({
        "prompt_ids": [list(range(10 * number, 10 * number + 12)) for number in range(6)],
        "reference": [chr(ord("a") + number) for number in range(6)],
    })
    return Generation(EvalConfig(max_prompts=max_prompts, max_new_tokens=max_new_tokens), 12, byte_level_tokenizer(),
                      prompts, BUILTIN_TEMPLATES["alpaca"])


@pytest.mark.parametrize("rank, synced, calls, answered", [
    (0, False, 3, [0, 2, 4]), (1, False, 2, [1, 3]),
    # Under ZeRO-3 the rank with a prompt fewer generates once more (prompt 0 again) and drops that answer.
    (1, True, 3, [1, 3]),
])
def test_ranks_share_the_first_prompts_and_keep_their_last_tokens(rank, synced, calls, answered):
    generation, model = _generation(), _EchoModel()
    answers = generation.answers(model, torch.device("cpu"), rank, 2, synced)
    assert len(model.prompts) == calls and sorted(answers) == answered
    # seq_len 12 - max_new_tokens 4: the last 8 tokens of each prompt.
    assert model.prompts[0] == list(range(10 * rank + 4, 10 * rank + 12))
    # The answer is what follows the prompt, decoded.
    assert answers[answered[0]] == generation.tokenizer.decode([10 * answered[0] + 11]).strip()


def test_one_process_scores_the_answers_in_prompt_order():
    generation = _generation(max_prompts=3)
    scores = generation.evaluate(_EchoModel(), torch.device("cpu"))
    assert set(scores) == {f"eval_{name}" for name in ("bleu", "rouge1", "rouge2", "rougeL", "exact_match")}
    assert scores["eval_exact_match"] == 0


def _base_tokenizer_with_chatml_tokens(eos: bool = True):
    """dstrain's byte-level tokenizer (EOS </s>, no template of its own) given ChatML's tokens, as a base model
    fine-tuned with data.template=chatml has them; or the same without any EOS."""
    from transformers import PreTrainedTokenizerFast

    from dstrain.data import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    if not eos:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def test_generation_stops_at_the_templates_end_of_turn_and_at_every_eos_there_is():
    tokenizer = _base_tokenizer_with_chatml_tokens()
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    chatml = BUILTIN_TEMPLATES["chatml"]
    assert stop_token_ids(tokenizer, eos, chatml) == sorted([eos, im_end])
    assert stop_token_ids(tokenizer, [eos, 5], chatml) == sorted([5, eos, im_end])
    assert stop_token_ids(tokenizer, None, BUILTIN_TEMPLATES["alpaca"]) == [eos]
    without_eos = _base_tokenizer_with_chatml_tokens(eos=False)
    assert without_eos.eos_token_id is None
    assert stop_token_ids(without_eos, None, chatml) == [without_eos.convert_tokens_to_ids("<|im_end|>")]


def chatml_model_that_always_ends_its_turn(tokenizer):
    """A tiny Llama whose output layer's bias makes <|im_end|> the greedy choice after any prompt."""
    from transformers import AutoModelForCausalLM

    from dstrain.config import ModelConfig
    from dstrain.model import llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(ModelConfig(vocab_size=len(tokenizer)))).eval()
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1.0
    model.lm_head = head
    return model


def test_in_training_the_answer_ends_at_the_end_of_turn_of_the_template_the_data_used():
    """As in training: the tokenizer has no template of its own; data.template=chatml rendered the prompts."""
    import datasets

    from dstrain.eval_config import EvalConfig

    tokenizer = _base_tokenizer_with_chatml_tokens()
    assert tokenizer.chat_template is None
    chatml = BUILTIN_TEMPLATES["chatml"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=chatml, tokenize=False,
                                         add_generation_prompt=True)
    prompts = datasets.Dataset.from_dict({"prompt_ids": [tokenizer(text, add_special_tokens=False)["input_ids"]],
                                          "reference": ["Hello"]})
    generation = Generation(EvalConfig(max_prompts=1, max_new_tokens=6), 64, tokenizer, prompts, chatml)
    model = chatml_model_that_always_ends_its_turn(tokenizer)
    steps = []
    model.register_forward_hook(lambda module, args, output: steps.append(1))
    assert generation.answers(model, torch.device("cpu"), 0, 1, False) == {0: ""}
    assert len(steps) == 1, "generation went on past <|im_end|>"


def _dstrain_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstrain", "eval", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("make, named", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "neither a dstrain checkpoint"),
])
def test_dstrain_eval_refuses_what_is_not_a_model_in_one_line(tmp_path, make, named):
    result = _dstrain_eval(str(make(tmp_path)), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("dstrain: config error:") and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _write_alpaca(path: Path, count: int) -> Path:
    records = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
               for a in range(8) for b in range(8)][:count]
    path.write_text(json.dumps(records))
    return path


@pytest.mark.slow
def test_zero3_ranks_generate_together_and_dstrain_eval_gives_the_same_numbers(tmp_path):
    """Under ZeRO-3 every forward pass gathers parameters from all ranks, so both ranks generate in step (one
    with a prompt fewer repeats one); a single process reading the consolidated checkpoint agrees."""
    data = _write_alpaca(tmp_path / "alpaca.json", 64)
    run = train(tmp_path, *ALPACA[:3], f"data.train_files=[{data}]", "+zero=3", "trainer.micro_batch_size=1",
                "scheduler.warmup_steps=1", "trainer.max_steps=3", "trainer.eval_every=3", "eval.generate_every=3",
                "eval.max_prompts=5", "eval.max_new_tokens=12")
    logged = next(row for row in run.metrics() if "eval_loss" in row)
    assert logged["step"] == 3 and all(0 <= logged[name] <= 1 for name in GENERATION_SCORES), logged
    result = _dstrain_eval(str(run.run_dir / "checkpoints" / "latest"), "--split", "validation", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((run.run_dir / "checkpoints" / "step_00000003" / "eval_validation.json").read_text())
    assert evaluated["prompts"] == 5
    for name, value in evaluated["metrics"].items():
        assert value == pytest.approx(logged[name], rel=1e-6, abs=1e-9), name


MULTIPLE_CHOICE = [
    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Madrid", "Rome"], "answer": 1},
    {"question": "How many legs does a spider have?", "choices": ["six", "four", "eight", "ten"], "answer": 2},
    {"question": "Which planet is the largest?", "choices": ["Jupiter", "Mars", "Venus", "Mercury"], "answer": 0},
    {"question": "What do bees make?", "choices": ["milk", "silk", "wax paper", "honey"], "answer": 3},
]


def _harness_task(directory: Path) -> Path:
    items = directory / "tiny_mc.json"
    items.write_text(json.dumps(MULTIPLE_CHOICE))
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {items}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n"
    )
    return directory


@pytest.mark.slow
def test_an_exported_model_on_files_with_the_harness_offline(tmp_path, smollm2_model_dir):
    """SmolLM2 as a Hugging Face directory (what `dstrain export` writes), its answers to 4 alpaca prompts
    scored, and a 4-item multiple-choice task run by lm-evaluation-harness from a local YAML and JSON file."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = _write_alpaca(tmp_path / "alpaca.json", 4)
    output = tmp_path / "smollm2.json"
    env_offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dstrain", "eval", str(smollm2_model_dir), "--files", str(data), "--data-format",
         "alpaca", "--harness", "tiny_mc", "--harness-tasks-dir", str(_harness_task(tasks)), "--output", str(output)],
        cwd=tmp_path, env=dict(_env(), **env_offline), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(output.read_text())
    assert evaluated["step"] is None and evaluated["prompts"] == 4
    assert 0 < evaluated["metrics"]["eval_loss"] < 10
    assert all(0 <= evaluated["metrics"][name] <= 1 for name in GENERATION_SCORES)
    accuracy = evaluated["harness"]["tiny_mc"]["acc,none"]
    assert 0 <= accuracy <= 1 and "tiny_mc/acc,none" in result.stdout
