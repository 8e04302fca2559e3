"""`dstrain export --format gguf`, checked in real llama.cpp (node-llama-cpp's prebuilt CPU binary, driven by
tests/llama_cpp/greedy.mjs) and in transformers' GGUF loader, against the PyTorch model that was exported.

llama.cpp must tokenize like the Hugging Face tokenizer and continue greedily like PyTorch; transformers must read
back the same weights, tokenizer and chat template."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import STANDARD_RUN, _env

LLAMA_CPP_DIR = Path(__file__).resolve().parent / "llama_cpp"
INSTALL_LLAMA_CPP = "npm ci --prefix tests/llama_cpp --omit=optional --ignore-scripts --no-audit --no-fund"
NEW_TOKENS = 16
# q8_0 rounds every weight (and llama.cpp its activations), so where two tokens are nearly tied llama.cpp may
# take the other one, and the continuations part there. Where they part, llama.cpp's token must be within this
# many logits of PyTorch's best: a tie that rounding can flip, not another model.
Q8_0_TIE = 1.0
PLAIN_PROMPTS = ["The capital of France is", "Write a haiku about autumn.\n", "我想在苹果公司工作，因为"]
CHAT = [{"role": "user", "content": "What are the three primary colors?"}]


def _dstrain_export(checkpoint: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dstrain", "export", str(checkpoint), str(out), "--format", "gguf", *options],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
    )


def _exported_gguf(checkpoint: Path, out: Path, quantize: str) -> Path:
    completed = _dstrain_export(checkpoint, out, "--quantize", quantize)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-6000:]
    assert [path.name for path in out.iterdir()] == [f"model.{quantize}.gguf"]
    return out / f"model.{quantize}.gguf"


def _llama_cpp(gguf_file: Path, prompts: list) -> dict:
    """greedy.mjs's answer: llama.cpp's tokens and NEW_TOKENS greedy continuation for each prompt."""
    if not (LLAMA_CPP_DIR / "node_modules" / "node-llama-cpp").is_dir():
        pytest.fail(f"the GGUF tests run real llama.cpp through node-llama-cpp, which is not installed: {INSTALL_LLAMA_CPP}")
    completed = subprocess.run(
        ["node", str(LLAMA_CPP_DIR / "greedy.mjs")], input=json.dumps(
            {"model": str(gguf_file), "prompts": prompts, "maxTokens": NEW_TOKENS}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    return json.loads(completed.stdout)


def _torch_greedy(model, ids: list) -> list:
    """NEW_TOKENS argmax steps with no stop rule, as greedy.mjs runs llama.cpp."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            next_token = model(input_ids=tokens).logits[0, -1].argmax()
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return tokens[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def smollm2_merged(smollm2_lora_checkpoint):
    """The fine-tuned SmolLM2 as export sees it (LoRA merged, fp32) and the tokenizer the run trained with."""
    from dstrain.loading import load_trained_model

    trained = load_trained_model(smollm2_lora_checkpoint)
    return trained.whole_model().eval(), trained.tokenizer


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory, smollm2_lora_checkpoint):
    """`smollm2_gguf(quantize)`: the fine-tuned SmolLM2's export, once per quantize in this module."""
    files = {}

    def exported(quantize: str) -> Path:
        if quantize not in files:
            files[quantize] = _exported_gguf(smollm2_lora_checkpoint, tmp_path_factory.mktemp(quantize), quantize)
        return files[quantize]

    return exported


def _smollm2_prompts(tokenizer) -> list:
    return [*PLAIN_PROMPTS, tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["f32", "q8_0"])
def test_llama_cpp_tokenizes_and_continues_like_pytorch(smollm2_gguf, smollm2_merged, quantize):
    """SmolLM2 fine-tuned with LoRA, exported, run in llama.cpp. Tokenization (English, Chinese, the ChatML
    prompt the embedded template renders) must be identical. f32: every greedy token equals PyTorch's. q8_0:
    where a continuation parts from PyTorch's, PyTorch's logits there must show a near-tie (Q8_0_TIE): rounding
    may flip one, but not make the model another."""
    model, tokenizer = smollm2_merged
    prompts = _smollm2_prompts(tokenizer)
    answer = _llama_cpp(smollm2_gguf(quantize), prompts)
    assert answer["chatTemplate"] == tokenizer.chat_template
    assert answer["addBos"] is False, "SmolLM2's tokenizer prepends no BOS, so llama.cpp must not either"

    expected = [_torch_greedy(model, tokenizer(prompt).input_ids) for prompt in prompts]
    for prompt, result in zip(prompts, answer["results"]):
        assert result["tokens"] == tokenizer(prompt).input_ids, prompt
    continuations = [result["continuation"] for result in answer["results"]]
    if quantize == "f32":
        assert continuations == expected
        return
    for prompt, got, want in zip(prompts, continuations, expected):
        parted = next((index for index, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if parted is not None:
            with torch.no_grad():
                logits = model(torch.tensor([tokenizer(prompt).input_ids + want[:parted]])).logits[0, -1]
            gap = (logits.max() - logits[got[parted]]).item()
            assert gap < Q8_0_TIE, f"{prompt!r}: llama.cpp took token {got[parted]} at step {parted}, {gap:.2f} " \
                                   f"logits below PyTorch's {want[parted]}: not a near-tie ({got} vs {want})"


def _q8_0_error_bound(tensor: torch.Tensor) -> torch.Tensor:
    """The most q8_0 can move each value: half a step of its 32-value block's scale (block max / 127), plus the
    fp16 rounding of that scale (up to 127 steps times 2^-11). Vectors are written as f32, so exact."""
    if tensor.dim() < 2:
        return torch.zeros_like(tensor)
    blocks = tensor.reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) / 127
    return (step * (0.5 + 127 * 2.0 ** -11)).expand_as(blocks).reshape(tensor.shape)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["f32", "q8_0"])
