"""Model chunks wrapped in megatron-core DDP, the megatron optimizer and its LR schedule."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mod_megatron import platform
from mod_megatron.config import Config
from mod_megatron.model.gpt import build_model, transformer_config
from mod_megatron.training import cuda_graphs


def param_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def parallel_overrides(cfg: Config, pipeline_layout: Optional[str] = None) -> dict:
    """TransformerConfig settings that depend on the launch, not on the model.

    `pipeline_layout` is megatron's pipeline_model_parallel_layout string (e.g. "Et|tttL"), such as
    mod_megatron.parallel.stages.cost_aware_layout returns; None splits the layers evenly.
    """
    overrides = {}
    if pipeline_layout is not None:
        overrides["pipeline_model_parallel_layout"] = pipeline_layout
    if cfg.parallel.vpp and dist.is_initialized() and dist.get_backend() == "gloo":
        # Interleaved schedules post receives from the previous and the next stage in one
        # torch.distributed.batch_isend_irecv; at pp=2 both are the same peer with the same tag, and
        # gloo pairs them in an order that can swap activations and gradients (wrong loss, no error).
        # megatron's unbatched p2p path orders sends and receives explicitly.
        overrides["batch_p2p_comm"] = False
    return overrides


ALIGN = 16  # elements: 64 bytes of an fp32 main_grad (32 of a bf16 one)


@contextlib.contextmanager
def odd_sized_params_last(module: torch.nn.Module):
    """While megatron-core DDP is built: list the parameters whose size is not a multiple of ALIGN first.

    DDP lays each dtype's gradients (`main_grad`) out in one flat buffer, in the reverse of
    `named_parameters()` order, padded between parameters only for the distributed optimizer. One
    parameter of odd size (the MoD predictor's output bias has 1 element) then shifts every main_grad
    after it off 16-byte alignment: in the 368M MoD model on an H100 they started 4 or 8 bytes past it,
    cuBLAS ran `model.fused_wgrad`'s accumulating GEMMs on sm80 fallback kernels (~3x slower), and the
    graph chain's multi-tensor add left them to torch's per-parameter add_. Listed first, the odd ones
    lie at the buffer's end, after every other gradient. Only the buffer's order changes: checkpoints
    are by name, and the few moved parameters are reduced with the last bucket.

    Not for the distributed optimizer: there megatron pads every parameter's start to 64 elements
    itself, and its overlapped parameter all-gather expects its own order (reordered, DP=2 with
    overlapped gather drifted from the single rank by 4e-4 in the gradients: tests/distributed).
    """
    named = module.named_parameters

    def odd_first(*args, **kwargs):
        items = list(named(*args, **kwargs))
        return iter([kv for kv in items if kv[1].numel() % ALIGN] + [kv for kv in items if not kv[1].numel() % ALIGN])

    module.named_parameters = odd_first  # an instance attribute: parameters() goes through it too
    try:
        yield
    finally:
        del module.named_parameters


def build_model_chunks(cfg: Config, device: torch.device, wrap_ddp: bool = True,
                       pipeline_layout: Optional[str] = None):
    """The local model chunks (one, or vpp with virtual pipeline stages), each wrapped in DDP."""
    dtype = param_dtype(cfg, device)
    tcfg = transformer_config(cfg, dtype, **parallel_overrides(cfg, pipeline_layout))
    vpp = cfg.parallel.vpp
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = build_model(
            cfg, tcfg,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage, pp_rank=ps.get_pipeline_model_parallel_rank(),
        )
        model.to(device)
        if dtype == torch.bfloat16:
            model.bfloat16()
        chunks.append(model)
    if not wrap_ddp:
        return chunks, tcfg
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.train.distributed_optimizer,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        bucket_size=cfg.parallel.bucket_size,
        check_for_nan_in_grad=False,
    )
    graphs = cfg.train.cuda_graphs and device.type == "cuda"
    with cuda_graphs.on_capture_stream() if graphs else contextlib.nullcontext():
        wrapped = []
        for i, chunk in enumerate(chunks):
            with contextlib.nullcontext() if ddp_config.use_distributed_optimizer else odd_sized_params_last(chunk):
                wrapped.append(DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=chunk,
                                                       disable_bucketing=(i > 0)))
    # megatron's schedules call these hooks: grads are all-reduced across DP (and, for params shared
    # between stages or marked sequence_parallel, across PP/TP) before the optimizer step.
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if cfg.train.distributed_optimizer:
        tcfg.param_sync_func = None
    return wrapped, tcfg


def build_optimizer(cfg: Config, chunks, dtype: torch.dtype):
    from mod_megatron.training import fused_adam, multi_tensor

    multi_tensor.install()  # foreach grad-norm/scale kernels where megatron fell back to per-tensor loops
    t = cfg.train
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=1e-8,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=t.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    if t.distributed_optimizer:
        platform.distributed_optimizer_with_torch_adam()
    optimizer = get_megatron_optimizer(ocfg, chunks)
    fused_adam.apply(optimizer, t.fused_optimizer)  # torch's fused AdamW kernel (on GPU by default)
    return optimizer, build_scheduler(cfg, optimizer)


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Warmup + cosine LR (megatron's OptimizerParamScheduler); both engines use this one."""
    t = cfg.train
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=max(min(t.warmup_iters, t.iters - 1), 0),  # megatron needs warmup < decay steps
        lr_decay_steps=max(t.iters, 1),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.iters,
        wd_incr_style="constant",
    )


def gather_params(chunks) -> None:
    """Finish every parameter all-gather the distributed optimizer's last step left to the next forward
    (parallel.overlap_param_gather), so the model parameters are current before anything reads them
    outside a forward (a checkpoint save). A no-op otherwise."""
    for chunk in chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)
