"""PEFT methods (dstrain.adapters): none, freeze, lora (DoRA, rsLoRA, init, LoRA+), qlora, ia3, prompt, prefix.

What is covered, and why this way (the suite's time is tight):
- Refusals, fast: every impossible combination (qlora without model.pretrained or under ZeRO-3, prefix with
  gradient checkpointing, prompt/prefix with packed instruction rows, pissa/olora under ZeRO-3) and every range
  check is refused by validate on a composed config, naming the key.
- Building, fast and in-process: each method wraps the tiny model with the trainable parameters it should, and
  the trainer's count says so (a 4-bit weight counted at its real size); LoRA+'s optimizer groups and their
  schedule.
- Training, slow: one 2-rank run per method family, each under one ZeRO stage, so that together they cover
  stages 0, 2 and 3 with and without gradient checkpointing. Three of them are also the uninterrupted runs of
  the SIGKILL-resume scenarios at the end of tests/test_resume_scenarios.py (qlora with DoRA and LoRA+ under
  ZeRO-0, rsLoRA + PiSSA in bf16 under ZeRO-2, freeze under ZeRO-3), shared through shared_run, so those cost
  no extra run here.
  The others: prompt tuning under ZeRO-3 with checkpointing, prefix tuning under ZeRO-2, IA3 under ZeRO-3,
  and plain qlora under ZeRO-2 (a stage whose checkpoints must find the 4-bit weights).
  Full fine-tuning and plain LoRA are trained throughout the rest of the suite.
- Every stage, slow but cheap: tests/probes/engine_probe.py builds each method's engine under ZeRO 0, 2 and 3
  (every parameter partitioned) on one rank, one process per stage, and takes two steps: every parameter that
  requires grad changed, none of the others did, and the loss is finite (qlora under 0 and 2 only; ZeRO-1
  shares ZeRO-2's code path).
- Export, per run: the adapter loads with PeftModel.from_pretrained and gives the trained model's logits, the
  merged model too where the method merges, and what trained changed while what was frozen did not.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dstrain.checks import validate
from dstrain.compose import compose
from dstrain.errors import ConfigError
from test_resume_scenarios import rslora_pissa_scenario, freeze_scenario, qlora_scenario

# (overrides, what the one line must name)
REFUSED = [
    (["+peft=qlora"], "model.pretrained"),
    (["+peft=qlora", "model.pretrained=/m", "+zero=3"], "+zero=2"),
    (["+peft=qlora", "model.pretrained=/m", "+zero=2", "peft.lora.use_dora=true"], "+zero=0"),
    (["+peft=prefix", "trainer.gradient_checkpointing=true"], "trainer.gradient_checkpointing"),
    (["+peft=prompt", "+data=alpaca", "data.train_files=[/d.json]"], "data.packing=false"),
    (["+peft=prefix", "+data=alpaca", "data.train_files=[/d.json]"], "data.packing=false"),
    (["+peft=lora", "peft.lora.init=pissa", "+zero=3"], "peft.lora.init=pissa"),
    (["+peft=qlora", "model.pretrained=/m", "peft.lora.init=olora"], "peft.lora.init=olora"),
    (["+peft=lora", "peft.lora.init=pissa", "peft.lora.use_dora=true"], "peft.lora.use_dora=true"),
    (["+peft=lora", "peft.lora.init=olora", "+zero=3"], "peft.lora.init=olora"),
    (["+peft=lora", "peft.lora.r=0"], "peft.lora.r=0"),
    (["+peft=lora", "peft.lora.alpha=0"], "peft.lora.alpha=0"),
    (["+peft=lora", "peft.lora.dropout=1.0"], "peft.lora.dropout=1.0"),
    (["+peft=lora", "peft.lora.loraplus_lr_ratio=0"], "peft.lora.loraplus_lr_ratio=0"),
    (["+peft=prompt", "peft.prompt.num_virtual_tokens=0"], "peft.prompt.num_virtual_tokens=0"),
    (["+peft=freeze", "peft.freeze.last_blocks=-1"], "peft.freeze.last_blocks=-1"),
    (["+peft=freeze", "peft.freeze.last_blocks=3"], "model.num_hidden_layers=2"),
    (["+peft=lora", "peft.lora.init=bogus"], "peft.lora.init='bogus'"),
]


def _ids(value):
    return " ".join(value) if isinstance(value, list) else ""


@pytest.mark.parametrize("overrides, named", REFUSED, ids=_ids)
def test_impossible_peft_settings_are_refused_in_one_line_naming_the_key(overrides, named):
    with pytest.raises(ConfigError) as refused:
        validate(compose(overrides))
    message = str(refused.value)
    assert named in message and "\n" not in message, message


def test_what_works_is_not_refused():
    for overrides in (["+peft=qlora", "model.pretrained=/m", "+zero=2"], ["+peft=prompt", "+zero=3"],
                      ["+peft=prefix", "+data=alpaca", "data.train_files=[/d.json]", "data.packing=false"],
                      ["+peft=lora", "peft.lora.init=olora", "+zero=2", "peft.lora.loraplus_lr_ratio=16"]):
        validate(compose(overrides))


# ------------------------------------------------------------------------------------------ building in-process


def _built(overrides):
    from dstrain.data import build_tokenizer
    from dstrain.model import build_model

    cfg = compose(list(overrides))
    validate(cfg)
    return cfg, build_model(cfg, build_tokenizer(cfg))


def _trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


# (overrides, the pattern every trainable parameter's name matches, trainable count)
TRAINABLE = [
    (["+peft=lora"], r"\.lora_[AB]\.", 18_688),
    (["+peft=lora", "peft.lora.use_dora=true"], r"\.lora_([AB]\.|magnitude_vector)", 19_904),
    (["+peft=lora", "peft.lora.init=olora", "peft.lora.use_rslora=true"], r"\.lora_[AB]\.", 18_688),
    (["+peft=ia3"], r"\.ia3_l\.", 480),
    (["+peft=prompt", "peft.prompt.num_virtual_tokens=4"], r"^prompt_encoder\.", 4 * 64),
    # Keys and values of 2 layers, each 2 key-value heads x 16 wide (grouped-query attention).
    (["+peft=prefix", "peft.prefix.num_virtual_tokens=4"], r"^prompt_encoder\.", 4 * 2 * 2 * 32),
    (["+peft=freeze"], r"^model\.layers\.1\.", 46_208),
    (["+peft=freeze", "peft.freeze.last_blocks=0", "peft.freeze.modules=[*.mlp]", "peft.freeze.train_head=true",
      "peft.freeze.train_embeddings=true"], r"^(model\.layers\.\d\.mlp\.|lm_head\.|model\.embed_tokens\.)",
     2 * 3 * 64 * 176 + 2 * 258 * 64),
]


@pytest.mark.parametrize("overrides, pattern, count", TRAINABLE, ids=_ids)
def test_each_method_trains_what_it_should_and_the_count_says_so(overrides, pattern, count):
    from dstrain.model import parameter_counts

    _, model = _built(overrides)
    trainable = _trainable_names(model)
    assert trainable and all(re.search(pattern, name) for name in trainable), sorted(trainable)[:5]
    assert parameter_counts(model)[1] == count == sum(
        parameter.numel() for parameter in model.parameters() if parameter.requires_grad
    )


def test_prompt_tuning_gives_logits_for_the_real_tokens_only():
    _, model = _built(["+peft=prompt", "peft.prompt.num_virtual_tokens=4"])
    ids = torch.randint(0, 258, (2, 16))
    assert model(input_ids=ids).logits.shape == (2, 16, 258)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_work_with_padded_rows(method):
    """Unpacked instruction rows are padded, with an attention_mask: a padded row's real tokens get the logits
    they get alone (the virtual tokens are attended to, the padding is not)."""
    _, model = _built([f"+peft={method}", f"peft.{method}.num_virtual_tokens=4"])
    model.eval()
    ids = torch.randint(1, 258, (1, 10))
    padded = torch.cat([ids, torch.zeros((1, 6), dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones((1, 10), dtype=torch.long), torch.zeros((1, 6), dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        together = model(input_ids=padded, attention_mask=mask).logits
    assert together.shape == (1, 16, 258)
    torch.testing.assert_close(together[:, :10], alone, atol=1e-5, rtol=0)


def test_a_4bit_base_counts_its_weights_at_their_real_size(tiny_pretrained_dir):
    from dstrain.model import parameter_counts

    _, qlora = _built([f"model.pretrained={tiny_pretrained_dir}", "+peft=qlora"])
    _, lora = _built([f"model.pretrained={tiny_pretrained_dir}", "+peft=lora"])
    assert any(parameter.dtype == torch.uint8 for parameter in qlora.parameters()), "the base is not 4-bit"
    assert parameter_counts(qlora) == parameter_counts(lora) == (144_192, 18_688)


def test_loraplus_puts_the_b_matrices_in_a_group_of_their_own_that_the_schedule_scales_alike():
    from dstrain.optim import optimizer_groups, warmup_cosine_schedule, weight_decay_groups

    cfg, model = _built(["+peft=lora", "peft.lora.loraplus_lr_ratio=16", "optim.lr=1e-3"])
    groups = optimizer_groups(model, cfg)
    named = {id(parameter): name for name, parameter in model.named_parameters()}
    assert [".lora_B." in named[id(p)] for p in groups[-1]["params"]] == [True] * 14
    assert not any(".lora_B." in named[id(p)] for group in groups[:-1] for p in group["params"])
    assert groups[-1]["lr"] == 16e-3 and groups[-1]["weight_decay"] == cfg.optim.weight_decay
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    schedule = warmup_cosine_schedule(optimizer, cfg)
    for _ in range(15):
        optimizer.step()
        schedule.step()
        assert optimizer.param_groups[-1]["lr"] == pytest.approx(16 * optimizer.param_groups[0]["lr"])
    # Off (the default): the groups are exactly the weight-decay groups, so nothing else changes.
    cfg, model = _built(["+peft=lora"])
    plain, off = weight_decay_groups(model, cfg.optim.weight_decay), optimizer_groups(model, cfg)
    assert [[id(p) for p in g["params"]] for g in off] == [[id(p) for p in g["params"]] for g in plain]


# ------------------------------------------------------------------------------------ training and exporting


def _trainable_count_logged(output: str) -> int:
    return int(re.search(r"parameters, ([\d,]+) trainable", output).group(1).replace(",", ""))


def _short(*peft: str):
    """A 2-rank run of 10 steps with a final checkpoint, for the methods without a resume scenario."""
    return ("trainer.max_steps=10", "trainer.save_every=0", "scheduler.warmup_steps=2", "trainer.eval_every=0",
            "trainer.micro_batch_size=4", "data.seq_len=64", "optim.lr=1e-2", *peft)


RUNS = {
    "qlora-dora-zero0": lambda pretrained: qlora_scenario(pretrained).overrides(),
    "rslora-pissa-zero2": lambda pretrained: rslora_pissa_scenario().overrides(),
    "freeze-zero3": lambda pretrained: freeze_scenario().overrides(),
    "prompt-zero3": lambda pretrained: _short(f"model.pretrained={pretrained}", "+peft=prompt", "+zero=3",
                                              "trainer.gradient_checkpointing=true"),
    "prefix-zero2": lambda pretrained: _short(f"model.pretrained={pretrained}", "+peft=prefix", "+zero=2"),
    "qlora-zero2": lambda pretrained: _short(f"model.pretrained={pretrained}", "+peft=qlora", "+zero=2",
                                             "trainer.gradient_checkpointing=true"),
    "ia3-zero3": lambda pretrained: _short(f"model.pretrained={pretrained}", "+peft=ia3", "+zero=3",
                                           "trainer.gradient_checkpointing=true"),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _base_for(cfg):
    """The base an exported adapter applies to: model.pretrained (4-bit for qlora, as trained), else the
    randomly initialised preset from the seed, as training built it."""
    from transformers import AutoModelForCausalLM

    from dstrain.model import initialize_weights, llama_config, quantization

    if cfg.model.pretrained:
        base = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, **quantization(cfg))
        for module in base.modules():
            # bitsandbytes' CPU inference kernel needs dimensions the tiny model does not have.
            module.support_avx512bf16_for_cpu = False
        return base
    base = AutoModelForCausalLM.from_config(llama_config(cfg.model), dtype=torch.float32)
    initialize_weights(base, cfg.trainer.seed)
    return base


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_each_method_trains_on_two_ranks_and_exports_what_it_trained(tmp_path, shared_run, tiny_pretrained_dir, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dstrain.adapters import peft_method
    from dstrain.export import export_checkpoint
    from dstrain.loading import load_trained_model
    from dstrain.model import build_model, parameter_counts

    run = shared_run(*RUNS[name](tiny_pretrained_dir))
    losses = run.losses()
    assert len(losses) == 10 and min(losses[step] for step in range(5, 11)) < losses[1], losses
    checkpoint = run.run_dir / "checkpoints" / "step_00000010"
    trained = load_trained_model(checkpoint)
    cfg, method = trained.cfg, peft_method(trained.cfg)
    # The count the trainer printed is that of the model it trained (built here in-process alike).
    _, built = _built(_overrides_of(cfg))
    assert _trainable_count_logged(run.output) == parameter_counts(built)[1]

    # What trained changed; what was frozen did not (the base of a pissa init excepted: training started from
    # its residual). The model as training built it, before its first step:
    initial = build_model(cfg, trained.tokenizer).state_dict()
    now = trained.model.state_dict()
    trainable = _trainable_names(trained.model)
    for key, tensor in now.items():
        if key not in initial or initial[key].dtype != tensor.dtype:
            continue
        changed = not torch.equal(initial[key], tensor)
        if key in trainable:
            assert changed, f"{key} did not train"
        elif cfg.peft.lora.init == "default" and cfg.precision.dtype == "fp32":
            assert not changed, f"{key} was frozen but changed"

    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = _logits(trained.model, ids)
    tolerance = 1e-2 if cfg.precision.dtype == "bf16" else 1e-4
    if not method.has_adapter:
        export_checkpoint(checkpoint, tmp_path / "full")
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
        torch.testing.assert_close(_logits(exported, ids), expected, atol=1e-5, rtol=0)
        return
    merged = method.can_merge
    if not merged:
        with pytest.raises(ConfigError, match="cannot be merged"):
            export_checkpoint(checkpoint, tmp_path / "refused", merged=True)
    export_checkpoint(checkpoint, tmp_path / "adapter", merged=merged)
    adapter = PeftModel.from_pretrained(_base_for(cfg), tmp_path / "adapter").eval()
    got = _logits(adapter, ids)
    got = got[:, got.shape[1] - ids.shape[1]:]  # prompt tuning's PeftModel also returns its virtual tokens'
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    if merged:
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "merged")
        torch.testing.assert_close(_logits(exported, ids), expected, atol=1e-4, rtol=0)


def _overrides_of(cfg):
    """The overrides that rebuild cfg's model and method in-process (the rest of the run does not matter)."""
    from dataclasses import asdict

    from dstrain.config import flatten

    peft = flatten(asdict(cfg.peft), "peft.")
    overrides = [f"{key}={_value(value)}" for key, value in peft.items()]
    if cfg.model.pretrained:
        overrides.append(f"model.pretrained={cfg.model.pretrained}")
    return overrides


