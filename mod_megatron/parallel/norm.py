"""The torch LayerNorm / RMSNorm of megatron's local spec, usable with sequence parallelism.

megatron-core's `WrappedTorchNorm` asserts `not config.sequence_parallel`. The norm itself is per
token, so it is correct on a slice of the sequence; what sequence parallelism needs is that the norm's
weight (and bias) gradients, partial on each tensor-parallel rank, are summed over the TP group.
megatron's `finalize_model_grads` does that for every parameter marked `sequence_parallel = True`,
which is all this wrapper adds.
"""
from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """Builds `torch.nn.LayerNorm` or `torch.nn.RMSNorm` with params marked `sequence_parallel`."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
