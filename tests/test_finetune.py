"""Fine-tuning a real instruct model end to end, as the README's instruction-data example does it: SmolLM2-135M-
Instruct (tests/conftest.py builds it from its GGUF file) with LoRA under ZeRO-2, on 2 CPU ranks under the
deepspeed launcher, from alpaca, ShareGPT and OpenAI-messages files the tests write. Each format trains
once per module; the tests read what the run left behind (metrics, data report, prepared cache, checkpoint)
rather than what its config asked for. The alpaca run also scores generated answers at every evaluation and
stops early, and `dstrain eval` of its best checkpoint gives the numbers the run logged for that step.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _env, train

pytestmark = pytest.mark.slow

IGNORE_INDEX = -100
# Small enough for a 2-core machine: one packed row of 256 tokens per rank and step, about two passes over the
# alpaca training split in 12 steps. LoRA takes a learning rate far above full fine-tuning's. fp32, because a
# CPU without bf16 instructions (AVX2-only) trains bf16 about 14x slower; bf16 on the real model is checked on
# tests/conftest.py's smollm2_lora_checkpoint, and on every ZeRO stage by tests/test_engine_claims.py.
FINETUNE = (
    "+model=pretrained", "+peft=lora", "+zero=2", "+precision=fp32", "data.seq_len=256",
    "trainer.micro_batch_size=1", "optim.lr=2e-3", "scheduler.warmup_steps=2", "trainer.eval_batches=2",
    "trainer.save_every=0",
)
# The chat runs evaluate twice: half-way and after the last step.
CHAT_STEPS = 6
# The alpaca run evaluates (perplexity, and greedy answers to 8 validation prompts scored) every 2 steps of at
# most 12, and stops once an evaluation lowers eval_loss by no more than 0.05. Measured here: 1.599, 1.500, 1.483
# at steps 2, 4, 6 (margins of 0.050 and 0.033 to that threshold), so it stops at step 6 with step 4 the best.
ALPACA_MAX_STEPS, ALPACA_EVAL_EVERY, ALPACA_STOPPED_AT, ALPACA_BEST = 12, 2, 6, 4
ALPACA_EARLY_STOPPING = (
    f"trainer.eval_every={ALPACA_EVAL_EVERY}", f"eval.generate_every={ALPACA_EVAL_EVERY}", "eval.max_prompts=8",
    "eval.max_new_tokens=16", "trainer.early_stopping.enabled=true", "trainer.early_stopping.metric=eval_loss",
    "trainer.early_stopping.patience=1", "trainer.early_stopping.min_delta=0.05",
)
GENERATION_SCORES = ("eval_bleu", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_exact_match")

# Alpaca-style records as the public Stanford Alpaca data has them: an instruction, an input that is often
# empty, and an answer; some with a system prompt of their own.
ALPACA_RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly: at least 30 "
               "minutes of moderate activity most days.\n3. Get enough sleep, seven to nine hours a night."},
    {"instruction": "What are the three primary colors?", "input": "",
     "output": "The three primary colors of pigment are red, blue and yellow. They cannot be made by mixing "
               "other colors, and mixing them makes every other hue."},
    {"instruction": "Describe the structure of an atom.", "input": "",
     "output": "An atom has a small, dense nucleus of protons and neutrons, surrounded by electrons that move "
               "in orbitals. Protons carry a positive charge, electrons a negative one, and neutrons none."},
    {"instruction": "How can we reduce air pollution?", "input": "",
     "output": "We can reduce air pollution by using public transport, cycling or walking, switching to "
               "renewable energy, improving the efficiency of factories and vehicles, and planting trees."},
    {"instruction": "Translate the following sentence into French.", "input": "Where is the train station?",
     "output": "Où est la gare ?"},
    {"instruction": "Summarize the following text in one sentence.",
     "input": "The city council met on Tuesday to discuss the new park. After two hours of debate, members "
              "voted to approve the budget, and construction will begin in the spring.",
     "output": "The city council approved the budget for the new park, which will be built starting in spring."},
    {"instruction": "Classify the sentiment of this review as positive or negative.",
     "input": "The battery lasts all day and the screen is gorgeous.", "output": "Positive."},
    {"instruction": "Classify the sentiment of this review as positive or negative.",
     "input": "It stopped working after a week and support never answered.", "output": "Negative."},
    {"instruction": "Write a haiku about autumn.", "input": "",
     "output": "Crimson leaves drifting,\ncool wind hums through empty boughs,\nthe year exhales slow."},
    {"instruction": "Explain what a neural network is to a ten-year-old.", "input": "",
     "output": "A neural network is a computer program that learns from examples, a bit like you do. If you "
               "show it thousands of pictures of cats, it slowly gets better at telling when a picture has a "
               "cat in it."},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The chef cooked a delicious meal.",
     "output": "A delicious meal was cooked by the chef."},
    {"instruction": "Generate a list of five fruits that are high in vitamin C.", "input": "",
     "output": "1. Oranges\n2. Kiwis\n3. Strawberries\n4. Guavas\n5. Papayas"},
    {"instruction": "Write a Python function that returns the factorial of a number.", "input": "",
     "output": "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    "
               "return result"},
    {"instruction": "Find the capital city of the given country.", "input": "Australia",
     "output": "The capital of Australia is Canberra."},
    {"instruction": "Explain the difference between weather and climate.", "input": "",
     "output": "Weather is the state of the atmosphere at a given place and time, such as a rainy afternoon. "
               "Climate is the average weather of a region over many years, such as a dry, hot summer."},
    {"instruction": "Correct the grammar in this sentence.", "input": "She don't like going to school on mondays.",
     "output": "She doesn't like going to school on Mondays."},
    {"instruction": "Suggest a name for a coffee shop near a library.", "input": "",
     "output": "Chapter & Brew: a cozy name that links reading and coffee."},
    {"instruction": "What is photosynthesis?", "input": "",
     "output": "Photosynthesis is the process by which plants, algae and some bacteria use sunlight, water and "
               "carbon dioxide to make glucose, releasing oxygen as a by-product."},
    {"instruction": "Give an example of a renewable energy source and explain how it works.", "input": "",
     "output": "Wind power is renewable: the wind turns the blades of a turbine, which spin a generator that "
               "turns the motion into electricity."},
    {"instruction": "Convert the list of words into a single sentence.", "input": "cat, garden, morning, sleeps",
     "output": "The cat sleeps in the garden every morning."},
    {"instruction": "Describe a time when you had to make a difficult decision.", "input": "",
     "output": "As a project manager, I once had to choose between delaying a release and shipping with a known "
               "bug. I delayed it by a week, told the client why, and the release went smoothly."},
    {"instruction": "Name the largest planet in our solar system.", "input": "",
     "output": "Jupiter is the largest planet in our solar system."},
    {"instruction": "Write a short product description for a reusable water bottle.", "input": "",
     "output": "Stay hydrated anywhere with our stainless-steel bottle: it keeps drinks cold for 24 hours, "
               "hot for 12, and never leaks in your bag."},
    {"instruction": "Explain why the sky is blue.", "input": "",
     "output": "Sunlight is scattered by the molecules of the air, and blue light, with its short wavelength, is "
               "scattered much more than red. That scattered blue light reaches our eyes from every direction."},
    {"system": "You are a concise assistant. Answer in one sentence.",
     "instruction": "What does HTTP stand for?", "input": "",
     "output": "HTTP stands for Hypertext Transfer Protocol."},
    {"system": "You are a patient math tutor who shows the steps.",
     "instruction": "Solve for x.", "input": "3x + 5 = 20",
     "output": "Subtract 5 from both sides: 3x = 15. Divide both sides by 3: x = 5."},
    {"system": "You are a friendly travel guide.",
     "instruction": "Recommend two things to do in Rome.", "input": "",
     "output": "Visit the Colosseum early in the morning to avoid the crowds, then walk to the Trevi Fountain "
               "and toss a coin to make sure you return."},
    {"system": "You reply only in formal English.",
     "instruction": "Write a reply declining a meeting invitation.", "input": "Meeting on Friday at 3 pm.",
     "output": "Thank you for the invitation. Unfortunately, I am unable to attend the meeting on Friday at "
               "3 pm. I would be glad to receive the minutes."},
    {"system": "You are an expert in cooking.",
     "instruction": "How do I make a simple tomato sauce?", "input": "",
     "output": "Warm olive oil in a pan, soften a chopped onion and two cloves of garlic, add a can of crushed "
               "tomatoes with salt and basil, and simmer for twenty minutes."},
    {"system": "You are a careful assistant that explains code.",
     "instruction": "What does this code print?", "input": "print(sum(range(5)))",
     "output": "It prints 10, because range(5) gives 0, 1, 2, 3 and 4, and their sum is 10."},
]
# Arithmetic and conversion tasks, also common in the public data; computed, so their answers are right.
ALPACA_RECORDS += [
    {"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": f"{celsius} degrees Celsius",
     "output": f"{celsius} degrees Celsius is {celsius * 9 / 5 + 32:g} degrees Fahrenheit."}
    for celsius in (-10, 0, 15, 20, 25, 30, 37, 100)
] + [
    {"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, numbers)),
     "output": ", ".join(map(str, sorted(numbers)))}
    for numbers in ([42, 7, 19, 3], [100, 55, 60, 1, 8], [9, 81, 27, 3], [14, 2, 88, 31, 5], [6, 66, 16, 61])
] + [
    {"instruction": "Calculate the area of a rectangle.", "input": f"Length: {length} m, width: {width} m",
     "output": f"The area is {length} x {width} = {length * width} square meters."}
    for length, width in ((4, 6), (12, 3), (7, 9), (15, 2), (8, 8))
] + [
    {"instruction": "Give the antonym of the given word.", "input": word,
     "output": f"The antonym of \"{word}\" is \"{antonym}\"."}
    for word, antonym in (("ancient", "modern"), ("generous", "stingy"), ("expand", "shrink"), ("victory", "defeat"),
                          ("transparent", "opaque"), ("scarce", "abundant"))
]

SHAREGPT_RECORDS = [
    {"conversations": [
        {"from": "human", "value": "Can you recommend a good book for learning Python?"},
        {"from": "gpt", "value": "\"Automate the Boring Stuff with Python\" by Al Sweigart is a great start: it "
                                 "teaches the language through practical projects."},
        {"from": "human", "value": "Is it free?"},
        {"from": "gpt", "value": "Yes, the author offers it free to read online, and a printed edition is sold."}]},
    {"conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "What is the boiling point of water at sea level?"},
        {"from": "gpt", "value": "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level."}]},
    {"conversations": [
        {"from": "human", "value": "How many legs does a spider have?"},
        {"from": "gpt", "value": "A spider has eight legs."},
        {"from": "human", "value": "And an insect?"},
        {"from": "gpt", "value": "An insect has six legs."}]},
    {"conversations": [
        {"from": "human", "value": "用一句话介绍长城。"},
        {"from": "gpt", "value": "长城是中国古代修建的军事防御工程，全长两万多公里，是世界上最著名的建筑之一。"}]},
    {"conversations": [
        {"from": "human", "value": "Write a limerick about a cat."},
        {"from": "gpt", "value": "There once was a cat named Lou,\nwho napped in a size-seven shoe;\nshe'd stretch "
                                 "and she'd yawn\nfrom dusk until dawn,\nthen demand that her breakfast was due."}]},
    {"conversations": [
        {"from": "human", "value": "What's the difference between a list and a tuple in Python?"},
        {"from": "gpt", "value": "A list is mutable: you can change, add or remove items. A tuple is immutable "
                                 "once created, which makes it hashable and usable as a dictionary key."}]},
    {"conversations": [
        {"from": "human", "value": "Give me a synonym for 'happy'."},
        {"from": "gpt", "value": "Joyful."},
        {"from": "human", "value": "Another one?"},
        {"from": "gpt", "value": "Cheerful."}]},
    {"conversations": [
        {"from": "human", "value": "Why do leaves change color in the fall?"},
        {"from": "gpt", "value": "As days shorten, trees stop making chlorophyll, the green pigment. Its loss "
                                 "reveals yellow and orange pigments, and some trees make red ones as well."}]},
    {"conversations": [
        {"from": "human", "value": "How do I reverse a string in JavaScript?"},
        {"from": "gpt", "value": "Split it into characters, reverse the array and join it again: "
                                 "str.split('').reverse().join('')."}]},
    {"conversations": [
        {"from": "human", "value": "What is the tallest mountain on Earth?"},
        {"from": "gpt", "value": "Mount Everest, at 8,849 meters above sea level."}]},
    {"conversations": [
        {"from": "human", "value": "Tell me a fun fact about octopuses."},
        {"from": "gpt", "value": "An octopus has three hearts and blue blood."}]},
    {"conversations": [
        {"from": "human", "value": "Suggest a weekend activity for a rainy day."},
        {"from": "gpt", "value": "Bake bread at home: it takes a few hours, fills the house with a good smell, "
                                 "and you get to eat the result."}]},
]
# Follow-up questions on a first answer, the multi-turn pattern of shared chat logs; computed answers.
SHAREGPT_RECORDS += [
    {"conversations": [
        {"from": "human", "value": f"How many minutes are there in {hours} hours?"},
        {"from": "gpt", "value": f"There are {hours * 60} minutes in {hours} hours."},
        {"from": "human", "value": "And how many seconds is that?"},
        {"from": "gpt", "value": f"{hours * 60} minutes are {hours * 3600} seconds."}]}
    for hours in (2, 3, 5, 8, 12, 24)
] + [
    {"conversations": [
        {"from": "system", "value": "You are a helpful assistant for shoppers."},
        {"from": "human", "value": f"A jacket costs ${price}. How much is it with a {discount}% discount?"},
        {"from": "gpt", "value": f"A {discount}% discount takes ${price * discount / 100:g} off, so the jacket "
                                 f"costs ${price * (100 - discount) / 100:g}."}]}
    for price, discount in ((80, 25), (120, 10), (60, 50), (45, 20), (200, 15), (90, 30))
]

# Chinese conversations in OpenAI's messages layout, each with a system turn; several are multi-turn.
MESSAGES_RECORDS = [
    {"messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "中国的首都是哪里？"},
        {"role": "assistant", "content": "中国的首都是北京。"},
        {"role": "user", "content": "北京有什么著名的景点？"},
        {"role": "assistant", "content": "北京有故宫、天安门广场、颐和园和八达岭长城等著名景点。"}]},
    {"messages": [
        {"role": "system", "content": "你是一名耐心的数学老师。"},
        {"role": "user", "content": "三加五等于多少？"},
        {"role": "assistant", "content": "三加五等于八。"}]},
    {"messages": [
        {"role": "system", "content": "请用简洁的中文回答。"},
        {"role": "user", "content": "为什么要多喝水？"},
        {"role": "assistant", "content": "水帮助身体调节体温、运输营养并排出废物，所以每天要喝足够的水。"}]},
    {"messages": [
        {"role": "system", "content": "你是一个翻译助手。"},
        {"role": "user", "content": "把“早上好”翻译成英文。"},
        {"role": "assistant", "content": "Good morning."},
        {"role": "user", "content": "那“晚安”呢？"},
        {"role": "assistant", "content": "Good night."}]},
    {"messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "推荐一种适合初学者的运动。"},
        {"role": "assistant", "content": "快走很适合初学者：不需要器材，对关节友好，每天三十分钟就有效果。"}]},
    {"messages": [
        {"role": "system", "content": "你是一名厨师。"},
        {"role": "user", "content": "西红柿炒鸡蛋怎么做？"},
        {"role": "assistant", "content": "先把鸡蛋炒熟盛出，再炒西红柿出汁，然后放回鸡蛋，加盐翻炒均匀即可。"}]},
    {"messages": [
        {"role": "system", "content": "请用简洁的中文回答。"},
        {"role": "user", "content": "一年有几个季节？"},
        {"role": "assistant", "content": "一年有四个季节：春、夏、秋、冬。"}]},
    {"messages": [
        {"role": "system", "content": "你是一个编程助手。"},
        {"role": "user", "content": "Python 中如何打印“你好”？"},
        {"role": "assistant", "content": "使用 print(\"你好\") 即可。"},
        {"role": "user", "content": "如何打印十次？"},
        {"role": "assistant", "content": "用循环：for _ in range(10): print(\"你好\")"}]},
    {"messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "月亮为什么会有圆缺变化？"},
        {"role": "assistant", "content": "月亮本身不发光，我们看到的是被太阳照亮的部分。月亮绕地球运行时，这部分的角度不断变化，所以有圆缺。"}]},
    {"messages": [
        {"role": "system", "content": "你是一名历史老师。"},
        {"role": "user", "content": "造纸术是谁改进的？"},
        {"role": "assistant", "content": "东汉的蔡伦改进了造纸术，使纸张成本更低、质量更好。"}]},
]

# Arithmetic with a follow-up question, as a tutor would answer it in Chinese.
MESSAGES_RECORDS += [
    {"messages": [
        {"role": "system", "content": "你是一名耐心的数学老师，请用中文回答。"},
        {"role": "user", "content": f"{a}加{b}等于多少？"},
        {"role": "assistant", "content": f"{a}加{b}等于{a + b}。"},
        {"role": "user", "content": f"再乘以{c}呢？"},
        {"role": "assistant", "content": f"{a + b}乘以{c}等于{(a + b) * c}。"}]}
    for a, b, c in ((3, 4, 2), (12, 8, 3), (25, 15, 4), (7, 9, 5), (30, 20, 6), (11, 13, 2), (45, 5, 3),
                    (16, 24, 5), (9, 1, 7), (50, 50, 2))
]


def _write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def _finetune(tmp_path_factory, model_dir: Path, data: str, records_file: Path, steps: int, *evaluation: str):
    tmp_path = tmp_path_factory.mktemp(data)
    return train(
        tmp_path, *FINETUNE, f"model.pretrained={model_dir}", f"+data={data}", f"data.train_files=[{records_file}]",
        f"trainer.max_steps={steps}", *(evaluation or [f"trainer.eval_every={steps // 2}"]), name=data,
    )


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory, smollm2_model_dir):
    records = _write_json(tmp_path_factory.mktemp("records") / "alpaca.json", ALPACA_RECORDS)
    return _finetune(tmp_path_factory, smollm2_model_dir, "alpaca", records, ALPACA_MAX_STEPS, *ALPACA_EARLY_STOPPING)


@pytest.fixture(scope="module")
def sharegpt_run(tmp_path_factory, smollm2_model_dir):
    records = _write_jsonl(tmp_path_factory.mktemp("records") / "sharegpt.jsonl", SHAREGPT_RECORDS)
    return _finetune(tmp_path_factory, smollm2_model_dir, "sharegpt", records, CHAT_STEPS)


@pytest.fixture(scope="module")
def messages_run(tmp_path_factory, smollm2_model_dir):
    records = _write_jsonl(tmp_path_factory.mktemp("records") / "messages.jsonl", MESSAGES_RECORDS)
    return _finetune(tmp_path_factory, smollm2_model_dir, "messages", records, CHAT_STEPS)


def _report(run) -> dict:
    return json.loads((run.run_dir / "data_report.json").read_text())


def _final_checkpoint(run) -> Path:
    return run.run_dir / "checkpoints" / (run.run_dir / "checkpoints" / "latest").read_text().strip()


def _prepared_split(run, split: str):
    """The rows training read, from the prepared-data cache entry that the run's report names."""
    import datasets

    cache_dir = run.run_dir.parent / "data_cache"  # data.cache_dir's default, <run.root>/data_cache
    return datasets.load_from_disk(str(cache_dir / _report(run)["fingerprint"] / split))


