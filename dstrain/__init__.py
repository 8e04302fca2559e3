"""dstrain: distributed training of causal language models on DeepSpeed, configured with Hydra."""

__version__ = "0.1.0"
