"""GGUF export: the whole model (an adapter merged in) as one file that llama.cpp, LM Studio and Ollama load.

Written with the `gguf` package directly, following what llama.cpp's convert_hf_to_gguf.py writes for the same
model, so that no llama.cpp checkout is needed:

    weights     f32, f16 (vectors stay f32) or q8_0 (matrices whose rows do not fill 32-value blocks fall back
                to f16); llama.cpp's tensor names; for the llama architecture the rows of q_proj and k_proj
                permuted into the rotary layout llama.cpp uses; tied embeddings written once (token_embd)
    tokenizer   byte-level BPE ("gpt2" in GGUF; SmolLM2, Qwen2, Llama-3): tokens and their types, merges, and
                the pre-tokenizer's llama.cpp name, identified as convert_hf_to_gguf.py does, by hashing the
                tokenizer's output on a fixed text. SentencePiece-style BPE with byte fallback ("llama" in GGUF;
                Llama-2, TinyLlama, Mistral v0.1): tokens and types from gguf's LlamaHfVocab, as
                convert_hf_to_gguf.py writes a tokenizer.json without tokenizer.model, but scores from the merge
                ranks so that llama.cpp joins pieces in HF's order, and the UNK id. Both: BOS/EOS/PAD ids and
                whether a BOS or EOS is added
    metadata    the hyperparameters llama.cpp reads, the chat template the run trained with, a model name

Architectures: LlamaForCausalLM (Mistral-style configs included) and Qwen2ForCausalLM.
"""

import json
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from dstrain.errors import ConfigError
from dstrain.loading import TrainedModel


@dataclass(frozen=True)
class GgufArchitecture:
    name: str  # gguf.MODEL_ARCH_NAMES value
    # llama.cpp's llama graph applies rotary embeddings to interleaved pairs, HF's to halves; qwen2's does not.
    permutes_qk: bool


ARCHITECTURES: Dict[str, GgufArchitecture] = {
    "LlamaForCausalLM": GgufArchitecture("llama", permutes_qk=True),
    "Qwen2ForCausalLM": GgufArchitecture("qwen2", permutes_qk=False),
}

# convert_hf_to_gguf.py's text for identifying a BPE pre-tokenizer, and the hashes of the token ids that known
# tokenizers give for it, with the name llama.cpp implements each under (tokenizer.ggml.pre).
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# dstrain's own byte-level tokenizer has no merges, which llama.cpp refuses to load. One merge whose left side is
# several characters can never apply (BPE starts from single characters and builds only what merges make), so
# every text still becomes one token per byte; llama.cpp's "default" pre-tokenizer splitting cannot change that.
UNREACHABLE_MERGE = "<s> </s>"
BYTE_LEVEL_PRE_TOKENIZER = "default"

Q8_0_BLOCK = 32


def gguf_file_name(quantize: str) -> str:
    return f"model.{quantize}.gguf"


class GgufFormat:
    """OUTPUT/model.<quantize>.gguf (module docstring)."""

    quantize_choices: Tuple[Optional[str], ...] = ("f16", "f32", "q8_0")
    holds_adapter = False

    def write(self, trained: TrainedModel, staging: Path, merged: bool, quantize: Optional[str]) -> None:
        gguf = import_gguf()
        model = trained.whole_model()
        architecture = supported_architecture(model)
        writer = gguf.GGUFWriter(staging / gguf_file_name(quantize), architecture.name)
        writer.add_name(model_name(trained))
        writer.add_file_type(file_type(gguf, quantize))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, model.config)
        add_tokenizer(writer, trained.tokenizer, model.config.vocab_size)
        add_tensors(writer, gguf, model, architecture, quantize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install 'dstrain[gguf]'") from None
    return gguf


def supported_architecture(model: torch.nn.Module) -> GgufArchitecture:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"--format gguf does not support the {name} architecture; it supports {', '.join(ARCHITECTURES)}. "
            f"Export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return ARCHITECTURES[name]


def model_name(trained: TrainedModel) -> str:
    """What LM Studio and Ollama show: the base model's directory name and the run's name."""
    run_name = trained.cfg.run.name
    pretrained = trained.cfg.model.pretrained
    return f"{Path(pretrained).name}-{run_name}" if pretrained else run_name


def file_type(gguf, quantize: str):
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize]


def add_hyperparameters(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def rope_theta(config) -> float:
    """transformers 5 keeps rotary settings in config.rope_parameters; scaled variants (llama3, yarn, ...) need
    metadata and tensors this export does not write."""
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(
            f"--format gguf does not support rope scaling ({rope_type}) yet. Export with --format hf and "
            f"convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if is_sentencepiece_style(backend):
        add_sentencepiece_vocab(writer, tokenizer, backend, vocab_size)
    else:
        add_byte_level_vocab(writer, tokenizer, backend, vocab_size)
    add_special_tokens(writer, tokenizer)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def add_byte_level_vocab(writer, tokenizer, backend: dict, vocab_size: int) -> None:
    merges = byte_level_bpe_merges(backend)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer) if merges else BYTE_LEVEL_PRE_TOKENIZER)
    tokens, token_types = token_list(tokenizer, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges or [UNREACHABLE_MERGE])