def _value(value):
    return "[" + ",".join(value) + "]" if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------- every ZeRO stage

PROBE = Path(__file__).resolve().parent / "probes" / "engine_probe.py"
STAGES = {"0": ("+zero=0",), "2": ("+zero=2",), "3": ("+zero=3", "zero.stage3_param_persistence_threshold=0")}
MATRIX = {
    "freeze": ("+peft=freeze", "peft.freeze.train_head=true"),
    "lora_dora_checkpointing": ("+peft=lora", "peft.lora.use_dora=true", "trainer.gradient_checkpointing=true"),
    "lora_rslora_gaussian_loraplus": ("+peft=lora", "peft.lora.use_rslora=true", "peft.lora.init=gaussian",
                                      "peft.lora.loraplus_lr_ratio=16"),
    "ia3_checkpointing": ("+peft=ia3", "trainer.gradient_checkpointing=true"),
    "prompt_checkpointing": ("+peft=prompt", "trainer.gradient_checkpointing=true"),
    "prefix": ("+peft=prefix",),
    "qlora": ("+peft=qlora",),
}


@pytest.fixture(scope="module")
def trained_under(tmp_path_factory, tiny_pretrained_dir):
    """trained_under(stage): each method's observations after two steps on one rank under that ZeRO stage."""
    from test_engine_claims import _env

    stages = {}

    def get(stage: str) -> dict:
        if stage not in stages:
            argv = []
            for name, overrides in MATRIX.items():
                if name == "qlora" and stage == "3":
                    continue  # refused (test_impossible_peft_settings_are_refused_in_one_line_naming_the_key)
                argv += ["--case", name, "trains", "trainer.eval_every=0", "trainer.micro_batch_size=2",
                         "data.seq_len=64", "optim.lr=1e-2", f"model.pretrained={tiny_pretrained_dir}",
                         *STAGES[stage], *overrides]
            root = tmp_path_factory.mktemp(f"peft_zero{stage}")
            completed = subprocess.run([sys.executable, str(PROBE), str(root), *argv], cwd=root, env=_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
            if completed.returncode != 0:
                pytest.fail(f"probe under ZeRO-{stage} failed ({completed.returncode}):\n{completed.stdout[-6000:]}")
            stages[stage] = json.loads(completed.stdout.strip().splitlines()[-1])
        return stages[stage]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_method_trains_what_it_should_under_each_zero_stage(trained_under, stage):
    observed = trained_under(stage)
    expected = [name for name in MATRIX if not (name == "qlora" and stage == "3")]
    assert sorted(observed) == sorted(expected)
    for name, case in observed.items():
        trains = case["trains"]
        assert all(math.isfinite(loss) for loss in trains["losses"]), (name, trains["losses"])
        assert trains["trainable"], name
        assert trains["trainable_unchanged"] == [], (name, trains["trainable_unchanged"][:5])
        assert trains["frozen_changed"] == [], (name, trains["frozen_changed"][:5])
        assert 0 < trains["counts"]["trainable"] < trains["counts"]["total"], (name, trains["counts"])
