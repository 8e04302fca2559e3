"""Record formats, chat templates and the assistant-only loss mask, with real tokenizers: SmolLM2-135M-Instruct's
(ChatML, from its GGUF), a byte-level BPE trained here with Llama-3's special tokens, pre-tokenizer and chat
template, and dstrain's byte-level tokenizer."""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dstrain.data_config import BUILTIN_TEMPLATE_NAMES
from dstrain.chat import (
    BUILTIN_TEMPLATES, RECORD_FORMATS, chat_template_for, end_of_turn_token_id, record_format, tokenize_conversation,
)
from dstrain.data import IGNORE_INDEX, byte_level_tokenizer
from dstrain.errors import ConfigError, DataError

# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-3's pre-tokenizer: runs of newlines are their own pieces, as the template's "\n\n" headers need.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

SYSTEM = "You are a terse assistant. 请简短回答。"
HISTORY = [("What is 2 plus 3?", "2 plus 3 is 5."), ("用中文说你好。", "你好！很高兴见到你。")]
INSTRUCTION, INPUT, OUTPUT = "Translate to French.", "Good morning, friend.", "Bonjour, mon ami."
ANSWERS = [answer for _, answer in HISTORY] + [OUTPUT]

RECORDS = {
    "alpaca": {"system": SYSTEM, "history": [list(pair) for pair in HISTORY], "instruction": INSTRUCTION,
               "input": INPUT, "output": OUTPUT},
    "sharegpt": {"system": SYSTEM, "conversations": [
        *({"from": side, "value": text} for pair in HISTORY for side, text in zip(("human", "gpt"), pair)),
        {"from": "human", "value": f"{INSTRUCTION}\n\n{INPUT}"}, {"from": "gpt", "value": OUTPUT}]},
    "messages": {"messages": [
        {"role": "system", "content": SYSTEM},
        *({"role": role, "content": text} for pair in HISTORY for role, text in zip(("user", "assistant"), pair)),
        {"role": "user", "content": f"{INSTRUCTION}\n\n{INPUT}"}, {"role": "assistant", "content": OUTPUT}]},
}


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def llama3():
    """A real byte-level BPE with Llama-3's special tokens, pre-tokenizer and chat template, trained on the
    test's own sentences (English and Chinese)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sentences = [SYSTEM, INSTRUCTION, INPUT, OUTPUT, *(text for pair in HISTORY for text in pair)] * 3
    tokenizer.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)


@pytest.fixture(scope="module")
def byte_level():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def llama3_base(llama3):
    """The same tokenizer as a base Llama-3's: EOS is <|end_of_text|>, while its template ends turns with
    <|eot_id|>."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(llama3.backend_tokenizer.to_str()),
                                        bos_token="<|begin_of_text|>", chat_template=LLAMA3_TEMPLATE)
    tokenizer.add_special_tokens({"eos_token": "<|end_of_text|>"})
    return tokenizer


def _byte_level_with(*specials: str):
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


