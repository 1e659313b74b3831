"""`train.engine: deepspeed` — the same model and loop through `deepspeed.initialize` (ZeRO 1/2).

The model is the same megatron-core GPTModel (tensor parallelism stays megatron-core's: DeepSpeed
gets megatron's process groups through a small `mpu` adapter, so ZeRO shards optimizer state and
gradients over the data-parallel group only). Optimizer: DeepSpeed's AdamW with megatron's
parameter groups (no weight decay on 1-D params and biases) and megatron's LR schedule object, so
the update matches the megatron engine. Pipeline parallelism is megatron's, not DeepSpeed's:
this engine runs with parallel.pp = 1.

Checkpoints keep the stack's atomic layout: DeepSpeed writes into `iter_NNNNNNN.tmp/` with its own
`latest` disabled, then the directory is renamed and our tracker moved (training/checkpoint.py).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mod_megatron.model.gpt import build_model, transformer_config
from mod_megatron.training import checkpoint as ckpt
from mod_megatron.training.builder import build_scheduler
from mod_megatron.training.trainer import Trainer, mean_loss

class MegatronMPU:
    """The `mpu` interface DeepSpeed reads, served from megatron-core's parallel state (pp = 1)."""

    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)

    @staticmethod
    def get_data_parallel_group_ranks():
        return dist.get_process_group_ranks(ps.get_data_parallel_group())


def param_groups(model: torch.nn.Module) -> list[dict]:
    """megatron's default grouping: no weight decay on 1-D parameters (norms, router) and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def ds_config(cfg, dtype: torch.dtype, num_microbatches: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "train_batch_size": t.global_batch_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": 1e-8, "weight_decay": t.weight_decay,
            # torch's AdamW: no JIT-compiled fused kernel needed (DeepSpeed would build one on first use).
            "torch_adam": True}},
        "gradient_clipping": t.clip_grad,
        # parallel.overlap_grad_reduce: ZeRO reduces gradients bucket by bucket during the backward
        # (DeepSpeed's own default for stages 1-2 is after it); parallel.bucket_size: elements per bucket
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": cfg.parallel.overlap_grad_reduce,
                              **({"reduce_bucket_size": cfg.parallel.bucket_size} if cfg.parallel.bucket_size else {})},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedTrainer(Trainer):
    """Trainer whose model, optimizer, steps and checkpoints go through a DeepSpeed engine."""

    ENGINE = "deepspeed"

    def _build(self, pipeline_layout: Optional[str]) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probing
        import deepspeed

        os.environ.setdefault("LOCAL_RANK", str(self.layout.rank % max(1, torch.cuda.device_count() or 1)))
        cfg = self.cfg
        self.tcfg = transformer_config(cfg, self.dtype)
        model = build_model(cfg, self.tcfg).to(self.device)
        if self.dtype == torch.bfloat16:
            model.bfloat16()
        nmb = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.layout.dp)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model), config=ds_config(cfg, self.dtype, nmb),
            mpu=MegatronMPU, dist_init_required=False)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.chunks = [self.engine]  # routing_stats() and friends unwrap .module

    # ------------------------------------------------------------------ steps
    def _micro_losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        losses = self.engine(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float()
        mask = batch["loss_mask"].to(losses.dtype)
        return (losses * mask).sum(), mask.sum()

    def _reduce(self, total: torch.Tensor) -> float:
        if self.layout.dp > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        return mean_loss(total).item()

    def train_step(self, it) -> dict:
        from mod_megatron.model.predictor import set_aux_loss_scale

        self.engine.train()
        # MoD aux losses reach backward through MoEAuxLossAutoScaler; weight them like the LM loss,
        # which DeepSpeed divides by the accumulation steps.
        set_aux_loss_scale(torch.full((1,), 1.0 / self.num_microbatches, device=self.device))
        total = torch.zeros(2, device=self.device)
        for _ in range(self.num_microbatches):
            loss_sum, n = self._micro_losses(next(it))
            self.engine.backward(loss_sum / n.clamp(min=1))  # DeepSpeed divides by the accumulation steps
            self.engine.step()  # updates only at the accumulation boundary
            total += torch.stack([loss_sum.detach(), n.detach()])
        self.scheduler.step(increment=1)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        return {"loss": self._reduce(total), "grad_norm": grad_norm, "skipped": False}

    @torch.no_grad()
    def evaluate(self, split: str) -> Optional[float]:
        t = self.cfg.train
        if t.eval_iters == 0 or self.datasets.get(split) is None:
            return None
        self.engine.eval()
        it = self._iterators(split, 0)
        total = torch.zeros(2, device=self.device)
        for _ in range(t.eval_iters * self.num_microbatches):
            loss_sum, n = self._micro_losses(next(it))
            total += torch.stack([loss_sum, n])
        self.engine.train()
        return self._reduce(total)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        root = self.cfg.checkpoint.dir
        tmp = ckpt.begin(root, self.iteration)
        # DeepSpeed writes <root>/<tag>/...: the tag is the .tmp directory's name, its own `latest` off.
        self.engine.save_checkpoint(root, tag=os.path.basename(tmp), save_latest=False,
                                    client_state={"scheduler": self.scheduler.state_dict()})
        dist.barrier()
        meta = dict(self.meta, config=self.cfg.to_dict(), consumed_samples=self.consumed_samples, engine="deepspeed",
                    layout={"tp": self.layout.tp, "pp": 1, "dp": self.layout.dp, "vpp": None},
                    zero_stage=self.cfg.train.zero_stage)
        return ckpt.publish(root, self.iteration, tmp, meta, keep_last=self.cfg.checkpoint.keep_last)

    def _load(self, path: str, saved: dict) -> dict:
        root, tag = os.path.split(path)
        _, client = self.engine.load_checkpoint(root, tag=tag, load_lr_scheduler_states=False)
        self.scheduler.load_state_dict(client["scheduler"])
        return saved