def _counted_spans(row: dict) -> list:
    """The token ids of each run of consecutive counted positions (labels != IGNORE_INDEX) of a packed row."""
    labels = np.asarray(row["labels"])
    counted = np.flatnonzero(labels != IGNORE_INDEX)
    if not counted.size:
        return []
    runs = np.split(counted, np.flatnonzero(np.diff(counted) > 1) + 1)
    return [[int(token) for token in np.asarray(row["input_ids"])[positions]] for positions in runs]


def test_alpaca_finetune_lowers_the_loss_and_evaluates_on_the_split_off_validation(alpaca_run):
    losses = alpaca_run.losses()
    assert sorted(losses) == list(range(1, ALPACA_STOPPED_AT + 1))
    assert all(np.isfinite(list(losses.values()))), losses
    evals = [row for row in alpaca_run.metrics() if "eval_loss" in row]
    assert [row["step"] for row in evals] == list(range(ALPACA_EVAL_EVERY, ALPACA_STOPPED_AT + 1, ALPACA_EVAL_EVERY))
    for row in evals:
        # An evaluation that found no batch would report a loss of 0 (perplexity 1).
        assert 0 < row["eval_loss"] < 10 and row["eval_perplexity"] == pytest.approx(np.exp(row["eval_loss"]))
    # The same validation batches every time: training on the other records helped on these.
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals


def test_alpaca_evaluations_score_generated_answers(alpaca_run):
    evals = [row for row in alpaca_run.metrics() if "eval_loss" in row]
    for row in evals:
        assert all(0 <= row[score] <= 1 for score in GENERATION_SCORES), row
    # An instruct model answering alpaca questions overlaps its references: not all of it can be 0.
    assert all(row["eval_rouge1"] > 0.1 and row["eval_bleu"] > 0 for row in evals), evals


def test_alpaca_stops_early_and_keeps_the_best_checkpoint(alpaca_run):
    assert (f"early stopping at step {ALPACA_STOPPED_AT}: eval_loss has not improved by more than 0.05"
            in alpaca_run.output), alpaca_run.output[-3000:]
    assert f"at step {ALPACA_BEST} (checkpoints/best)" in alpaca_run.output
    best = alpaca_run.run_dir / "checkpoints" / "best"
    assert best.read_text().strip() == f"step_{ALPACA_BEST:08d}"


def test_dstrain_eval_of_best_gives_the_numbers_the_run_logged_for_that_step(alpaca_run, tmp_path):
    """A single process, from the consolidated checkpoint, reproduces what 2 ranks of a ZeRO-2 engine computed:
    the same validation micro-batches, the same weights, the same greedy answers."""
    output = tmp_path / "best.json"
    command = [sys.executable, "-m", "dstrain", "eval", str(alpaca_run.run_dir / "checkpoints" / "best"),
               "--split", "validation", "--output", str(output)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = next(row for row in alpaca_run.metrics() if row["step"] == ALPACA_BEST and "eval_loss" in row)
    evaluated = json.loads(output.read_text())
    assert evaluated["step"] == ALPACA_BEST and evaluated["prompts"] == 8
    metrics = evaluated["metrics"]
    assert set(metrics) == {"eval_loss", "eval_perplexity", *GENERATION_SCORES}
    for name, value in metrics.items():
        assert value == pytest.approx(logged[name], rel=1e-6, abs=1e-9), (name, value, logged[name])
        assert name in result.stdout


def test_alpaca_data_report_counts_every_record_into_a_split(alpaca_run):
    report = _report(alpaca_run)
    splits = report["splits"]
    assert set(splits) >= {"train", "validation"}
    # No record is a duplicate or too long, so every one lands in exactly one split, about 7:2:1.
    assert sum(section["samples"] for section in splits.values()) == len(ALPACA_RECORDS)
    assert splits["train"]["samples"] > splits["validation"]["samples"] > 0
    for name, section in splits.items():
        rows = _prepared_split(alpaca_run, name)
        assert section["rows"] == len(rows)
        assert 0 < section["packing_efficiency"] <= 1
        # Packed: several samples share a row, each starting again at position 0.
        starts = sum(int((np.asarray(row["position_ids"]) == 0).sum()) for row in rows)
        assert starts >= section["samples"] > section["rows"]


def test_alpaca_checkpoint_records_smollm2s_own_chat_template(alpaca_run, smollm2_model_dir):
    from transformers import AutoTokenizer

    own_template = AutoTokenizer.from_pretrained(smollm2_model_dir).chat_template
    assert "<|im_start|>" in own_template
    manifest = json.loads((_final_checkpoint(alpaca_run) / "manifest.json").read_text())
    assert manifest["step"] == ALPACA_STOPPED_AT
    assert manifest["data"]["chat_template"] == own_template
    assert manifest["data"]["fingerprint"] == _report(alpaca_run)["fingerprint"]


def test_only_the_answers_and_their_end_of_turn_count_toward_the_loss(alpaca_run, smollm2_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    answers = {record["output"] for record in ALPACA_RECORDS}
    instructions = {record["instruction"] for record in ALPACA_RECORDS}
    spans = [tokenizer.decode(span) for row in _prepared_split(alpaca_run, "train") for span in _counted_spans(row)]
    assert len(spans) == _report(alpaca_run)["splits"]["train"]["samples"]
    # Each counted span is one whole answer and the end-of-turn token that ends generation; the newline the
    # template writes after it, the system prompt, the instruction and the role headers never count.
    counted_answers = [span.removesuffix("<|im_end|>") for span in spans]
    assert all(span.endswith("<|im_end|>") for span in spans), spans
    assert set(counted_answers) <= answers, counted_answers
    assert not any(instruction in span or "<|im_start|>" in span for span in spans for instruction in instructions)


def test_zero2_saved_the_fp32_module_and_one_optimizer_partition_per_rank(alpaca_run):
    """What DeepSpeed saved is what it held: the module's weights (the frozen base and the LoRA matrices) in
    fp32 as asked, and the trainable ones' optimizer states split between the 2 ranks, none left out."""
    checkpoint = _final_checkpoint(alpaca_run)
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert {tensor.dtype for tensor in module.values()} == {torch.float32}
    trainable = sum(tensor.numel() for name, tensor in module.items() if "lora_" in name)
    assert trainable > 0
    shards = sorted(checkpoint.glob("*optim_states.pt"))
    assert len(shards) == 2  # ZeRO-2: one partition of the optimizer per rank
    partitions = [torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
                  ["single_partition_of_fp32_groups"] for shard in shards]
    sizes = [sum(tensor.numel() for tensor in partition) for partition in partitions]
    # Each rank holds its half, padded to an even split.
    assert all(size > 0 for size in sizes) and trainable <= sum(sizes) <= trainable + len(sizes), (sizes, trainable)


@pytest.mark.parametrize("data", ["sharegpt", "messages"])
def test_chat_formats_train_and_evaluate(request, data):
    run = request.getfixturevalue(f"{data}_run")
    losses = run.losses()
    assert sorted(losses) == list(range(1, CHAT_STEPS + 1))
    assert all(np.isfinite(list(losses.values()))), losses
    evals = [row for row in run.metrics() if "eval_loss" in row]
    assert [row["step"] for row in evals] == [CHAT_STEPS // 2, CHAT_STEPS]
    assert all(0 < row["eval_loss"] < 10 for row in evals), evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    report = _report(run)
    assert report["format"] == data and report["splits"]["train"]["samples"] > 0


def test_chinese_answers_are_what_the_messages_run_counts(messages_run, smollm2_model_dir):
    """Multi-turn Chinese conversations with a system turn: every assistant turn counts, nothing else does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    answers = {turn["content"] for record in MESSAGES_RECORDS for turn in record["messages"]
               if turn["role"] == "assistant"}
    spans = [tokenizer.decode(span).removesuffix("<|im_end|>")
             for row in _prepared_split(messages_run, "train") for span in _counted_spans(row)]
    assert spans and set(spans) <= answers, spans
    assert any("\u4e00" <= character <= "\u9fff" for span in spans for character in span), spans
    for record in MESSAGES_RECORDS:
        record_answers = [turn["content"] for turn in record["messages"] if turn["role"] == "assistant"]
        if record_answers[-1] in spans:  # the record is in the training split: its earlier answers count too
            assert all(answer in spans for answer in record_answers), record_answers