@pytest.fixture(scope="module")
def byte_level_chatml():
    """A base model's tokenizer (EOS </s>) given ChatML's tokens, as a fine-tune with data.template=chatml has."""
    return _byte_level_with("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def byte_level_llama3():
    return _byte_level_with("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _ending_with(end: str):
    return lambda answer: answer + end


# (tokenizer fixture, data.template, what each answer's counted tokens decode to). SmolLM2's EOS is <|im_end|>.
CASES = [
    ("smollm2", "auto", _ending_with("<|im_end|>")),
    ("smollm2", "chatml", _ending_with("<|im_end|>")),
    ("smollm2", "alpaca", _ending_with("<|im_end|>")),
    ("smollm2", "llama-2", lambda answer: f" {answer} <|im_end|>"),
    ("llama3", "auto", _ending_with("<|eot_id|>")),
    ("llama3", "llama-3", _ending_with("<|eot_id|>")),
    ("byte_level", "alpaca", _ending_with("</s>")),
    ("byte_level", "chatml", _ending_with("<|im_end|>")),
    ("byte_level", "llama-2", lambda answer: f" {answer} </s>"),
    ("byte_level", "llama-3", _ending_with("<|eot_id|>")),
]
CASE_IDS = [f"{tokenizer}-{template}" for tokenizer, template, _ in CASES]


def _counted_runs(tokenizer, ids, labels):
    """The decoded text of each run of consecutive counted positions."""
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            runs, run = (runs + [run] if run else runs), []
        else:
            assert label == token
            run.append(token)
    runs += [run] if run else []
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]


def _tokenized(request, tokenizer_name, template_name, record_name="messages", **options):
    tokenizer = request.getfixturevalue(tokenizer_name)
    turns = RECORD_FORMATS[record_name]().conversation(RECORDS[record_name], "/data/chat.jsonl:1")
    template = chat_template_for(tokenizer, template_name)
    return tokenizer, template, turns, tokenize_conversation(tokenizer, template, turns, **options)


def test_the_formats_read_the_same_conversation():
    expected = [{"role": "system", "content": SYSTEM}]
    for user, assistant in HISTORY:
        expected += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    expected += [{"role": "user", "content": f"{INSTRUCTION}\n\n{INPUT}"}, {"role": "assistant", "content": OUTPUT}]
    for name, record in RECORDS.items():
        assert RECORD_FORMATS[name]().conversation(record, "/data/a.jsonl:3") == expected, name


def test_alpaca_history_given_as_null_is_no_history():
    # datasets fills a field that only some records of a file have with None in the others.
    record = {"instruction": "Say hi.", "input": None, "output": "Hi.", "history": None, "system": None}
    assert [turn["role"] for turn in RECORD_FORMATS["alpaca"]().conversation(record, "a.json[0]")] == ["user", "assistant"]


def test_alpaca_without_input_system_or_history_is_one_exchange():
    turns = RECORD_FORMATS["alpaca"]().conversation({"instruction": "Hi", "input": "", "output": "Hello"}, "x:1")
    assert turns == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("record_name", list(RECORDS))
@pytest.mark.parametrize("tokenizer_name,template_name,answer_tokens", CASES, ids=CASE_IDS)
def test_only_the_answers_and_their_end_of_turn_count(request, tokenizer_name, template_name, answer_tokens,
                                                      record_name):
    tokenizer, template, turns, (ids, labels) = _tokenized(request, tokenizer_name, template_name, record_name)
    assert len(labels) == len(ids)
    assert _counted_runs(tokenizer, ids, labels) == [answer_tokens(answer) for answer in ANSWERS]
    # Chinese and everything else round-trip through the tokens.
    rendered = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)
    assert tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == rendered


@pytest.mark.parametrize("tokenizer_name,template_name,answer_tokens", CASES, ids=CASE_IDS)
def test_last_turn_only_counts_the_final_answer(request, tokenizer_name, template_name, answer_tokens):
    tokenizer, _, _, (ids, labels) = _tokenized(request, tokenizer_name, template_name, last_turn_only=True)
    assert _counted_runs(tokenizer, ids, labels) == [answer_tokens(OUTPUT)]


@pytest.mark.parametrize("tokenizer_name,template_name,answer_tokens", CASES, ids=CASE_IDS)
def test_train_on_prompt_counts_everything(request, tokenizer_name, template_name, answer_tokens):
    _, _, _, (ids, labels) = _tokenized(request, tokenizer_name, template_name, train_on_prompt=True)
    assert labels == ids


def test_train_on_prompt_and_last_turn_only_together_are_refused(byte_level):
    with pytest.raises(ConfigError, match="train_on_prompt"):
        tokenize_conversation(byte_level, BUILTIN_TEMPLATES["chatml"], [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], True, True)


@pytest.mark.parametrize("template_name", list(BUILTIN_TEMPLATES))
def test_builtins_render_a_generation_prompt_that_the_answer_continues(byte_level, template_name):
    template = chat_template_for(byte_level, template_name)
    exchange = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    prompt = byte_level.apply_chat_template(exchange, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)
    whole = byte_level.apply_chat_template(exchange + [{"role": "assistant", "content": "A"}],
                                           chat_template=template, tokenize=False)
    assert whole.startswith(prompt) and whole[len(prompt):].lstrip().startswith("A")
    assert "S" in prompt and "Q" in prompt