def test_transformers_reads_the_export_back(smollm2_gguf, smollm2_merged, quantize):
    """transformers' GGUF loader (which undoes the q/k row permutation) gives back the merged model's weights:
    exactly for f32, and for q8_0 each value within its block's rounding bound (_q8_0_error_bound); and the same
    tokenizer, chat template included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = smollm2_merged
    gguf_file = smollm2_gguf(quantize)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, tensor in loaded.state_dict().items():
        if quantize == "f32":
            assert torch.equal(tensor, expected[name]), name
        else:
            excess = ((tensor - expected[name]).abs() - _q8_0_error_bound(expected[name])).max().item()
            assert excess <= 0, f"{name} is off by {excess} more than q8_0 rounding allows"

    read_back = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert read_back.chat_template == tokenizer.chat_template
    for prompt in _smollm2_prompts(tokenizer):
        assert read_back(prompt).input_ids == tokenizer(prompt).input_ids, prompt


@pytest.mark.slow
def test_preset_model_with_byte_level_tokenizer_runs_in_llama_cpp(tmp_path, shared_run):
    """dstrain's own preset model and its byte-level tokenizer, which has no merges (the export writes one that
    can never apply, and llama.cpp's default pre-tokenizer): one token per byte, and PyTorch's greedy tokens."""
    from dstrain.loading import load_trained_model

    checkpoint = shared_run(*STANDARD_RUN, "+zero=0", "+precision=fp32").run_dir / "checkpoints" / "latest"
    trained = load_trained_model(checkpoint)
    prompts = ["The cat sees a red ball", "3 plus 4 is", "héllo wörld"]
    answer = _llama_cpp(_exported_gguf(checkpoint, tmp_path / "gguf", "f32"), prompts)

    for prompt, result in zip(prompts, answer["results"]):
        ids = trained.tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.encode()), "one token per byte"
        assert result["tokens"] == ids, prompt
        assert result["continuation"] == _torch_greedy(trained.whole_model(), ids), prompt


@pytest.mark.slow
def test_qwen2_architecture_runs_in_llama_cpp(tmp_path, smollm2_tokenizer_dir):
    """A small Qwen2 (q/k/v biases, rotary without the llama permutation) with SmolLM2's tokenizer: llama.cpp's
    greedy tokens equal PyTorch's, and transformers reads the weights back exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases: zeros would hide a bias written to the wrong place
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)
    gguf_file = _write_gguf(model, tokenizer, tmp_path, "f32")

    answer = _llama_cpp(gguf_file, PLAIN_PROMPTS)
    for prompt, result in zip(PLAIN_PROMPTS, answer["results"]):
        ids = tokenizer(prompt).input_ids
        assert result["tokens"] == ids
        assert result["continuation"] == _torch_greedy(model, ids), prompt
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


# English with leading spaces, Chinese the tokenizer has no pieces for (byte fallback), digits; then words run
# together, where joining the leftmost pair first (what llama.cpp does with equal scores) gives other pieces than
# HF's merge order: with LlamaHfVocab's -1000 placeholder scores llama.cpp splits "1987gardeningherepaints" into
# ..."in", "gh", "er", "e"... and HF into ..."in", "g", "he", "re"...
SENTENCEPIECE_PROMPTS = ["The cat sees a red ball", "   three leading spaces", "我想在苹果公司工作",
                         "In 1987 and 2024: 42 birds", "1987gardeningherepaints", "gardengardeninghere2024",
                         "lightneighbourseveryoneneighbours"]


