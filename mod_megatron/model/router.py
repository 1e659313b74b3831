"""The MoD router: one linear score per token, expert-choice top-k per sequence.

Given hidden states [S, B, H], the router scores every token, keeps the k = ceil(capacity * S)
highest-scoring tokens of each sequence (sorted back into their original order, so causal attention
among the kept tokens is causal in the original sequence) and returns the router weight r of each
kept token. r multiplies the block's residual branch, which is what trains the router.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


def capacity_tokens(seq_len: int, capacity: float) -> int:
    """k = ceil(capacity * S), at least 1 and at most S."""
    return max(1, min(seq_len, math.ceil(capacity * seq_len - 1e-9)))


def router_weight(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Map raw router logits to the weight r that scales the residual branch.

    `linear` is the paper's raw score (unbounded; large scores can blow up the residual stream);
    `sigmoid` bounds r to (0, 1) and is the default that trained stably here; `2sigmoid` is
    2 * sigmoid, in (0, 2) with r = 1 at logit 0, so a zero router leaves routed tokens exactly as
    in a dense layer (what `mod-convert dense-to-mod` starts from).
    """
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "2sigmoid":
        return 2.0 * torch.sigmoid(logits)
    if kind == "linear":
        return logits
    raise ValueError(f"unknown router weight {kind!r}")


@dataclass
class Routing:
    """Which tokens a routed layer processes: `index` [k, B] sorted positions, `weight` [k, B]."""

    index: torch.Tensor
    weight: torch.Tensor
    logits: torch.Tensor  # [S, B], raw router scores of every token (for aux losses and stats)
    # Causal routing only: [k, B] True for real rows; padded rows (at the end of each column) are False
    # and their `index` is S, a dummy row past the sequence. None for top-k (every row is real).
    valid: Optional[torch.Tensor] = None
    # Sequence parallelism only: this rank's scores [S/tp, B] with the router's gradient (for the aux loss).
    local_logits: Optional[torch.Tensor] = None


def capacity_at(step: int, capacity: float, warmup_iters: int) -> float:
    """Capacity warm-up: 1.0 at step 0, linearly down to `capacity` at step `warmup_iters`, then flat."""
    if warmup_iters <= 0 or step >= warmup_iters:
        return capacity
    return 1.0 - (1.0 - capacity) * step / warmup_iters


def topk_membership(index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[k, B] routed positions -> [S, B] float targets: 1.0 where the token is in the top k."""
    target = torch.zeros(seq_len, index.shape[1], device=index.device)
    return target.scatter(0, index, 1.0)


def gather_positions(table, index: torch.Tensor):
    """Each routed token's row of a per-position table (rotary frequencies, or their cos/sin) at its
    original position: [S,1,1,d] -> [k,B,1,d] for index [k,B]; a tuple of tables gives a tuple."""
    if isinstance(table, tuple):
        return tuple(gather_positions(t, index) for t in table)
    rows = table[:, 0, 0, :]  # [S, d]
    k, b = index.shape
    return rows.index_select(0, index.reshape(-1)).view(k, b, 1, rows.shape[-1])


def causal_route(logits: torch.Tensor, decide: torch.Tensor, weight_kind: str) -> Routing:
    """Per-token routing for sampling: a token is routed iff `decide` [S, B] is True.

    Each sequence keeps a different number of tokens; the routed positions of each column are listed
    in original order and the column is padded to the largest count with index S (a dummy row) at the
    END, so causal attention among the rows never lets a real token see a padded one.
    """
    seq_len, batch = decide.shape
    counts = decide.sum(0)  # [B]
    k = max(int(counts.max()), 1)
    positions = torch.arange(seq_len, device=decide.device).unsqueeze(1).expand(seq_len, batch)
    order = torch.argsort(torch.where(decide, positions, positions + seq_len), dim=0)[:k]  # routed first
    valid = torch.arange(k, device=decide.device).unsqueeze(1) < counts.unsqueeze(0)
    index = torch.where(valid, order, seq_len)
    weight = router_weight(torch.gather(logits, 0, order), weight_kind)
    return Routing(index=index, weight=weight, logits=logits, valid=valid)


def topk_route(logits: torch.Tensor, capacity: float, weight_kind: str, fused: bool = False) -> Routing:
    """Expert-choice routing over the sequence dimension of `logits` [S, B] (fused: the Triton top-k)."""
    from mod_megatron.kernels.routing import topk_positions

    seq_len = logits.shape[0]
    k = capacity_tokens(seq_len, capacity)
    if k == seq_len:
        index = torch.arange(seq_len, device=logits.device).unsqueeze(1).expand(seq_len, logits.shape[1])
    else:
        index = topk_positions(logits, k, fused)
    weight = router_weight(torch.gather(logits, 0, index), weight_kind)
    return Routing(index=index, weight=weight, logits=logits)


class Router(torch.nn.Module):
    """A bias-free linear score per token, replicated on every tensor-parallel rank."""

    def __init__(self, hidden_size: int, init_std: float, device=None, dtype=None, sequence_parallel=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        torch.nn.init.normal_(self.weight, mean=0.0, std=init_std)
        # With sequence parallelism each TP rank sees a slice of the tokens, so the router's
        # gradient is partial; megatron-core all-reduces grads of params marked like this over TP.
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[S, B, H] -> logits [S, B], computed in fp32."""
        return torch.matmul(hidden_states.float(), self.weight.float())
