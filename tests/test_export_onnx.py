"""`dstrain export --format onnx [--quantize int8]` and `dstrain generate --int8`, run as real processes on real
checkpoints: the tiny model of the shared 2-rank run, and the bf16 LoRA fine-tune of SmolLM2-135M-Instruct
(merged into its base by the export). ONNX Runtime's logits are checked against the PyTorch model the
checkpoint loads as (TrainedModel.whole_model) at several shapes, padded batches included."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import STANDARD_RUN, _env

STANDARD_STEPS = 24
# fp32 sums in another order err in proportion to the magnitudes summed, so the bound is this fraction of the
# largest logit: SmolLM2's logits (up to ~20) came out up to 1.06e-4 apart (avx512 CPU; 1.05e-4 on an AVX2-only
# one, where the earlier bound of 1e-4 + 1e-5 x |logit| failed at 2 of 590k logits near 0.1).
FP32_SCALE_TOL = 1e-5
# With the MLP's output projection and lm_head in fp32 (dstrain.int8.stays_fp32), INT8 changed SmolLM2-135M's mean
# next-token loss on TEXT by +0.10 nats (ONNX Runtime) and -0.13 (PyTorch); quantising every MatMul cost +0.34,
# and a broken quantisation lands near ln(49152) = 10.8.
INT8_EXTRA_LOSS = 0.3
# The INT8 export over the fp32 one: 0.40 measured (0.26 with every MatMul quantised, 1 with none).
INT8_SIZE_RATIO = 0.42
# A rendered question and answer, for the INT8 checks: real text gives the model something to be sure of.
TEXT = ("<|im_start|>user\nWhat are the three primary colors?<|im_end|>\n<|im_start|>assistant\nThe three "
        "primary colors are red, blue and yellow. Mixing them gives every other color.<|im_end|>\n")


def dstrain(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstrain", *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), timeout=600)


def dstrain_ok(*args, env=None) -> subprocess.CompletedProcess:
    completed = dstrain(*args, env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-6000:]
    return completed


def tiny_checkpoint(shared_run) -> Path:
    """The final checkpoint of the shared fp32 ZeRO-0 run (the same run tests/test_export.py exports)."""
    run = shared_run(*STANDARD_RUN, "+zero=0", "+precision=fp32")
    return run.run_dir / "checkpoints" / f"step_{STANDARD_STEPS:08d}"


def padded_batches(vocab_size: int):
    """(input_ids, attention_mask) at shapes (1,1), (2,7) and (3,30): one row padded on the left, one on the right."""
    generator = torch.Generator().manual_seed(1)
    for batch, length in ((1, 1), (2, 7), (3, 30)):
        input_ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if batch > 1:
            attention_mask[1, : length // 3] = 0
        if batch > 2:
            attention_mask[2, length - length // 3:] = 0
        yield input_ids, attention_mask


def onnx_logits(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    return torch.from_numpy(session.run(["logits"], feeds)[0])


def torch_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def session_for(directory: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def whole_model(checkpoint: Path):
    from dstrain.loading import load_trained_model

    return load_trained_model(checkpoint).whole_model().eval()


def check_onnx_matches_pytorch(out: Path, model) -> None:
    """Logits within FP32_SCALE_TOL of the largest logit at every real position (a padded position attends to
    nothing: its logits mean nothing)."""
    session = session_for(out)
    assert [output.name for output in session.get_outputs()] == ["logits"]
    for input_ids, attention_mask in padded_batches(model.config.vocab_size):
        exported = onnx_logits(session, input_ids, attention_mask)
        reference = torch_logits(model, input_ids, attention_mask)
        assert exported.shape == reference.shape
        real = attention_mask.bool()
        bound = FP32_SCALE_TOL * reference[real].abs().max().item()
        torch.testing.assert_close(exported[real], reference[real], atol=bound, rtol=0,
                                   msg=lambda text: f"shape {tuple(input_ids.shape)}: {text}")


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:]).item()


def files_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("model.onnx*"))


def check_int8_graph_keeps_down_proj_and_lm_head_fp32(directory: Path, layers: int) -> None:
    """The INT8 graph's Linear layers: q, k, v, o, gate and up in INT8 in every layer; down_proj and lm_head fp32."""
    import onnx

    from dstrain.export_onnx import exported_module_name

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) == 6 * layers
    fp32_linears = {exported_module_name(node) for node in graph.node if node.op_type == "MatMul"}
    assert {f"model.layers.{layer}.mlp.down_proj" for layer in range(layers)} | {"lm_head"} <= fp32_linears


