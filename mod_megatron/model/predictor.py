"""Causal routing decisions for sampling: the auxiliary predictor and the aux losses that train them.

Top-k over a sequence looks at future tokens, so sampling needs a per-token decision. Two are trained
here, both on the target "was this token in the top k" (docs/inference.md):

- the router's own logit, via a BCE auxiliary loss (`mod.aux_loss_weight`): route iff sigmoid > 0.5;
- a small MLP `Predictor` (H -> H/8 -> 1) on the router's input with stop-gradient, trained by its
  own BCE loss (`mod.predictor_loss_weight`); its inputs are detached, so it never changes the LM.

The aux losses reach backward through megatron-core's `MoEAuxLossAutoScaler`, which attaches a loss
to an activation (so it also works across pipeline stages). Its backward multiplies the aux gradient
by a global scale that megatron's schedule sets only for MoE models; `install_aux_loss_scale` makes
the schedule set it for MoD aux losses too (1/num_microbatches, like the LM loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


class Predictor(torch.nn.Module):
    """Two-layer MLP scoring each token: logit > 0 means "route this token". Inputs are detached."""

    def __init__(self, hidden_size: int, device=None, dtype=None):
        super().__init__()
        inner = max(1, hidden_size // 8)
        # Replicated on every TP rank and always fed the whole sequence (under sequence parallelism the
        # MoD layer all-gathers its detached input), so every rank computes the same full gradient.
        self.fc1 = torch.nn.Linear(hidden_size, inner, device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(inner, 1, device=device, dtype=dtype)

    def weights(self) -> tuple:
        """(fc1 weight, fc1 bias, fc2 weight, fc2 bias), as `predictor_logits` takes them."""
        return self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return predictor_logits(hidden_states, *self.weights())


def predictor_logits(hidden_states: torch.Tensor, w1, b1, w2, b2, fused: bool = False) -> torch.Tensor:
    """The predictor MLP: [S, B, H] -> logits [S, B] in fp32; no gradient flows back into `hidden_states`.

    fused: its forward as kernels/predictor_triton.py's Triton kernel, where the input is a bf16/fp16 CUDA
    tensor and the hidden layer is at most MAX_UNITS wide (H <= 2048); the F.linear form below is the
    reference and the CPU path."""
    x = hidden_states.detach().to(w1.dtype)
    if fused and kernel_applies(x, w1, b1):
        from mod_megatron.kernels.predictor_triton import RouterAndPredictor

        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return RouterAndPredictor.apply(flat, None, w1, b1, w2, b2)[1].view(x.shape[:-1])
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).squeeze(-1).float()


def kernel_applies(x: torch.Tensor, w1, b1) -> bool:
    """Can kernels/predictor_triton.py run this predictor on x? (a bf16/fp16 CUDA tensor of w1's dtype,
    biases, at most MAX_UNITS hidden units); the caller has chosen the Triton kernels (mod.fused_routing)."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w1.dtype and b1 is not None):
        return False
    from mod_megatron.kernels.predictor_triton import MAX_UNITS

    return w1.shape[0] <= MAX_UNITS


def bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")


def confusion(decide: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[tp, fp, fn, tn] counts (float) of boolean decisions against 0/1 targets."""
    t = target > 0.5
    return torch.stack([(decide & t).sum(), (decide & ~t).sum(), (~decide & t).sum(),
                        (~decide & ~t).sum()]).float()


@torch.no_grad()
def aux_stats(logits, index, seq_len: int, first: int = 0, pred=None) -> dict:
    """A MoD layer's diagnostics from the detached tensors its forward kept (MoDTransformerLayer.last_aux):
    the aux BCE values (means over the micro-batch's S*B tokens, as in the losses) and the confusion
    counts of the causal decisions (logit > 0) against top-k membership.

    logits: router scores of this rank's tokens [S_local, B], starting at sequence position `first`
    (sequence parallelism; else 0 and the whole sequence); index: the top-k positions [k, B] of the whole
    sequence; pred: predictor logits [S, B] or None.
    """
    from mod_megatron.model.router import topk_membership

    norm = seq_len * index.shape[1]
    target = topk_membership(index, seq_len)
    local = target[first:first + logits.shape[0]]
    out = {"router_bce": bce_sum(logits, local) / norm, "router_confusion": confusion(logits > 0, local)}
    if pred is not None:
        out["predictor_bce"] = bce_sum(pred, target) / norm
        out["predictor_confusion"] = confusion(pred > 0, target)
    return out


def rates(counts) -> dict:
    """accuracy / precision / recall from [tp, fp, fn, tn] counts (precision/recall None if undefined)."""
    tp, fp, fn, tn = (float(c) for c in counts)
    total = tp + fp + fn + tn
    return {"accuracy": (tp + tn) / total if total else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def attach_aux_loss(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`output` unchanged; backward adds d(loss)/d(params) times the schedule's loss scale."""
    return MoEAuxLossAutoScaler.apply(output, loss)


def set_aux_loss_scale(scale) -> None:
    """Set MoEAuxLossAutoScaler's scale. Replaces (rather than copies into) a tensor of another shape
    or device: a backward before any schedule ran leaves megatron's 0-d default behind."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(1)
    current = MoEAuxLossAutoScaler.main_loss_backward_scale
    if current is not None and current.shape == scale.shape and current.device == scale.device:
        current.copy_(scale)
    else:
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale


def install_aux_loss_scale() -> None:
    """Make megatron's schedules set the aux-loss scale on every forward step, also without MoE.

    megatron-core divides the LM loss by num_microbatches (and multiplies by the grad scaler's scale);
    for MoE models it sets MoEAuxLossAutoScaler's scale to match. This wrapper does the same when the
    model has no MoE layers, so MoD aux losses get the LM loss's weighting in any layout.
    """
    from megatron.core.pipeline_parallel import schedules

    original = schedules.forward_step_calc_loss
    if getattr(original, "mod_aux_loss_scale", False):
        return

    def forward_step_calc_loss(model, output_tensor, loss_func, config, vp_stage, collect_non_loss_data,
                               num_microbatches, *args, **kwargs):
        result = original(model, output_tensor, loss_func, config, vp_stage, collect_non_loss_data,
                          num_microbatches, *args, **kwargs)
        if getattr(config, "num_moe_experts", None) is None:  # with MoE, megatron sets the same scale
            device = result[0].device if isinstance(result[0], torch.Tensor) else None
            scale = torch.ones(1, device=device)
            if config.grad_scale_func is not None:
                scale = config.grad_scale_func(scale)
            if not config.calculate_per_token_loss:
                scale = scale / num_microbatches
            set_aux_loss_scale(scale)
        return result

    forward_step_calc_loss.mod_aux_loss_scale = True
    schedules.forward_step_calc_loss = forward_step_calc_loss


def aux_scalars(layer_number: int, last_aux: dict) -> dict:
    """TensorBoard scalars of one MoD layer's last forward: aux losses and predictor quality vs top-k."""
    if not last_aux:
        return {}
    tag = f"routing/layer{layer_number:02d}"
    out = {f"{tag}/aux_bce": float(last_aux["router_bce"])}
    out.update({f"{tag}/router_causal_{k}": v for k, v in rates(last_aux["router_confusion"]).items()})
    if "predictor_bce" in last_aux:
        out[f"{tag}/predictor_loss"] = float(last_aux["predictor_bce"])
        out.update({f"{tag}/predictor_{k}": v for k, v in rates(last_aux["predictor_confusion"]).items()})
    return out
