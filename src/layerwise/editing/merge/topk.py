"""Exact k-th largest magnitude of each row of a stream of chunks, in two passes and bounded memory.

The bit pattern of a non-negative float32, read as an int32, is ordered like the float itself. Pass 1
counts the high 16 bits of ``|x|`` (32768 bins, the sign bit is 0) and finds the bin holding the k-th
largest value and its rank inside that bin; pass 2 counts the low 16 bits of the values in that bin
(65536 bins) and pins the exact value. Memory is two small count tables per row, whatever the number of
elements, so a global top-k over a whole model never needs a flattened copy of it. Magnitudes are
compared in float32 (float64 task vectors are ranked by their float32 rounding).

Example
-------
>>> x = torch.tensor([[3.0, -1.0, 2.0, -5.0]])
>>> kth_largest_abs(x, [2])
tensor([3.])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["TwoPassThreshold", "kth_largest_abs", "topk_count"]

_HI, _LO = 1 << 15, 1 << 16


def topk_count(density: float, numel: int) -> int:
    """Number of entries kept for a density: ``int(density * numel)`` (mergekit's convention)."""
    return int(density * numel)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """int64 view of the float32 bit patterns of ``|x|`` (same shape)."""
    return x.abs().to(torch.float32).view(torch.int32).to(torch.int64)


def _row_bincount(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Counts of ``idx`` (T, n) values in [0, size) per row -> (T, size) int64."""
    rows = idx.shape[0]
    offsets = torch.arange(rows, dtype=torch.int64)[:, None] * size  # (T, 1)
    return torch.bincount((idx + offsets).reshape(-1), minlength=rows * size).reshape(rows, size)


class TwoPassThreshold:
    """Accumulate chunks ``(T, n_c)`` twice; :meth:`result` gives the k_t-th largest ``|x_t|`` (float32, (T,)).

    ``k_t <= 0`` gives ``+inf`` (keep nothing); ``k_t`` larger than the number of elements gives 0 (keep all).
    Call :meth:`update` on every chunk, :meth:`next_pass`, :meth:`update` on the same chunks again, then
    :meth:`result`.
    """

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = torch.tensor([int(k) for k in ks], dtype=torch.int64)
        self.hist = torch.zeros(len(self.ks), _HI, dtype=torch.int64)
        self.pass_ = 1

    def update(self, x: torch.Tensor) -> None:
        bits = _bits(x)  # (T, n_c)
        if self.pass_ == 1:
            self.hist += _row_bincount(bits >> 16, _HI)
        else:
            in_bin = (bits >> 16) == self.bins[:, None]  # (T, n_c)
            low = torch.where(in_bin, bits & (_LO - 1), _LO)  # out-of-bin values go to an overflow slot
            self.low_hist += _row_bincount(low, _LO + 1)[:, :_LO]

    def next_pass(self) -> None:
        # count of elements in bins >= b, for each b: reverse cumulative sum
        at_or_above = self.hist.flip(1).cumsum(1).flip(1)  # (T, HI)
        self.total = at_or_above[:, 0].clone()
        k = self.ks.clamp(min=1)
        # the bin of the k-th largest is the highest b with at_or_above[b] >= k
        self.bins = (at_or_above >= k[:, None]).sum(1) - 1  # (T,)
        above = torch.where(self.bins + 1 < _HI, at_or_above.gather(1, (self.bins + 1).clamp(max=_HI - 1)[:, None])[:, 0], 0)
        self.rank = k - above  # 1-based rank of the target inside its bin
        self.low_hist = torch.zeros(len(self.ks), _LO, dtype=torch.int64)
        self.pass_ = 2

    def result(self) -> torch.Tensor:
        at_or_above = self.low_hist.flip(1).cumsum(1).flip(1)  # (T, LO)
        low = (at_or_above >= self.rank[:, None]).sum(1) - 1  # (T,)
        bits = (self.bins.clamp(min=0) << 16) | low.clamp(min=0)
        out = bits.to(torch.int32).view(torch.float32).clone()
        out[self.ks <= 0] = float("inf")
        out[self.ks > self.total] = 0.0
        return out


def kth_largest_abs(x: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """The ``ks[t]``-th largest ``|x[t]|`` of each row of ``x`` (T, n), exactly, as float32 (T,)."""
    sel = TwoPassThreshold(ks)
    sel.update(x)
    sel.next_pass()
    sel.update(x)
    return sel.result()
