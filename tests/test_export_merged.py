"""`dstrain export --merged` merges the adapter into the original base weights (model.pretrained as stored), not
into the checkpoint's copy of them, which bf16 training rounded. Checked on a bf16 LoRA fine-tune of the real
SmolLM2-135M-Instruct against peft's own PeftModel + merge_and_unload() on the original base."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import _env
from dstrain.errors import CheckpointError
from dstrain.loading import check_frozen_weights_unchanged, frozen_weight_names


@pytest.mark.slow
def test_merged_export_of_a_bf16_lora_run_equals_peft_merge_on_the_original_base(tmp_path, smollm2_lora_checkpoint,
                                                                                  smollm2_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    completed = subprocess.run([sys.executable, "-m", "dstrain", "export", str(smollm2_lora_checkpoint), str(out),
                                "--merged"], env=_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "trained in bf16" in completed.stdout

    original = AutoModelForCausalLM.from_pretrained(smollm2_model_dir, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    rounded = original.state_dict()[name].to(torch.bfloat16).float()
    assert (rounded - original.state_dict()[name]).abs().max() > 1e-4, "the test needs a base that bf16 rounds"
    expected = PeftModel.from_pretrained(original, out).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()

    merged_weights, expected_weights = merged.state_dict(), expected.state_dict()
    assert merged_weights.keys() == expected_weights.keys()
    for key, weight in merged_weights.items():
        torch.testing.assert_close(weight, expected_weights[key], atol=1e-6, rtol=0, msg=key)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(tensor.abs().max() > 0 for key, tensor in adapter.items() if "lora_B" in key), "nothing trained"

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_bf16_lora_run_trained_bf16_weights_with_fp32_masters(smollm2_lora_checkpoint):
    """What DeepSpeed saved is what it held: the module's weights (the frozen base and the LoRA matrices) in
    bf16, and the optimizer's master copy of the trainable ones in fp32 (ZeRO-0: DeepSpeed's bf16 optimizer)."""
    checkpoint = smollm2_lora_checkpoint.parent / smollm2_lora_checkpoint.read_text().strip()
    saved = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert {tensor.dtype for tensor in saved["module"].values()} == {torch.bfloat16}
    trainable = sum(tensor.numel() for name, tensor in saved["module"].items() if "lora_" in name)
    masters = saved["optimizer"]["fp32_groups_flat"]
    assert {tensor.dtype for tensor in masters} == {torch.float32}
    assert sum(tensor.numel() for tensor in masters) == trainable > 0


def test_a_base_that_changed_since_training_is_refused_naming_the_weight(tmp_path):
    from dstrain.config import TrainConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.model.embed_tokens.weight.requires_grad_(False)
    saved = {name: tensor.to(torch.bfloat16).float() for name, tensor in model.state_dict().items()}
    cfg = TrainConfig()
    cfg.precision.dtype = "bf16"
    frozen = frozen_weight_names(model)
    assert "model.embed_tokens.weight" in frozen and "lm_head.weight" not in frozen
    check_frozen_weights_unchanged(model, saved, frozen, cfg, tmp_path)  # bf16 rounding alone is no change

    saved["model.embed_tokens.weight"][3, 5] += 0.5
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight .* the base model changed since training"):
        check_frozen_weights_unchanged(model, saved, frozen, cfg, tmp_path)