# (tokenizer fixture, data.template, the end-of-turn token generation must stop at, or None where the template
# ends a turn with no single token of that tokenizer's).
END_OF_TURN_CASES = [
    ("llama3_base", "auto", "<|eot_id|>"),
    ("llama3_base", "llama-3", "<|eot_id|>"),
    ("byte_level_chatml", "chatml", "<|im_end|>"),
    ("byte_level_llama3", "llama-3", "<|eot_id|>"),
    ("smollm2", "auto", "<|im_end|>"),
    ("byte_level", "alpaca", "</s>"),
    ("byte_level", "llama-2", "</s>"),
    # Spelt in bytes: ten tokens, none of which ends a turn on its own.
    ("byte_level", "chatml", None),
    ("llama3", "chatml", None),
]


@pytest.mark.parametrize("tokenizer_name, template_name, end", END_OF_TURN_CASES,
                         ids=[f"{tokenizer}-{template}" for tokenizer, template, _ in END_OF_TURN_CASES])
def test_the_end_of_turn_token_is_the_one_training_counts_after_each_answer(request, tokenizer_name,
                                                                            template_name, end):
    tokenizer, template, turns, (ids, labels) = _tokenized(request, tokenizer_name, template_name)
    found = end_of_turn_token_id(tokenizer, template)
    if end is None:
        assert found is None
        return
    assert found == tokenizer.convert_tokens_to_ids(end) != tokenizer.unk_token_id
    # The token the loss taught the model to emit after every answer.
    counted = [position for position, label in enumerate(labels) if label != IGNORE_INDEX]
    ends = [position for position in counted if position + 1 not in counted]
    assert len(ends) == len(ANSWERS) and all(ids[position] == found for position in ends)


def test_without_a_template_that_renders_an_exchange_there_is_no_end_of_turn(byte_level):
    assert end_of_turn_token_id(byte_level, None) is None
    assert end_of_turn_token_id(byte_level, "{{ raise_exception('only tool calls') }}") is None


def test_the_schema_offers_exactly_the_builtin_templates():
    assert list(BUILTIN_TEMPLATE_NAMES) == list(BUILTIN_TEMPLATES)


def test_auto_is_the_tokenizers_own_template(llama3, smollm2):
    assert chat_template_for(llama3, "auto") == LLAMA3_TEMPLATE
    assert "<|im_start|>" in chat_template_for(smollm2, "auto")


def test_auto_without_a_template_of_its_own_names_the_builtins(byte_level):
    with pytest.raises(ConfigError, match="data.template") as error:
        chat_template_for(byte_level, "auto")
    assert all(name in str(error.value) for name in BUILTIN_TEMPLATES)


