"""The training loop: megatron-core schedules, optimizer and checkpoints around a dense or MoD GPT.

One `Trainer` per process. Every rank iterates the same global batches; each data-parallel rank
takes its slice, split into micro-batches, and megatron-core's forward/backward schedule (no
pipelining, 1F1B or interleaved) runs them. Evaluation uses fixed batches of the valid and
held-out sets so curves are comparable across runs.
"""
from __future__ import annotations

import collections
import json
import math
import os
import signal
import threading
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from mod_megatron.config import Config
from mod_megatron.model.mod_layer import MoDTransformerLayer, set_capacity
from mod_megatron.model.predictor import aux_scalars
from mod_megatron.model.router import capacity_at
from mod_megatron.training import checkpoint as ckpt
from mod_megatron.training import fused_adam
from mod_megatron.training import numerics
from mod_megatron.training import optimizer_step
from mod_megatron.training.builder import build_model_chunks, build_optimizer, gather_params, param_dtype
from mod_megatron.training.distributed import Layout
from mod_megatron.training.flops import peak_flops, train_flops_per_token
from mod_megatron.training.logger import RunLogger
from mod_megatron.training.profiling import StepProfiler
from mod_megatron.moe.stats import moe_stats


class MicroBatches:
    """Micro-batches of this DP rank, starting at global sample `start`: an endless iterator."""

    def __init__(self, dataset, start: int, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp: int,
                 pin: bool = False):
        self.dataset, self.mbs, self.gbs = dataset, micro_batch_size, global_batch_size
        self.per_rank = global_batch_size // dp
        self.dp_rank = dp_rank
        self.next_sample = start  # global sample index of the next global batch
        self.pin = pin  # page-locked host memory: the copy to the GPU is asynchronous (no stream wait)
        self._pending: list[int] = []
        self._ready: collections.deque = collections.deque()

    def __iter__(self):
        return self

    def prefetch(self, n: int) -> None:
        """Build the next n micro-batches now (the trainer calls this while the GPU runs the backward)."""
        while len(self._ready) < n:
            self._ready.append(self._build())

    def __next__(self) -> dict:
        return self._ready.popleft() if self._ready else self._build()

    def _build(self) -> dict:
        if not self._pending:
            first = self.next_sample + self.dp_rank * self.per_rank
            self._pending = list(range(first, first + self.per_rank))
            self.next_sample += self.gbs
        idx, self._pending = self._pending[:self.mbs], self._pending[self.mbs:]
        samples = [self.dataset[i % len(self.dataset)] for i in idx]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in
                 ("tokens", "labels", "loss_mask", "position_ids")}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch


def mean_loss(total: torch.Tensor) -> torch.Tensor:
    """[loss sum, tokens] -> the mean token loss, a 1-element tensor on total's device."""
    return (total[0] / total[1].clamp(min=1)).reshape(1)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