def _sentencepiece_vocab_and_merges():
    """A Llama-2-style vocabulary (there is none on this machine): BPE pieces with "▁" for spaces,
    <unk> <s> </s> and <0x00>..<0xFF> first as Llama-2 numbers them, trained here on a few hundred generated
    lines."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    rng = random.Random(0)
    subjects = ["the cat", "a small dog", "my friend", "the old teacher", "our neighbour", "the river", "everyone",
                "It", "In the end she"]
    verbs = ["sees", "likes", "paints", "follows", "remembers", "counts", "finds", "is"]
    objects = ["a red ball", "the blue house", "three apples", "the morning light", "forty seven birds",
               "the garden", "here"]
    lines = [f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} in "
             f"{rng.randint(1900, 2030)}." for _ in range(400)]
    trained = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    # split=True: pieces learned within words, as SentencePiece trains; the tokenizers below do not split.
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    special = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    trained.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def _llama2_tokenizer_json(vocab: dict, merges: list):
    """The pipeline of Llama-2's and TinyLlama's own tokenizer.json: a normalizer that always prepends "▁"
    and replaces spaces, a "<s> $A" post-processor, and the decoder Sequence LlamaHfVocab checks for."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["llama2_tokenizer_json", "transformers_llama_tokenizer"])
def test_sentencepiece_style_tokenizer_runs_in_llama_cpp(tmp_path, pipeline):
    """A tiny Llama with a Llama-2-style tokenizer, as Llama-2's tokenizer.json builds it (normalizer) and as
    transformers' LlamaTokenizerFast rebuilds it (Metaspace pre-tokenizer). llama.cpp says it adds BOS, tokenizes
    the prompts (leading spaces, byte fallback, digits, run-together words) as HF does, and continues greedily as
    PyTorch does. One difference is llama.cpp's and is asserted as such: it always prefixes the text with a space,
    as SentencePiece does, where Metaspace adds none to text that starts with one. transformers' GGUF loader reads
    back a tokenizer giving the same ids; it builds the Metaspace kind, so that too only for text not starting
    with a space."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaTokenizerFast

    vocab, merges = _sentencepiece_vocab_and_merges()
    if pipeline == "llama2_tokenizer_json":
        tokenizer = _llama2_tokenizer_json(vocab, merges)
    else:
        tokenizer = LlamaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True)
    assert "<0xE6>" in tokenizer.tokenize(SENTENCEPIECE_PROMPTS[2]), "the Chinese prompt must need byte fallback"
    torch.manual_seed(0)
    # Embedding rows past the tokenizer, as models pad their vocabulary, and an untied lm_head, as Llama-2 has.
    config = LlamaConfig(vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gguf_file = _write_gguf(model, tokenizer, tmp_path, "f32")

    # greedy.mjs tokenizes without adding BOS, so each prompt starts with "<s>", which it parses as the special
    # token; llama.cpp then prefixes the text with a space as it does after a BOS it adds itself.
    answer = _llama_cpp(gguf_file, ["<s>" + prompt for prompt in SENTENCEPIECE_PROMPTS])
    assert answer["addBos"] is True
    space = tokenizer.convert_tokens_to_ids("▁")
    for prompt, result in zip(SENTENCEPIECE_PROMPTS, answer["results"]):
        ids = tokenizer(prompt).input_ids
        if pipeline == "transformers_llama_tokenizer" and prompt.startswith(" "):
            ids = [ids[0], space, *ids[1:]]
        assert result["tokens"] == ids, (prompt, tokenizer.convert_ids_to_tokens(result["tokens"]))
        assert result["continuation"] == _torch_greedy(model, ids), prompt
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    for prompt in SENTENCEPIECE_PROMPTS:
        if not prompt.startswith(" "):
            assert read_back(prompt).input_ids == tokenizer(prompt).input_ids, prompt


def _write_gguf(model, tokenizer, directory: Path, quantize: str) -> Path:
    """GgufFormat.write on a model built here, as export calls it with a checkpoint's model."""
    from dstrain.config import TrainConfig
    from dstrain.export_gguf import GgufFormat
    from dstrain.loading import TrainedModel

    cfg = TrainConfig()
    cfg.run.name = "test"
    GgufFormat().write(TrainedModel(model, tokenizer, cfg, {}), directory, False, quantize)
    return directory / f"model.{quantize}.gguf"


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from dstrain.data import byte_level_tokenizer
    from dstrain.errors import ConfigError

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=258, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel architecture; it supports LlamaForCausalLM, Qwen2ForCausalLM"):
        _write_gguf(model, byte_level_tokenizer(), tmp_path, "f16")
    assert not list(tmp_path.iterdir())


def test_a_k_quant_is_refused_naming_quantize(tmp_path):
    completed = _dstrain_export(tmp_path / "checkpoint", tmp_path / "out", "--quantize", "q4_k")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "--quantize q4_k is not available for --format gguf: use one of ['f16', 'f32', 'q8_0']" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_of_neither_kind_is_refused(tmp_path):
    """A WordPiece tokenizer is neither byte-level nor SentencePiece-style BPE: a ConfigError saying what is
    supported, before any file is written."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from dstrain.errors import ConfigError

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "the": 3, "cat": 4, "##s": 5}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordPiece(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ConfigError, match="writes byte-level BPE and SentencePiece-style .* this one is WordPiece"):
        _write_gguf(model, tokenizer, tmp_path, "f16")
    assert not list(tmp_path.iterdir())
