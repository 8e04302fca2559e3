"""Instruction and chat records: record formats, chat templates, and tokenising with a loss mask.

A record (one JSONL line or table row) becomes a canonical conversation, a list of turns
{"role": "system" | "user" | "assistant", "content": str}: an optional system turn first, then user and
assistant turns in alternation, ending with the assistant's answer. A format in RECORD_FORMATS reads one
record layout (alpaca, sharegpt, messages) with configurable field names.

A chat template (Hugging Face's Jinja convention) renders the conversation to text. The counted positions of
`labels` are each assistant turn's content and its end-of-turn token(s). They are found by rendering the
conversation up to the turn with the generation prompt, and through the turn, and diffing the token ids
(Axolotl's approach), so stock templates without `{% generation %}` markers work.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import jinja2

from dstrain.data import IGNORE_INDEX
from dstrain.errors import ConfigError, DataError
from dstrain.registry import Registry

Turn = Dict[str, str]

# --- Record formats ------------------------------------------------------------------------------------------


def _string(value: Any, where: str, field_name: str, fix: str) -> str:
    if not isinstance(value, str):
        shown = "missing" if value is None else f"of type {type(value).__name__}, not a string"
        raise DataError(f"{where}: field {field_name!r} is {shown}. {fix}")
    return value


def _list(value: Any, where: str, field_name: str, fix: str) -> list:
    if not isinstance(value, list):
        shown = "missing" if value is None else f"of type {type(value).__name__}, not a list"
        raise DataError(f"{where}: field {field_name!r} is {shown}. {fix}")
    return value


def _checked(turns: List[Turn], labels: List[str], where: str, field_name: str) -> List[Turn]:
    """Turns in the canonical order, or a DataError naming the first turn (by its `labels` entry) out of it.

    An optional system turn comes first; then user and assistant alternate, and the last turn is the
    assistant's, the answer training learns."""
    if not any(turn["role"] != "system" for turn in turns):
        raise DataError(
            f"{where}: field {field_name!r} holds no user or assistant turn. A record needs at least one user "
            f"turn and the assistant's answer; fix or drop it."
        )
    first = 1 if turns[0]["role"] == "system" else 0
    for index in range(first, len(turns)):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if turns[index]["role"] != expected:
            raise DataError(
                f"{where}: {labels[index]} has role {turns[index]['role']!r} where a {expected!r} turn belongs. "
                f"After an optional first system turn, user and assistant turns must alternate, starting with "
                f"user; fix the record's turns."
            )
    if turns[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: field {field_name!r} ends with a user turn ({labels[-1]}). It must end with the "
            f"assistant's answer, which is what training learns: add the answer or drop the last turn."
        )
    return turns


@dataclass
class AlpacaFields:
    # The task, the first part of the user turn.
    instruction: str = "instruction"
    # Optional context, joined to the instruction with a blank line when it is non-empty.
    input: str = "input"
    # The answer: the assistant turn that counts toward the loss.
    output: str = "output"
    # Optional system prompt.
    system: str = "system"
    # Optional earlier exchanges, as a list of [user, assistant] pairs before this instruction.
    history: str = "history"


class AlpacaFormat:
    """{"instruction", "input", "output"}, with optional "system" and "history" (LLaMA-Factory's layout)."""

    Fields = AlpacaFields

    def __init__(self, fields: Optional[AlpacaFields] = None):
        self.fields = fields or AlpacaFields()

    def conversation(self, record: dict, where: str) -> List[Turn]:
        names = self.fields
        turns = _system_turn(record, names.system, where)
        for index, pair in enumerate(_list(record.get(names.history) or [], where, names.history,
                                           "Give history as a list of [user, assistant] pairs, or leave it out.")):
            place = f"{names.history}[{index}]"
            if not (isinstance(pair, list) and len(pair) == 2):
                raise DataError(f"{where}: field {place!r} is not a [user, assistant] pair. Fix the record's history.")
            turns.append({"role": "user", "content": _string(pair[0], where, f"{place}[0]", "Give the user's text.")})
            turns.append({"role": "assistant", "content": _string(pair[1], where, f"{place}[1]",
                                                                  "Give the assistant's text.")})
        instruction = _string(record.get(names.instruction), where, names.instruction,
                              f"Give the task in {names.instruction!r}, or set the format's instruction field.")
        context = record.get(names.input) or ""
        context = _string(context, where, names.input, f"Give {names.input!r} as a string, or leave it out.")
        turns.append({"role": "user", "content": f"{instruction}\n\n{context}" if context else instruction})
        turns.append({"role": "assistant", "content": _string(
            record.get(names.output), where, names.output,
            f"Every record needs the answer in {names.output!r}; fix the record or set the format's output field.")})
        return turns


