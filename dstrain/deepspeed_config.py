"""The one place where the Hydra config becomes a DeepSpeed config dict."""

from dstrain.config import TrainConfig


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    trainer, zero, precision, optim = cfg.trainer, cfg.zero, cfg.precision, cfg.optim
    zero_optimization = {
        "stage": zero.stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": zero.reduce_bucket_size,
        "allgather_bucket_size": zero.allgather_bucket_size,
    }
    if zero.stage == 3:
        zero_optimization.update(
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
            # Exports consolidate from the fp32 partitions offline, so saving needs no gathered 16-bit copy.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if zero.offload_optimizer:
        zero_optimization["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_param:
        zero_optimization["offload_param"] = {"device": "cpu", "pin_memory": True}

    config = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.gradient_accumulation_steps,
        "train_batch_size": trainer.micro_batch_size * trainer.gradient_accumulation_steps * world_size,
        "gradient_clipping": trainer.gradient_clipping,
        "zero_optimization": zero_optimization,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        },
        "bf16": {"enabled": precision.dtype == "bf16"},
        "fp16": {"enabled": precision.dtype == "fp16"},
        # dstrain logs its own metrics; DeepSpeed's periodic prints would repeat them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision.dtype == "fp16":
        config["fp16"].update(
            loss_scale=precision.loss_scale,
            initial_scale_power=precision.initial_scale_power,
            loss_scale_window=precision.loss_scale_window,
            hysteresis=precision.hysteresis,
            min_loss_scale=precision.min_loss_scale,
        )
    if precision.grad_accum_dtype is not None:
        config["data_types"] = {"grad_accum_dtype": precision.grad_accum_dtype}
    return config
