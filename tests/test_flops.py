"""dstrain.flops against torch's own count: FlopCounterMode around a real forward and backward of the tiny
preset under each PEFT method. Eager attention, because FlopCounterMode does not count the CPU's fused sdpa
kernel (aten._scaled_dot_product_flash_attention_for_cpu is not in its registry), while eager attention's two
matmuls are; with them the counts agree exactly."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dstrain.compose import compose
from dstrain.data import build_tokenizer
from dstrain.flops import training_flops
from dstrain.model import build_model, parameter_counts

SEQ_LEN, BATCH = 16, 2


@pytest.mark.parametrize("method", [
    (), ("+peft=lora",), ("+peft=lora", "peft.lora.target_modules=[v_proj]"), ("+peft=freeze",),
    ("+peft=freeze", "peft.freeze.last_blocks=0", "peft.freeze.train_head=true"), ("+peft=ia3",),
    ("+peft=prompt",), ("+peft=prefix",), ("model.tie_word_embeddings=true",),
    # Tied, the trained head is the embedding too, so every block's input needs its gradient.
    ("+peft=freeze", "model.tie_word_embeddings=true", "peft.freeze.last_blocks=0", "peft.freeze.train_head=true"),
])
def test_flops_per_token_are_what_torch_counts_in_a_real_step(method):
    cfg = compose([*method, f"data.seq_len={SEQ_LEN}", "model.attn_implementation=eager"])
    model = build_model(cfg, build_tokenizer(cfg))
    ids = torch.randint(0, 250, (BATCH, SEQ_LEN))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = training_flops(cfg)
    assert counted.per_token == counter.get_total_flops() / (BATCH * SEQ_LEN)
    assert (counted.parameters, counted.trainable) == parameter_counts(model)


def test_full_training_is_six_per_weight_plus_attention():
    cfg = compose(["+model=7b", "data.seq_len=4096"])
    counted = training_flops(cfg)
    shape = counted.shape
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    matmul_weights = shape.parameters() - shape.vocab_size * shape.hidden_size - norms  # the embedding is a lookup
    attention = 6 * 2 * shape.num_layers * 4096 * shape.hidden_size
    assert counted.per_token == 6 * matmul_weights + attention
    assert counted.recompute_per_token == 0


def test_lora_pays_four_per_frozen_weight():
    """LoRA at rank 8 on a 7B model: the frozen base's forward and input gradients (4 per weight), a little
    more for the adapters, not far below full training's 6."""
    full = training_flops(compose(["+model=7b", "data.seq_len=512"]))
    lora = training_flops(compose(["+model=7b", "data.seq_len=512", "+peft=lora"]))
    assert 0.66 < lora.per_token / full.per_token < 0.70
    assert lora.trainable < 0.01 * lora.parameters