def _system_turn(record: dict, system_field: str, where: str) -> List[Turn]:
    """The record's optional top-level system prompt as a list of zero or one turn."""
    system = record.get(system_field) or ""
    system = _string(system, where, system_field, f"Give the system prompt {system_field!r} as a string.")
    return [{"role": "system", "content": system}] if system else []


def _default_sharegpt_roles() -> Dict[str, str]:
    return {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SharegptFields:
    # The list of turns.
    conversations: str = "conversations"
    # Each turn's speaker.
    role: str = "from"
    # Each turn's text.
    content: str = "value"
    # Optional top-level system prompt (a system turn may instead come first in the conversation).
    system: str = "system"
    # Speaker names in the data -> canonical roles (system, user, assistant).
    roles: Dict[str, str] = field(default_factory=_default_sharegpt_roles)


class SharegptFormat:
    """{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}."""

    Fields = SharegptFields

    def __init__(self, fields: Optional[SharegptFields] = None):
        self.fields = fields or SharegptFields()

    def conversation(self, record: dict, where: str) -> List[Turn]:
        names = self.fields
        return _turn_list(record, where, names.conversations, names.role, names.content, names.roles,
                          _system_turn(record, names.system, where),
                          f"map it to system, user or assistant in the format's roles ({names.roles})")


@dataclass
class MessagesFields:
    # The list of messages.
    messages: str = "messages"
    # Each message's role: system, user or assistant.
    role: str = "role"
    # Each message's text.
    content: str = "content"


class MessagesFormat:
    """OpenAI-style {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}."""

    Fields = MessagesFields

    def __init__(self, fields: Optional[MessagesFields] = None):
        self.fields = fields or MessagesFields()

    def conversation(self, record: dict, where: str) -> List[Turn]:
        names = self.fields
        identity = {role: role for role in ("system", "user", "assistant")}
        return _turn_list(record, where, names.messages, names.role, names.content, identity, [],
                          "use system, user or assistant")


def _turn_list(record: dict, where: str, list_field: str, role_field: str, content_field: str,
               roles: Dict[str, str], system: List[Turn], role_fix: str) -> List[Turn]:
    """The checked turns of a list of {role, content} dicts, after the record's top-level system turn if any."""
    items = _list(record.get(list_field), where, list_field, f"Give the turns as a list under {list_field!r}.")
    turns, labels = list(system), ["the top-level system prompt"] * len(system)
    for index, item in enumerate(items):
        place = f"{list_field}[{index}]"
        if not isinstance(item, dict):
            raise DataError(
                f"{where}: field {place!r} is not an object with {role_field!r} and {content_field!r}; fix it."
            )
        speaker = item.get(role_field)
        if speaker not in roles:
            raise DataError(f"{where}: field '{place}.{role_field}' is {speaker!r}, not a known role: {role_fix}.")
        content = _string(item.get(content_field), where, f"{place}.{content_field}",
                          "Each turn's text must be a string.")
        if roles[speaker] == "system" and turns:
            raise DataError(
                f"{where}: field {place!r} is a system turn after other turns (or after a top-level system "
                f"prompt). Only one system prompt, first, is allowed; fix the record."
            )
        turns.append({"role": roles[speaker], "content": content})
        labels.append(f"field {place!r}")
    return _checked(turns, labels, where, list_field)


RECORD_FORMATS: Registry = Registry("data.format")
RECORD_FORMATS.register("alpaca")(AlpacaFormat)
RECORD_FORMATS.register("sharegpt")(SharegptFormat)
RECORD_FORMATS.register("messages")(MessagesFormat)

# --- Chat templates --------------------------------------------------------------------------------------------

# Built-in templates in Hugging Face's chat-template convention. Each renders a system turn, any number of
# user/assistant turns, and the generation prompt; bos_token/eos_token are the tokenizer's, where the real
# format uses them.
BUILTIN_TEMPLATES: Dict[str, str] = {
    # Stanford Alpaca's prompt, with LLaMA-Factory's multi-turn extension: each answer ends with EOS.
    "alpaca": (
        "{{- bos_token }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
        "{%- else %}{{- 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\\n\\n' }}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token + '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
    ),
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    # Meta's Llama-2-chat template: the system prompt goes inside the first [INST]. The prompt already ends
    # where the answer starts, so add_generation_prompt adds nothing.
    "llama-2": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if loop.first and system_message %}"
        "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{%- else %}{%- set content = message['content'] %}{%- endif %}"
        "{%- if message['role'] == 'user' %}{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{%- else %}{{- ' ' + content | trim + ' ' + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
    # Meta's Llama-3-Instruct template.
    "llama-3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
}
# Built-ins whose answers end with the tokenizer's EOS: without one the model would never learn to stop.
_TEMPLATES_ENDING_WITH_EOS = ("alpaca", "llama-2")