@pytest.mark.slow
def test_onnx_export_of_a_tiny_checkpoint_gives_pytorchs_logits(tmp_path, shared_run):
    from transformers import AutoConfig, AutoTokenizer

    checkpoint = tiny_checkpoint(shared_run)
    out = tmp_path / "onnx"
    completed = dstrain_ok("export", checkpoint, out, "--format", "onnx")
    assert "checked model.onnx against PyTorch: logits within" in completed.stdout
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json"} <= {path.name for path in out.iterdir()}
    assert not list(tmp_path.glob(".onnx*")), "the staging directory is left behind"
    assert AutoTokenizer.from_pretrained(out).get_vocab()
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    check_onnx_matches_pytorch(out, whole_model(checkpoint))


@pytest.mark.slow
def test_onnx_export_of_a_lora_fine_tune_of_smollm2_merges_it_and_int8_stays_close(tmp_path, smollm2_lora_checkpoint):
    from transformers import AutoTokenizer

    fp32_out, int8_out = tmp_path / "onnx", tmp_path / "onnx-int8"
    dstrain_ok("export", smollm2_lora_checkpoint, fp32_out, "--format", "onnx")
    merged = whole_model(smollm2_lora_checkpoint)
    check_onnx_matches_pytorch(fp32_out, merged)

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    completed = dstrain_ok("export", smollm2_lora_checkpoint, int8_out, "--format", "onnx", "--quantize", "int8",
                           env=dict(_env(), TMPDIR=str(temporary)))
    assert "the same top token at" in completed.stdout
    assert not list(temporary.glob("dstrain-onnx-fp32-*")), "the fp32 intermediate is left behind"
    assert sorted(path.name for path in int8_out.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert files_size(int8_out) < INT8_SIZE_RATIO * files_size(fp32_out)
    check_int8_graph_keeps_down_proj_and_lm_head_fp32(int8_out, merged.config.num_hidden_layers)
    tokenizer = AutoTokenizer.from_pretrained(int8_out)
    input_ids = tokenizer([TEXT], add_special_tokens=False, return_tensors="pt")["input_ids"]
    attention_mask = torch.ones_like(input_ids)
    quantized = onnx_logits(session_for(int8_out), input_ids, attention_mask)
    reference = torch_logits(merged, input_ids, attention_mask)
    assert next_token_loss(quantized, input_ids) < next_token_loss(reference, input_ids) + INT8_EXTRA_LOSS


@pytest.mark.slow
def test_generate_int8_answers_with_int8_linear_layers_but_down_proj_and_the_tied_lm_head(smollm2_lora_checkpoint):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from dstrain.inference import load_model_to_use

    completed = dstrain_ok("generate", smollm2_lora_checkpoint, "--int8", "--prompt",
                           "What are the three primary colors?", "--max-new-tokens", 12)
    assert completed.stdout.strip()

    merged = whole_model(smollm2_lora_checkpoint)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight, "SmolLM2 ties lm_head to the embeddings"
    target = load_model_to_use(smollm2_lora_checkpoint, int8=True)
    model = target.model
    layers = model.config.num_hidden_layers
    linears = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    int8 = [module for module in model.modules() if isinstance(module, DynamicInt8Linear)]
    assert linears == [f"model.layers.{layer}.mlp.down_proj" for layer in range(layers)] + ["lm_head"], \
        "the adapter is merged away, and only the MLP's output projection and lm_head stay fp32"
    assert len(int8) == 6 * layers  # q, k, v, o, gate, up
    assert all(module.weight().dtype == torch.qint8 for module in int8)
    # lm_head stays fp32, so the tie holds and the embedding is the merged model's.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight, merged.model.embed_tokens.weight, atol=0, rtol=0)

    ids = target.tokenizer([TEXT], add_special_tokens=False, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    quantized, reference = torch_logits(model, ids, mask), torch_logits(merged, ids, mask)
    assert next_token_loss(quantized, ids) < next_token_loss(reference, ids) + INT8_EXTRA_LOSS


def test_quantize_int8_is_refused_for_formats_without_it(tmp_path):
    for output_format in ("hf", "gguf"):
        completed = dstrain("export", tmp_path / "checkpoint", tmp_path / "out", "--format", output_format,
                            "--quantize", "int8")
        assert completed.returncode == 2, completed.stderr
        assert f"--quantize int8 is not available for --format {output_format}" in completed.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_onnx_export_into_a_directory_with_files_is_refused(tmp_path, shared_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    completed = dstrain("export", tiny_checkpoint(shared_run), out, "--format", "onnx")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (f"dstrain: config error: the output directory {out} already exists and is "
                                        f"not empty. Choose a new one.")
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