class Trainer:
    def __init__(self, cfg: Config, layout: Layout, train_ds, valid_ds, heldout_ds, meta: Optional[dict] = None):
        self.cfg, self.layout = cfg, layout
        self.device = layout.device
        self.dtype = param_dtype(cfg, self.device)
        layout_str = None
        if cfg.parallel.pp > 1:
            from mod_megatron.parallel.stages import cost_aware_layout, stage_table

            if layout.is_logger:
                print(stage_table(cfg, cfg.parallel.pp), flush=True)
            if cfg.parallel.pipeline_split == "cost":
                layout_str = cost_aware_layout(cfg, cfg.parallel.pp)
        self._build(layout_str)
        t = cfg.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * layout.dp)
        self.graphs = []  # train.cuda_graphs: per-chunk ChunkGraphs, captured on the first training forward
        self._graphs_reported = False  # the "cuda graphs: N layers captured" line, once per run
        if cfg.train.cuda_graphs:
            from mod_megatron.training import cuda_graphs

            cuda_graphs.check_supported(cfg, self.device, self.layout.dp)
            # weight gradients written (not added) into main_grad by graphs only at one micro-batch per step
            self.graphs = cuda_graphs.enable(self.chunks, write_first=self.num_microbatches == 1)
        self.datasets = {"train": train_ds, "valid": valid_ds, "heldout": heldout_ds}
        self.meta = dict(meta or {})
        self.forward_backward = get_forward_backward_func()
        self.iteration = 0
        self.consumed_samples = 0
        self.history: list[dict] = []
        # Deferred steps on a GPU: read loss, flag and norm before the queued update, not after it (the same
        # values; the host then overlaps the next step's start with the update). False: read after it.
        self.read_before_update = True
        self.window_tokens_per_s: list[float] = []
        self.resumed_from: Optional[str] = None
        self.resume_notes: list[str] = []
        self.initialised_from: Optional[str] = None
        self.nan_policy = numerics.NanPolicy(t.nan_policy, t.max_skipped_steps)
        if cfg.checkpoint.load:
            self._maybe_resume()
        if self.resumed_from is None and cfg.checkpoint.init_from:
            self._init_from(cfg.checkpoint.init_from)
        self.log = RunLogger(cfg.logging.dir, layout.is_logger, cfg.logging.tensorboard,
                             cfg.logging.progress_bar, total=t.iters, initial=self.iteration)
        self._signal_received = None
        if threading.current_thread() is threading.main_thread():
            _start_checkpoint_writer_ignoring_signals()
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._on_signal)
        self.flops_per_token = train_flops_per_token(cfg)
        self.peak = peak_flops(torch.cuda.get_device_name()) if self.device.type == "cuda" else None

    def _build(self, pipeline_layout: Optional[str]) -> None:
        """Model chunks (megatron DDP), optimizer and LR schedule; other engines override this."""
        self.chunks, self.tcfg = build_model_chunks(self.cfg, self.device, pipeline_layout=pipeline_layout)
        self.optimizer, self.scheduler = build_optimizer(self.cfg, self.chunks, self.dtype)

    # ------------------------------------------------------------------ preemption
    def _on_signal(self, signum, frame) -> None:
        self._signal_received = signum

    def _any_rank_signalled(self) -> bool:
        """All ranks agree: one rank's SIGTERM/SIGUSR1 stops every rank after the same step."""
        flag = torch.tensor([1.0 if self._signal_received else 0.0], device=self.device)
        if dist.is_initialized() and self.layout.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ checkpoints
    ENGINE = "megatron"  # the train.engine whose checkpoints this trainer writes and reads

    def _maybe_resume(self) -> None:
        root = self.cfg.checkpoint.dir
        path, self.resume_notes = ckpt.select(root, hashes=self.cfg.checkpoint.verify)
        if path is None:
            return
        saved = ckpt.read_meta(path)
        ckpt.check_compatible(saved, self.cfg.to_dict()["model"], path, self.cfg.to_dict()["mod"])
        engine = saved.get("engine", "megatron")
        if engine != self.ENGINE:
            convert = " or convert it with mod-convert from-deepspeed" if engine == "deepspeed" else ""
            raise ckpt.CheckpointError(f"{path} was written by the {engine} engine; resume it with "
                                       f"--train.engine={engine}{convert}")
        meta = self._load(path, saved)
        self.iteration = meta["iteration"]
        self.consumed_samples = meta["consumed_samples"]
        self.resumed_from = path

    def _init_from(self, source: str) -> None:
        """A new run from another run's weights (any layout): model only, fresh optimizer, iteration 0."""
        path = source
        if not os.path.isfile(os.path.join(source, ckpt.META)):  # a checkpoint root: its `latest`
            path, _ = ckpt.select(source, hashes=self.cfg.checkpoint.verify)
            if path is None:
                raise ckpt.CheckpointError(f"checkpoint.init_from={source}: no checkpoint there")
        else:
            problem = ckpt.verify(path, self.cfg.checkpoint.verify)
            if problem:
                raise ckpt.CheckpointError(f"checkpoint.init_from={source} is unusable: {problem}")
        saved = ckpt.read_meta(path)
        ckpt.check_compatible(saved, self.cfg.to_dict()["model"], path, self.cfg.to_dict()["mod"])
        ckpt.load(path, self.chunks, load_rng=False)
        self.optimizer.reload_model_params()  # the fp32 main copy of bf16 params follows the new weights
        self.initialised_from = path

    def _load(self, path: str, saved: dict) -> dict:
        """Load a checkpoint of this engine into model, optimizer and schedule; return its meta."""
        if saved.get("model_only"):  # e.g. converted: weights only, a fresh optimizer, the LR schedule goes on
            meta = ckpt.load(path, self.chunks)
            self.optimizer.reload_model_params()
            self.scheduler.step(increment=meta["iteration"])
            return meta
        dist_opt = saved.get("config", {}).get("train", {}).get("distributed_optimizer")
        if dist_opt is not None and bool(dist_opt) != self.cfg.train.distributed_optimizer:
            # the two optimizers' states have different forms; megatron-core fails deep in its loader
            raise ckpt.CheckpointError(
                f"{path} holds {'distributed' if dist_opt else 'non-distributed'} optimizer state; resume with "
                f"--train.distributed_optimizer={str(bool(dist_opt)).lower()}, or start a new run from its weights "
                f"(fresh optimizer) with --checkpoint.init_from={path} and another checkpoint.dir")
        meta = ckpt.load(path, self.chunks, self.optimizer, self.scheduler)
        fused_adam.apply(self.optimizer, self.cfg.train.fused_optimizer)  # `step` where the kernel needs it
        return meta

    def save(self) -> str:
        gather_params(self.chunks)  # parallel.overlap_param_gather: the model params of the last step
        meta = dict(self.meta, config=self.cfg.to_dict(), consumed_samples=self.consumed_samples,
                    layout={"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                            "ep": self.cfg.moe.ep, "vpp": self.cfg.parallel.vpp})
        return ckpt.save(self.cfg.checkpoint.dir, self.iteration, self.chunks, self.optimizer, self.scheduler,
                         meta, keep_last=self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ steps
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    def _iterators(self, split: str, start: int):
        t = self.cfg.train
        n = len(self.chunks)
        its = [MicroBatches(self.datasets[split], start, t.micro_batch_size, t.global_batch_size,
                            self.layout.dp_rank, self.layout.dp, pin=self.device.type == "cuda") for _ in range(n)]
        return its if n > 1 else its[0]

    def _loss_total(self, reduced: list) -> Optional[torch.Tensor]:
        """[loss sum, tokens] over the global batch, all-reduced over DP, on the device; None off the last stage."""
        if not self.layout.is_last_stage:
            return None
        total = torch.stack([r["lm loss"] for r in reduced]).sum(0).float()
        if self.layout.dp > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total

    def _reduce_loss(self, reduced: list) -> Optional[float]:
        """Mean token loss over the global batch, all-reduced over DP; None off the last stage."""
        total = self._loss_total(reduced)
        return None if total is None else mean_loss(total).item()

    def train_step(self, it) -> dict:
        """One optimizer step. The host waits for the GPU once (optimizer_step.py): the loss, the
        finiteness flags and the next step's batches are prepared before that, and read after it.
        Where the optimizer is torch's fused AdamW (`optimizer_step.deferrable`), that one wait comes
        after the update is queued: the kernels clip by the norm on the device and skip the update
        themselves if the step is not finite, so the GPU never waits for the host in between; and on a GPU
        the values the host reads are copied out before the update, so the host waits for the backward
        only and starts the next step while the GPU runs the update (`read_before_update`)."""
        for chunk in self.chunks:
            if not chunk.training:
                chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        t = self.cfg.train
        mod = self.cfg.mod
        if mod.capacity_warmup_iters:  # k is static within a step; it shrinks between steps
            set_capacity(self.chunks, capacity_at(self.iteration, mod.capacity, mod.capacity_warmup_iters))
        rec = it if isinstance(it, list) else numerics.Recorder(it)
        with numerics.test_nan_injection(self.chunks, self.iteration + 1):
            reduced = self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=rec, model=self.chunks,
                num_microbatches=self.num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=False)
            # Checked before any update: a NaN/Inf update could not be undone (numerics.py).
            total = self._loss_total(reduced)
            finite = numerics.local_grads_finite(self.chunks)
            if total is not None:
                finite = finite & torch.isfinite(total[0]).to(finite.device)
            bad = numerics.any_rank_flag(finite, self.device)
            for batches in (it if isinstance(it, list) else [it]):
                if hasattr(batches, "prefetch"):
                    batches.prefetch(self.num_microbatches)
            prepared = optimizer_step.prepare(self.optimizer, wait=None)  # waits unless `deferrable`
            deferred = prepared.deferred
            mean = [mean_loss(total)] if total is not None else []
            norm_sq = [prepared.norm_sq.reshape(1).to(bad)] if prepared.norm_sq is not None else []
            values = torch.cat([bad, *mean, *norm_sq])
            early = deferred and values.is_cuda and self.read_before_update
            if early:  # what the host reads is copied out before the update is queued behind it
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host.copy_(values, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            if deferred and not prepared.found_inf:  # queue the update; its kernels skip it if `bad`
                optimizer_step.finish(self.optimizer, prepared, skip=bad)
            if early:  # wait for the copy only: the GPU runs the update while the host starts the next step
                copied.synchronize()
                read = host.tolist()
            else:
                read = values.tolist()  # one read; no wait unless deferred
            loss = read[1] if total is not None else None
            if read[0] != 0.0:  # nothing was updated (deferred: the AdamW kernels saw the flag)
                where = numerics.locate(self.chunks, getattr(rec, "batches", None), self.device, self.layout.pp)
                return {"loss": loss, "grad_norm": None, "skipped": True, "nonfinite": where}
        if deferred:
            ok = not prepared.found_inf
            grad_norm = read[-1] ** 0.5 if norm_sq else None  # as megatron's get_grad_norm computes it
        else:
            ok = optimizer_step.finish(self.optimizer, prepared)
            grad_norm = prepared.grad_norm
        if ok:
            self.scheduler.step(increment=1)
        return {"loss": loss, "grad_norm": grad_norm if ok else None, "skipped": not ok}

    @torch.no_grad()
    def evaluate(self, split: str) -> Optional[float]:
        t = self.cfg.train
        if t.eval_iters == 0 or self.datasets.get(split) is None:
            return None
        for chunk in self.chunks:
            chunk.eval()
        it = self._iterators(split, 0)
        reduced = []
        for _ in range(t.eval_iters):
            reduced += self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=it, model=self.chunks,
                num_microbatches=self.num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        return self._reduce_loss(reduced)

    # ------------------------------------------------------------------ metrics
    def routing_stats(self) -> dict:
        """Per-layer fraction routed and router-weight mean/std of the last micro-batch, all stages."""
        local = {}
        for chunk in self.chunks:
            for layer in ckpt._unwrap(chunk).decoder.layers:
                if isinstance(layer, MoDTransformerLayer) and layer.last_routing is not None:
                    r = layer.last_routing
                    w = r.weight.detach().float()
                    n = layer.layer_number
                    local[f"routing/layer{n:02d}/fraction_routed"] = r.index.shape[0] / r.logits.shape[0]
                    local[f"routing/layer{n:02d}/router_weight_mean"] = w.mean().item()
                    local[f"routing/layer{n:02d}/router_weight_std"] = w.std().item() if w.numel() > 1 else 0.0
                    local[f"routing/layer{n:02d}/capacity"] = layer.capacity
                    local.update(aux_scalars(n, layer.last_aux))
        local.update(moe_stats(self.chunks))  # MoE/MoDE imbalance and no-op share (collective over tp x dp)
        if self.layout.pp > 1:
            gathered = [None] * self.layout.pp
            dist.all_gather_object(gathered, local, group=ps.get_pipeline_model_parallel_group())
            for part in gathered:
                local.update(part)
        return local

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        for note in self.resume_notes:
            self.log.info(f"checkpoint fallback: {note}")
        if self.resumed_from:
            self.log.info(f"resumed from {self.resumed_from} at iteration {self.iteration}")
        elif self.initialised_from:
            self.log.info(f"initialised weights from {self.initialised_from}")
        kernel = fused_adam.kernel(self.optimizer) if self.ENGINE == "megatron" else None  # DeepSpeed: its own
        if kernel:
            self.log.info(f"optimizer: AdamW, torch's {kernel} kernel")
        it = self._iterators("train", self.consumed_samples)
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        window_t0, window_steps = time.time(), 0
        stop_at = min(t.iters, self.iteration + t.exit_interval) if t.exit_interval else t.iters
        lg = cfg.logging
        profiler = StepProfiler(lg.profile_steps, lg.profile_ranks, self.layout.rank, lg.dir, self.device)
        while self.iteration < stop_at:
            profiler.before(self.iteration + 1)
            out = self.train_step(it)
            self.iteration += 1
            written = profiler.after(self.iteration, stop_at)
            if written:
                self.log.info(f"profile: iterations {profiler.first}-{profiler.traced_last} traced -> {written[0]} "
                              "(+ .txt table)")
            if self.graphs and not self._graphs_reported:
                self._graphs_reported = True
                layers = sum(len(g.layers) for g in self.graphs if g.graphed)
                secs = sum(g.capture_s or 0.0 for g in self.graphs)
                self.log.info(f"cuda graphs: {layers} layers captured in {secs:.1f} s" if layers else
                              "cuda graphs: nothing captured (the layers ran eagerly)")
            self.consumed_samples += t.global_batch_size
            try:
                note = self.nan_policy.update(self.iteration, out)
            except numerics.NumericalError:
                self.log.close()
                raise
            if note:
                self.log.info(note)
            window_steps += 1
            record = {"iteration": self.iteration, "loss": out["loss"], "lr": self.scheduler.get_lr(
                self.optimizer.param_groups[0]) if hasattr(self.scheduler, "get_lr") else None}
            self.history.append(record)
            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.iters:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.time() - window_t0
                tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                tflops = tok_s * self.flops_per_token / self.layout.world_size / 1e12
                stats = self.routing_stats()
                metrics = {"train/loss": out["loss"], "train/lr": record["lr"], "train/grad_norm": out["grad_norm"],
                           "train/skipped_steps": self.nan_policy.total,
                           "perf/tokens_per_s": tok_s, "perf/tflops_per_gpu": tflops,
                           "perf/mfu": tflops * 1e12 / self.peak if self.peak else None, **stats}
                self.log.scalars(self.iteration, metrics)
                if self.layout.is_logger:
                    mfu = f" | mfu {metrics['perf/mfu']:.1%}" if metrics["perf/mfu"] else ""
                    gn = f"{out['grad_norm']:.3f}" if out["grad_norm"] is not None else "n/a"
                    self.log.info(f"iter {self.iteration:6d}/{t.iters} | loss {out['loss']:.4f} | "
                                  f"lr {record['lr']:.3e} | grad-norm {gn} | {tok_s:,.0f} tok/s{mfu}")
                self.window_tokens_per_s.append(tok_s)
                window_t0, window_steps = time.time(), 0
            self.log.advance(1, {"loss": out["loss"]} if out["loss"] is not None else None)
            if self._any_rank_signalled():
                self.log.info(f"signal received: saving checkpoint and exiting at iteration {self.iteration}")
                profiler.close()  # what was traced so far
                path = self.save()
                self.log.close()
                return {"iteration": self.iteration, "interrupted": True, "checkpoint": path,
                        "train_loss": out["loss"], "valid_loss": None, "heldout_loss": None}
            if self.iteration == stop_at:
                break
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                self._eval_and_log()
                window_t0, window_steps = time.time(), 0  # throughput excludes evaluation
            if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0:
                self.save()
                window_t0, window_steps = time.time(), 0
        summary = self._eval_and_log()
        summary["train_loss"] = self.history[-1]["loss"] if self.history else None
        summary["skipped_steps"] = self.nan_policy.total
        # Steady-state throughput: the mean over log windows, the first (warm-up) window left out.
        windows = self.window_tokens_per_s[1:] or self.window_tokens_per_s
        tok_s = sum(windows) / len(windows) if windows else None
        summary["tokens_per_s"] = tok_s
        summary["mfu"] = (tok_s * self.flops_per_token / self.layout.world_size / self.peak
                          if tok_s and self.peak else None)
        path = self.save() if cfg.checkpoint.save_final else None
        summary["checkpoint"] = path
        if self.layout.is_logger:
            with open(os.path.join(cfg.logging.dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self.log.close()
        return summary

    def _eval_and_log(self) -> dict:
        valid, heldout = self.evaluate("valid"), self.evaluate("heldout")
        res = {"iteration": self.iteration, "valid_loss": valid, "heldout_loss": heldout}
        if self.layout.is_logger and valid is not None and heldout is not None:  # eval_iters=0: nothing to show
            self.log.scalars(self.iteration, {"eval/valid_loss": valid, "eval/heldout_loss": heldout,
                                              "eval/valid_ppl": _ppl(valid), "eval/heldout_ppl": _ppl(heldout)})
            self.log.info(f"eval  {self.iteration:6d} | valid {valid:.4f} (ppl {_ppl(valid):.1f}) | "
                          f"held-out {heldout:.4f} (ppl {_ppl(heldout):.1f})")
        return res


def _start_checkpoint_writer_ignoring_signals() -> None:
    """Start megatron's checkpoint-writer helper process now, with SIGTERM/SIGUSR1 ignored.

    dist_checkpointing's filesystem writer keeps a spawn-context Manager process alive after the
    first save. Slurm signals every process of a job step; with the default action that helper
    dies and the save on preemption fails (BrokenPipeError). Started while the signals are
    ignored, it inherits "ignore" and outlives the signal, so the checkpoint-on-signal completes.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        filesystem_async._get_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ppl(loss: Optional[float]) -> Optional[float]:
    return math.exp(min(loss, 50.0)) if loss is not None else None