def test_an_unknown_template_lists_the_names(byte_level):
    with pytest.raises(ConfigError, match="'vicuna' is not one of") as error:
        chat_template_for(byte_level, "vicuna")
    assert all(name in str(error.value) for name in ["auto", *BUILTIN_TEMPLATES])


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name():
    # Like templates that drop the reasoning of all but the last answer: earlier answers render differently.
    rewriting = ("{% for message in messages %}{{ message['role'] + ': ' }}"
                 "{{ message['content'] if message['role'] != 'assistant' or loop.last else '...' }}"
                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    byte_level = byte_level_tokenizer()
    byte_level.chat_template = rewriting
    turns = RECORD_FORMATS["messages"]().conversation(RECORDS["messages"], "x:1")
    with pytest.raises(ConfigError, match=r"tokenizer's own chat template \(data.template=auto\).*rewrites"):
        tokenize_conversation(byte_level, chat_template_for(byte_level, "auto"), turns)


def test_a_tokenizer_that_merges_across_the_turn_boundary_is_refused(smollm2):
    # SmolLM2's GPT-2 pre-tokenizer merges Llama-3's "\n\n" header end with nothing, "\n" + "\n" with text.
    turns = RECORD_FORMATS["messages"]().conversation(RECORDS["messages"], "x:1")
    with pytest.raises(ConfigError, match="data.template=llama-3.*merges"):
        tokenize_conversation(smollm2, chat_template_for(smollm2, "llama-3"), turns)


def test_fields_and_roles_are_configurable():
    sharegpt = record_format("sharegpt", {
        "conversations": "dialog", "role": "speaker", "content": "text", "roles": {"me": "user", "bot": "assistant"}})
    record = {"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "yo"}]}
    assert [turn["role"] for turn in sharegpt.conversation(record, "x:1")] == ["user", "assistant"]
    alpaca = record_format("alpaca", {"output": "response"})
    assert alpaca.conversation({"instruction": "q", "response": "a"}, "x:1")[-1]["content"] == "a"


def test_unknown_fields_and_formats_are_config_errors():
    with pytest.raises(ConfigError, match=r"\['outptu'\] are not fields of data.format=alpaca"):
        record_format("alpaca", {"outptu": "response"})
    with pytest.raises(ConfigError, match="data.format='oasst' is not one of"):
        record_format("oasst", {})


def _turns(*pairs):
    return [{"from": speaker, "value": text} for speaker, text in pairs]


def _messages(*pairs):
    return [{"role": role, "content": text} for role, text in pairs]


# (format, record, text the DataError must contain besides the place).
MALFORMED = [
    ("alpaca", {"instruction": "q"}, "'output' is missing"),
    ("alpaca", {"instruction": "q", "output": 5}, "'output' is of type int, not a string"),
    ("alpaca", {"output": "a"}, "'instruction' is missing"),
    ("alpaca", {"instruction": "q", "input": ["x"], "output": "a"}, "'input' is of type list"),
    ("alpaca", {"instruction": "q", "output": "a", "system": 3}, "'system' is of type int"),
    ("alpaca", {"instruction": "q", "output": "a", "history": "hi"}, "'history' is of type str, not a list"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["u"]]}, "'history[0]' is not a [user, assistant]"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["u", None]]}, "'history[0][1]' is missing"),
    ("sharegpt", {}, "'conversations' is missing"),
    ("sharegpt", {"conversations": []}, "'conversations' holds no user or assistant turn"),
    ("sharegpt", {"conversations": _turns(("human", "q"), ("bot", "a"))}, "'conversations[1].from' is 'bot'"),
    ("sharegpt", {"conversations": _turns(("human", "q"), ("gpt", 7))}, "'conversations[1].value' is of type int"),
    ("sharegpt", {"conversations": _turns(("human", "q"), ("human", "q"), ("gpt", "a"))},
     "'conversations[1]' has role 'user' where a 'assistant' turn belongs"),
    ("sharegpt", {"conversations": _turns(("human", "q"), ("gpt", "a"), ("human", "q"))},
     "'conversations' ends with a user turn (field 'conversations[2]')"),
    ("sharegpt", {"conversations": _turns(("human", "q"), ("system", "s"), ("gpt", "a"))},
     "'conversations[1]' is a system turn after other turns"),
    ("sharegpt", {"system": "s", "conversations": _turns(("system", "s"), ("human", "q"), ("gpt", "a"))},
     "'conversations[0]' is a system turn after other turns (or after a top-level system prompt)"),
    ("sharegpt", {"conversations": ["q", "a"]}, "'conversations[0]' is not an object"),
    ("messages", {"messages": _messages(("user", [{"type": "text", "text": "q"}]), ("assistant", "a"))},
     "'messages[0].content' is of type list, not a string"),
    ("messages", {"messages": _messages(("user", "q"), ("tool", "a"))}, "'messages[1].role' is 'tool'"),
    ("messages", {"messages": _messages(("assistant", "a"), ("user", "q"), ("assistant", "a"))},
     "'messages[0]' has role 'assistant' where a 'user' turn belongs"),
    ("messages", {"messages": _messages(("system", "s"))}, "'messages' holds no user or assistant turn"),
    ("messages", {"messages": _messages(("system", "s"), ("user", "q"))}, "ends with a user turn"),
    ("messages", {"messages": {"role": "user"}}, "'messages' is of type dict, not a list"),
]


@pytest.mark.parametrize("format_name,record,problem", MALFORMED, ids=[f"{m[0]}-{m[2][:40]}" for m in MALFORMED])
def test_a_malformed_record_names_the_place_and_field(format_name, record, problem):
    where = "/data/a.parquet row 17"
    with pytest.raises(DataError) as error:
        RECORD_FORMATS[format_name]().conversation(record, where)
    message = str(error.value)
    assert message.startswith(f"{where}: ") and problem in message
