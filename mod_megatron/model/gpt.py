"""Build a megatron-core GPTModel (dense or MoD) from the config tree."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from mod_megatron import platform
from mod_megatron.config import Config, ffn_hidden, padded_vocab
from mod_megatron.model.cross_entropy import cross_entropy
from mod_megatron.model.spec import block_spec


class GPT(GPTModel):
    """megatron-core's GPTModel, whose fused cross entropy without tensor parallelism is model/cross_entropy.py's
    (two passes over the logits instead of megatron's fp32 copy of them); everything else is megatron's."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.config.cross_entropy_loss_fusion or self.config.tensor_model_parallel_size > 1:
            return super().compute_language_model_loss(labels, logits)
        # labels [b, s], logits [s, b, V] -> loss [b, s], as megatron's
        return cross_entropy(logits, labels.transpose(0, 1)).transpose(0, 1).contiguous()


def transformer_config(cfg: Config, dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """megatron-core's TransformerConfig for this model and parallel layout."""
    m, p = cfg.model, cfg.parallel
    on_gpu = platform.cuda_available()
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=ffn_hidden(m),
        kv_channels=m.hidden_size // m.num_attention_heads,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        init_method_std=m.init_method_std,
        normalization=m.normalization,
        layernorm_epsilon=1e-5,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        sequence_parallel=p.sp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        # model.fused_layer on a GPU also takes a fused cross entropy: GPT's (above), or megatron-core's (TP > 1)
        cross_entropy_loss_fusion=on_gpu and cfg.train.device != "cpu" and m.fused_layer != "off",
        cross_entropy_fusion_impl="native",
    )
    from mod_megatron.moe.spec import transformer_kwargs as moe_kwargs

    kwargs.update(moe_kwargs(cfg))  # {} without MoE layers
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(cfg: Config, tcfg: TransformerConfig, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> GPTModel:
    """One pipeline stage (or virtual stage) of the GPT; the whole model when pp = 1."""
    m = cfg.model
    return GPT(
        config=tcfg,
        transformer_layer_spec=block_spec(cfg, tcfg, vp_stage=vp_stage, pp_rank=pp_rank),
        vocab_size=padded_vocab(m, cfg.parallel.tp),
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
    )
