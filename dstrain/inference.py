"""A trained model loaded to use, and `dstrain generate`'s terminal side.

MODEL is what `dstrain eval` takes: a checkpoint (a step_* directory, checkpoints/best or checkpoints/latest)
or an exported directory (a full model, or an adapter on its base). A checkpoint's tokenizer carries the chat
template its run trained with (from the manifest), and an export's tokenizer was saved with it, so prompts
are rendered exactly as the training data was: the template, then the tokens without added special tokens.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, TextIO

import torch

from dstrain.generation import Generated, OptionError, SamplingOptions, generate


@dataclass
class ModelToUse:
    """A model in fp32 and eval mode on the CPU, ready to generate with its KV cache."""

    model: torch.nn.Module
    tokenizer: object
    # The tokens a prompt and its answer may take together: the model's position embeddings.
    context_length: int
    # Generation ends at any of them: the chat template's end of turn, the tokenizer's EOS and the model config's.
    stop_token_ids: List[int]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt_ids(self, messages: List[Dict[str, str]]) -> List[int]:
        """The conversation rendered with the model's chat template, ending with the assistant's turn opened."""
        import jinja2

        if not self.has_chat_template:
            raise OptionError("messages", "need a chat template, and this model has none (it trained on plain "
                                          "text): complete a plain-text prompt instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as error:
            raise OptionError("messages", f"cannot be rendered with the model's chat template: {error}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, text: str) -> List[int]:
        return self.tokenizer(text)["input_ids"] if text else []

    def generate(self, prompt_ids: List[int], options: SamplingOptions,
                 on_text: Callable[[str], None] = lambda text: None,
                 cancelled: Callable[[], bool] = lambda: False) -> Generated:
        return generate(self.model, self.tokenizer, prompt_ids, options, self.stop_token_ids, on_text, cancelled)


def load_model_to_use(path: Path, int8: bool = False) -> ModelToUse:
    """int8: the Linear layers dynamically quantised to INT8 (dstrain.int8), an adapter merged in first."""
    from transformers import GenerationConfig
    from transformers.utils import logging as transformers_logging

    from dstrain.data import pad_id
    from dstrain.evaluation import stop_token_ids
    from dstrain.loading import load_exported_model, load_trained_model, locate_model
    from dstrain.trainer import silence_library_notices

    silence_library_notices()
    transformers_logging.disable_progress_bar()  # loading bars on stderr would mix with the streamed answers
    location, is_checkpoint = locate_model(Path(path))
    if is_checkpoint:
        trained = load_trained_model(location)
        model, tokenizer = trained.model.eval(), trained.tokenizer
    else:
        model, tokenizer = load_exported_model(location)
    if int8:
        from dstrain.int8 import quantized_int8

        model = quantized_int8(model)
    stops = stop_token_ids(tokenizer, model.config.eos_token_id, tokenizer.chat_template)
    # generate() fills every option a request leaves unset from the model's own generation config: training
    # saves use_cache=False there, and a pretrained model may bring sampling defaults. Only what the user asks
    # for should count.
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad_id(tokenizer), use_cache=True)
    model.config.use_cache = True
    return ModelToUse(model, tokenizer, int(model.config.max_position_embeddings), stops)


def generate_in_terminal(path: Path, options: SamplingOptions, prompt: Optional[str], system: Optional[str],
                         chat: bool, max_new_tokens_given: bool, output: TextIO = sys.stdout,
                         int8: bool = False) -> None:
    """`--prompt`: one answer (to a user turn when the model has a chat template, else a plain continuation).
    `--chat`: a conversation, a user turn per line of stdin, until end of input. Answers are streamed. An
    answer may take max_new_tokens when given (which must fit the context), else up to the default that the
    context leaves room for. The options are checked before the model loads, which takes a while."""
    options.check()
    if not chat and not (prompt or "").strip():
        raise OptionError("prompt", "is empty: give some text")
    target = load_model_to_use(path, int8)
    if system and not target.has_chat_template:
        raise OptionError("system", "needs a chat template, and this model has none (it trained on plain text)")
    if not chat:
        messages = _with_system(system) + [{"role": "user", "content": prompt}]
        ids = target.chat_prompt_ids(messages) if target.has_chat_template else target.text_prompt_ids(prompt)
        _answer(target, ids, options, max_new_tokens_given, output)
        return
    if not target.has_chat_template:
        raise OptionError("chat", "needs a chat template, and this model has none (it trained on plain text): "
                                  "use --prompt TEXT to continue a text")
    messages = _with_system(system)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input ends the conversation
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\r\n")})
        answer = _answer(target, target.chat_prompt_ids(messages), options, max_new_tokens_given, output)
        messages.append({"role": "assistant", "content": answer.text})


def _with_system(system: Optional[str]) -> List[Dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def _answer(target: ModelToUse, prompt_ids: List[int], options: SamplingOptions, max_new_tokens_given: bool,
            output: TextIO) -> Generated:
    if max_new_tokens_given:
        options.check_fits(len(prompt_ids), target.context_length)
    else:
        options = options.capped(len(prompt_ids), target.context_length)

    def show(text: str) -> None:
        output.write(text)
        output.flush()

    answer = target.generate(prompt_ids, options, on_text=show)
    output.write("\n")
    output.flush()
    return answer