def chat_template_for(tokenizer, name: str) -> str:
    """The Jinja chat template that `name` selects: "auto" is the tokenizer's own, anything else a built-in."""
    if name == "auto":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # A tokenizer may carry several named templates; "default" is the chat one.
            own = own.get("default")
        if not own:
            raise ConfigError(
                f"data.template=auto, but the tokenizer has no chat template of its own. Set data.template to "
                f"one of the built-ins: {list(BUILTIN_TEMPLATES)}."
            )
        return own
    if name not in BUILTIN_TEMPLATES:
        raise ConfigError(f"data.template={name!r} is not one of {['auto', *BUILTIN_TEMPLATES]}")
    if name in _TEMPLATES_ENDING_WITH_EOS and tokenizer.eos_token is None:
        raise ConfigError(f"data.template={name} ends every answer with EOS, and the tokenizer has no EOS token.")
    return BUILTIN_TEMPLATES[name]


def _template_name(chat_template: str) -> str:
    """How an error names the template: the data.template setting that chose it."""
    for name, builtin in BUILTIN_TEMPLATES.items():
        if builtin == chat_template:
            return f"data.template={name}"
    return "the tokenizer's own chat template (data.template=auto)"


# --- Tokenising with a loss mask --------------------------------------------------------------------------------


def _render(tokenizer, chat_template: str, turns: List[Turn], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(turns, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise ConfigError(f"{_template_name(chat_template)} failed to render a conversation: {error}") from None


def _check_prefix(shorter: Tuple[str, List[int]], longer: Tuple[str, List[int]], chat_template: str,
                  what: str) -> None:
    """Diffing finds a turn's tokens only where the shorter rendering's tokens start the longer one's."""
    (short_text, short_ids), (long_text, long_ids) = shorter, longer
    if long_ids[: len(short_ids)] == short_ids:
        return
    why = (
        "The template rewrites earlier turns as the conversation grows (as templates that drop reasoning do)"
        if not long_text.startswith(short_text) else
        "The tokenizer merges the text at the turn's boundary into other tokens than the shorter text alone "
        "gives, so training would see other tokens than generation does"
    )
    raise ConfigError(
        f"{_template_name(chat_template)}: the tokens of {what} do not start the tokens of the longer "
        f"conversation, so the assistant's tokens cannot be found by diffing. {why}; choose a data.template "
        f"that suits this tokenizer."
    )


def _assistant_spans(tokenizer, chat_template: str, turns: List[Turn], counted: List[int],
                     whole: Tuple[str, List[int]]) -> List[Tuple[int, int]]:
    """[start, end) positions in the whole conversation's tokens of each counted assistant turn: its content
    and end-of-turn token(s), without the whitespace the template puts between turns (such as the newline
    after ChatML's <|im_end|>), which the model never generates: it stops at the end of its turn."""
    texts = []
    for index in counted:
        texts.append(_render(tokenizer, chat_template, turns[:index], add_generation_prompt=True))
        # The last turn's rendering through itself is the whole conversation, rendered already.
        through = whole[0] if index == len(turns) - 1 else _render(tokenizer, chat_template, turns[: index + 1],
                                                                    add_generation_prompt=False)
        texts.append(through.rstrip())
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    spans = []
    for position, index in enumerate(counted):
        prompt = (texts[2 * position], encoded[2 * position])
        through = (texts[2 * position + 1], encoded[2 * position + 1])
        _check_prefix(prompt, through, chat_template, f"the prompt before turn {index} (counted from 0)")
        _check_prefix(through, whole, chat_template, f"the conversation through turn {index}")
        spans.append((len(prompt[1]), len(through[1])))
    return spans


_PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Probe answer 42."}]


def end_of_turn_token_id(tokenizer, chat_template) -> Optional[int]:
    """The token the template puts right after an assistant answer (ChatML's <|im_end|>, Llama-3's <|eot_id|>,
    EOS for alpaca and llama-2), found by rendering a probe exchange with and without its answer, as training
    finds answer spans. None without a template, when it cannot render the probe, or when the end is not one
    special or added token (an end spelled in ordinary text cannot be stopped at in one token)."""
    if isinstance(chat_template, dict):  # several named templates: "default" is the chat one
        chat_template = chat_template.get("default")
    if not chat_template:
        return None
    try:
        prompt = _render(tokenizer, chat_template, _PROBE[:1], add_generation_prompt=True)
        through = _render(tokenizer, chat_template, _PROBE, add_generation_prompt=False).rstrip()
    except ConfigError:
        return None
    answer = _PROBE[1]["content"]
    start = through.find(answer, len(prompt)) if through.startswith(prompt) else -1
    if start < 0:
        return None
    # Whitespace before the token (llama-2's " </s>") is generated as text before the model stops.
    ids = tokenizer(through[start + len(answer):].strip(), add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        return None
    return ids[0] if ids[0] in {*tokenizer.all_special_ids, *tokenizer.get_added_vocab().values()} else None


def tokenize_conversation(tokenizer, chat_template: str, turns: List[Turn], train_on_prompt: bool = False,
                          last_turn_only: bool = False) -> Tuple[List[int], List[int]]:
    """The conversation's token ids and labels aligned with them: each counted assistant turn's content and
    end-of-turn token(s) keep their ids, every other position is IGNORE_INDEX.

    The template must emit BOS itself where the model wants one (stock templates do): the rendered text is
    tokenised without adding special tokens. train_on_prompt counts every position; last_turn_only counts
    only the final assistant turn (earlier ones are context)."""
    if train_on_prompt and last_turn_only:
        raise ConfigError("data.train_on_prompt and data.last_turn_only contradict each other: set at most one.")
    text = _render(tokenizer, chat_template, turns, add_generation_prompt=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if train_on_prompt:
        return ids, list(ids)
    counted = [index for index, turn in enumerate(turns) if turn["role"] == "assistant"]
    if last_turn_only:
        counted = counted[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in _assistant_spans(tokenizer, chat_template, turns, counted, (text, ids)):
        labels[start:end] = ids[start:end]
    return ids, labels


def record_format(format_name: str, field_names: Dict[str, Any]):
    """The format component that data.format names, reading the field names that data.fields sets."""
    component = RECORD_FORMATS[format_name]
    known = [spec.name for spec in dataclasses.fields(component.Fields)]
    unknown = sorted(set(field_names) - set(known))
    if unknown:
        raise ConfigError(f"data.fields: {unknown} are not fields of data.format={format_name}; its fields are {known}")
    return component(component.Fields(**field_names))
