"""Copy or accumulate many tensors of mixed precision in one Triton launch: `MultiTensor(dsts, srcs, accumulate)`.

Two per-parameter passes of every bf16 training step mix dtypes: the gradient accumulation
`main_grad (fp32) += grad (bf16)` (megatron-core DDP's hook; inside the backward graphs with
`train.cuda_graphs`), and the optimizer's copy of the fp32 main parameters into the bf16 model
parameters (megatron-core's `_copy_main_params_to_model_params`, which for bf16 loops over `copy_`).
PyTorch runs a mixed-dtype elementwise op on its non-vectorised path, one launch per parameter; on an
H200 the 368M model spent 1.65 ms per step on the adds (about 1.9 TB/s) and ~1 ms on the copies.

Here one program handles one BLOCK-sized tile of one tensor, found through tables of addresses and
tile starts made once for a fixed list of tensors (the parameters do not move), so the whole list is
one launch, and every tile is full and 16-byte aligned, so loads and stores are vector-wide. Tensors
that do not fit that (size not a multiple of BLOCK, unaligned, non-contiguous) are left to the caller
(`rest`). The result is exactly PyTorch's: the add is done in fp32 and the cast to bf16 rounds to
nearest even, as `Tensor.copy_` and `add_` do (both conversions are done here on the bits, so that
Triton's CPU interpreter, which the tests use, gives the GPU's answer). Import only on a CUDA path (or with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16, rounding to nearest even (NaN stays NaN), via the bits."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_f32(x):
    """bf16 or fp32 -> fp32, exactly (bf16 subnormals kept), via the bits for bf16."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _multi_tensor_kernel(dst_addrs, src_addrs, tile_tensor, tile_start, ACCUMULATE: tl.constexpr,
                         DST: tl.constexpr, SRC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = tl.load(tile_start + pid)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    dst = tl.load(dst_addrs + t).to(tl.pointer_type(DST)) + offs
    src = tl.load(src_addrs + t).to(tl.pointer_type(SRC)) + offs
    dst = tl.max_contiguous(tl.multiple_of(dst, [16]), [BLOCK])
    src = tl.max_contiguous(tl.multiple_of(src, [16]), [BLOCK])
    x = _to_f32(tl.load(src))
    if ACCUMULATE:
        x += _to_f32(tl.load(dst))
    if DST == tl.bfloat16:
        tl.store(dst, _to_bf16_rne(x))
    else:
        tl.store(dst, x.to(DST))


def fits(t: torch.Tensor) -> bool:
    """Whether a tensor can take the kernel: contiguous, 16-byte aligned, a whole number of tiles."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and t.numel() % BLOCK == 0 and t.numel() > 0


class MultiTensor:
    """dst = src (accumulate=False) or dst += src (True), elementwise, for fixed lists of tensors.

    dsts: fp32 or bf16 tensors of one dtype; srcs: of one dtype, same shapes. Pairs that do not fit the
    kernel (see `fits`) are listed in `rest` for the caller to do with torch. The address tables are made
    here, once: the tensors must stay where they are (the object keeps them alive).
    """

    def __init__(self, dsts: list, srcs: list, accumulate: bool):
        if len(dsts) != len(srcs):
            raise ValueError("dsts and srcs differ in length")
        self.accumulate = accumulate
        self.pairs, self.rest = [], []
        for d, s in zip(dsts, srcs):
            if d.shape != s.shape:
                raise ValueError(f"shapes differ: {tuple(d.shape)} vs {tuple(s.shape)}")
            ok = fits(d) and fits(s) and d.dtype in _TL and s.dtype in _TL and d.device == s.device
            (self.pairs if ok else self.rest).append((d, s))
        self.groups = []  # (dst dtype, src dtype, dst table, src table, tile tensor, tile start)
        for dd, sd in dict.fromkeys((d.dtype, s.dtype) for d, s in self.pairs):
            pairs = [(d, s) for d, s in self.pairs if (d.dtype, s.dtype) == (dd, sd)]
            device = pairs[0][0].device
            tiles = [(i, j * BLOCK) for i, (d, _) in enumerate(pairs) for j in range(d.numel() // BLOCK)]
            table = lambda xs, dt: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
            self.groups.append((_TL[dd], _TL[sd], table([d.data_ptr() for d, _ in pairs], torch.int64),
                                table([s.data_ptr() for _, s in pairs], torch.int64),
                                table([i for i, _ in tiles], torch.int32), table([o for _, o in tiles], torch.int64)))

    def __call__(self) -> None:
        """Launch the kernel for the pairs that fit (one launch per dtype pair); `rest` is the caller's."""
        for dst_t, src_t, dst_addrs, src_addrs, tile_tensor, tile_start in self.groups:
            _multi_tensor_kernel[(tile_tensor.numel(),)](dst_addrs, src_addrs, tile_tensor, tile_start,
                                                        ACCUMULATE=self.accumulate, DST=dst_t, SRC=src_t,
                                                        BLOCK=BLOCK, num_warps=4)

    def run_all(self) -> None:
        """The kernel for the pairs that fit, torch for the rest."""
        self()
        for d, s in self.rest:
            if self.accumulate:
                d.add_(s)
            else:
                d.copy_(s)
