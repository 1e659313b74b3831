"""Make megatron-core 0.16.1 run on CPU with gloo: every shim lives here, and only here.

megatron-core assumes CUDA in a handful of places (device helpers, the RNG tracker, a few tensor
factories and synchronisations). `apply()` patches exactly those calls and does nothing when CUDA is
available, so GPU runs use megatron-core untouched. Each patch names the megatron-core call that
needs it. Nothing in site-packages is edited: the patches are attribute assignments at import time.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device a rank computes on: its CUDA device when there is one, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's CudaRNGStatesTracker, with the named states held as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def apply() -> None:
    """Install the CPU shims once per process; a no-op when CUDA is available."""
    global _APPLIED
    if _APPLIED or cuda_available():
        return
    _APPLIED = True

    # rotary_pos_embedding.RotaryEmbedding.__init__/forward, tensor_parallel.mappings
    # (_gather/_reduce_scatter_along_first_dim buffers), utils.GlobalMemoryBuffer.get_tensor and
    # the pipeline schedules all place tensors on `torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # dist_checkpointing.strategies.filesystem_async (writer) and
    # pipeline_parallel.p2p_communication call `torch.cuda.synchronize()`; CPU ops are synchronous.
    torch.cuda.synchronize = lambda *a, **k: None

    # tensor_parallel.random.initialize_rng_tracker instantiates CudaRNGStatesTracker, whose
    # add()/fork() read and write CUDA generator states; keep the same API on the CPU generator.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed (queued lazily, harmless) and
    # then _CUDA_RNG_STATE_TRACKER.add, served by the CPU tracker above.

    # optimizer.clip_grads.clip_grad_by_total_norm_fp32 (called by MegatronOptimizer.step through
    # the name imported into optimizer.optimizer) asserts `param.grad.type() == 'torch.cuda.FloatTensor'`;
    # on the CPU the same in-place scaling runs without that assertion.
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    _patch_factories_with_cuda_device()
    _patch_moe_alltoall_for_cpu()

    # models.common.language_module.LanguageModule.setup_embeddings_and_output_layer moves the last
    # pipeline stage's copy of the tied word embedding with `weight.data.cuda()` before all-reducing
    # it from the first stage (pp > 1 only).
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _run_as_if_on_cuda(LanguageModule, "setup_embeddings_and_output_layer")

    # optimizer.distrib_optimizer.DistributedOptimizer.__init__ (and its
    # _build_model_and_main_param_groups) sorts params by `param.type()` and accepts only the
    # 'torch.cuda.*Tensor' names, raising TypeError for CPU params (train.distributed_optimizer=true).
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _run_as_if_on_cuda(DistributedOptimizer, "__init__")
    # DistributedOptimizer.get_parameter_state_dp_zero (saving its state in the 'fully_reshardable' form,
    # training/checkpoint.py) moves each local shard with `send_tensor.cuda()` before gathering it.
    _run_as_if_on_cuda(DistributedOptimizer, "get_parameter_state_dp_zero")


def moe_without_te() -> None:
    """transformer.moe.moe_utils.RouterGatingLinearFunction tests `te_general_gemm is not None`, but the
    name is only bound when Transformer Engine imports: without TE (CPU or GPU) it is a NameError. Bind
    it to None there, which selects megatron's own torch.mm path. Needed on GPU too, so not in apply()."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def distributed_optimizer_with_torch_adam() -> None:
    """optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states (loading the
    'fully_reshardable' checkpoint form, training/checkpoint.py) copies the checkpoint's tensors onto
    `{"param", **optimizer.state[p]}`. torch's AdamW (megatron's optimizer without apex or TE) keeps a
    `step` in that state, which megatron restores separately from the param groups and leaves out of the
    tensors, so the copy fails with KeyError 'step'. Keep the restored `step` as it is. Needed on GPU too,
    so not in apply(); a no-op where apex or TE provide the optimizer (no `step` in their state)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_keeps_step", False):
        return

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = dict(tensors, step=step)  # copied onto itself: unchanged
        return original(self, model_param, tensors)

    set_states._keeps_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _patch_moe_alltoall_for_cpu() -> None:
    """MoE alltoall dispatcher (transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher) on CPU.

    - `__init__` creates `torch.cuda.Stream()` for its device-to-host copies once per process (class
      attribute `cuda_dtoh_stream`); a placeholder stops it, since nothing is copied on the CPU.
    - `_maybe_dtoh_and_synchronize` copies the split sizes on that stream and turns them into numpy
      arrays only for CUDA tensors; on the CPU they would stay tensors, which
      `torch.distributed.all_to_all_single` (tensor_parallel.mappings._AllToAll) does not take as
      split sizes. This version converts them the same way, with no stream or event.
    """
    from megatron.core.transformer.moe import token_dispatcher as td

    moe_without_te()
    td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "cpu: no device-to-host stream"

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda():
    """Inside: `t.type()` names a CPU tensor like its CUDA twin and `t.cuda()` returns `t` itself."""
    orig_type, orig_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = orig_type, orig_cuda


def _run_as_if_on_cuda(cls, name: str) -> None:
    """Run method `cls.name` inside `_cpu_tensors_named_as_cuda()`."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_named_as_cuda():
            return original(*args, **kwargs)

    setattr(cls, name, wrapper)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grad_by_total_norm_fp32 without the CUDA tensor-type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for p in parameters:
            g = getattr(p, attr, None)
            if g is not None:
                g.detach().mul_(clip_coeff)


def _patch_factories_with_cuda_device() -> None:
    """Map `device="cuda"` in a few megatron-core tensor factories to the CPU.

    pipeline_parallel.schedules.forward_backward_pipelining_* builds `torch.zeros(..., device="cuda")`
    (total loss / token counters), utils.local_multi_tensor_l2_norm (grad norm for clipping when apex
    and TE are absent) builds its result with `device="cuda"`, transformer.utils.get_default_causal_mask
    (used by fusions.fused_softmax in megatron's local DotProductAttention) builds its mask there,
    and optimizer.clip_grads likewise;
    these module-level `torch` references are swapped for a proxy whose factories move "cuda" to "cpu".
    """
    import importlib

    targets = [
        "megatron.core.utils",
        "megatron.core.transformer.utils",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.pipeline_parallel.p2p_communication",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.optimizer",
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.core.distributed.finalize_model_grads",
    ]
    proxy = _TorchCPUProxy()
    for name in targets:
        try:
            mod = importlib.import_module(name)
        except Exception:  # optional module in this megatron-core build
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy


def _cpu_device(dev):
    if dev is None:
        return dev
    if isinstance(dev, torch.device):
        return torch.device("cpu") if dev.type == "cuda" else dev
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, int):
        return "cpu"
    return dev


class _TorchCPUProxy:
    """`torch` as seen by a patched megatron module: factories called with a CUDA device get the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
                  "empty_like", "full_like", "randn", "rand", "as_tensor")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)
            return factory
        return attr