def byte_level_bpe_merges(backend: dict) -> List[str]:
    """The merges as llama.cpp reads them ("left right"). A tokenizer that is not SentencePiece-style must be
    byte-level BPE, the other kind llama.cpp's tokenizers reproduce."""
    byte_level = "ByteLevel" in json.dumps(backend.get("decoder"))
    if backend["model"]["type"] != "BPE" or not byte_level:
        raise ConfigError(
            f"--format gguf writes byte-level BPE and SentencePiece-style (BPE with byte_fallback) tokenizers; "
            f"this one is {backend['model']['type']} with the decoder {json.dumps(backend.get('decoder'))[:80]}. "
            f"Export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]


def is_sentencepiece_style(backend: dict) -> bool:
    """Llama-2's kind (TinyLlama, Mistral v0.1, Vicuna): BPE over text with "▁" for spaces, bytes no token
    spells falling back to <0x..> tokens. The test is gguf's LlamaHfVocab's, which also wants a decoder Sequence."""
    model, decoder = backend["model"], backend.get("decoder") or {}
    return model["type"] == "BPE" and bool(model.get("byte_fallback")) and decoder.get("type") == "Sequence"


def add_sentencepiece_vocab(writer, tokenizer, backend: dict, vocab_size: int) -> None:
    """What convert_hf_to_gguf.py's _set_vocab_llama_hf writes for a Llama tokenizer.json without a
    tokenizer.model: gguf's LlamaHfVocab's tokens and types, in GGUF's "llama" (SentencePiece) model."""
    import gguf

    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)  # LlamaHfVocab reads a saved tokenizer, not an object
        vocab = gguf.vocab.LlamaHfVocab(Path(directory))
        entries = list(vocab.all_tokens())
    tokens = [text.decode() for text, _, _ in entries]
    scores = merge_rank_scores(tokens, backend)
    token_types = [token_type for _, _, token_type in entries]
    # Rows of the embedding matrix past the tokenizer, as convert_hf_to_gguf.py pads a SentencePiece vocab; one
    # entry per row, no more.
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        token_types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(token_types[:vocab_size])
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)


def merge_rank_scores(tokens: List[str], backend: dict) -> List[float]:
    """LlamaHfVocab scores every token -1000 (a placeholder, its comment says). llama.cpp's SentencePiece tokenizer
    joins the adjacent pair whose joined token scores highest, where HF's BPE applies the earliest merge; with
    equal scores llama.cpp joins leftmost first and tokenizes some words differently. Minus the rank of the merge
    that makes a token gives llama.cpp HF's order; tokens no merge makes score below all of those."""
    rank_of: Dict[str, int] = {}
    for rank, merge in enumerate(backend["model"]["merges"]):
        rank_of.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge), rank)
    return [-float(rank_of.get(token, len(rank_of))) for token in tokens]


def pre_tokenizer_name(tokenizer) -> str:
    ids = tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT, add_special_tokens=False)
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise ConfigError(
            f"--format gguf does not know this tokenizer's pre-tokenizer (hash {digest}); it knows those of "
            f"{', '.join(sorted(KNOWN_PRE_TOKENIZERS.values()))}. Export with --format hf and convert with "
            f"llama.cpp's convert_hf_to_gguf.py."
        )
    return KNOWN_PRE_TOKENIZERS[digest]


def token_list(tokenizer, vocab_size: int) -> Tuple[List[str], List[int]]:
    """One entry per row of the embedding matrix: rows past the tokenizer are unused padding."""
    from gguf import TokenType

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            token_types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            token_types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            token_types.append(TokenType.NORMAL)
    return tokens, token_types


def add_special_tokens(writer, tokenizer) -> None:
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    # What the tokenizer does, not what its config claims: llama.cpp prepends BOS only when told to.
    ids = tokenizer("a").input_ids
    writer.add_add_bos_token(bos is not None and ids[0] == bos)
    writer.add_add_eos_token(eos is not None and ids[-1] == eos)


def add_tensors(writer, gguf, model: torch.nn.Module, architecture: GgufArchitecture, quantize: str) -> None:
    config = model.config
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[architecture.name.upper()], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # no output.weight: llama.cpp then uses token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"--format gguf has no llama.cpp name for the tensor {hf_name}")
        data = tensor.detach().to(torch.float32)
        if architecture.permutes_qk:
            data = rotary_layout(hf_name, data, config)
        array, raw_type = encoded(gguf, data.numpy(), quantize)
        writer.add_tensor(gguf_name, array, raw_dtype=raw_type)


def rotary_layout(hf_name: str, data: torch.Tensor, config) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: q_proj/k_proj rows (weights and biases) from HF's
    rotate-half order to llama.cpp's interleaved pairs, per head."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rows(data, config.num_attention_heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rows(data, config.num_key_value_heads)
    return data


def permute_rows(data: torch.Tensor, heads: int) -> torch.Tensor:
    return (data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:])
            .swapaxes(1, 2).reshape(data.shape))


def encoded(gguf, array, quantize: str):
    """(data, raw GGML type or None for a plain numpy dtype). Vectors (norms, biases) stay f32, as in
    convert_hf_to_gguf.py, and so do matrices of --quantize f32."""
    if array.ndim < 2 or quantize == "f32":
        return array, None
    if quantize == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, q8_0), q8_0
    return array.astype("float16"), None
