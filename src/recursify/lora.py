"""Depth-wise LoRA: one low-rank adapter per unrolled position, stored stacked.

Weights live as `lora_A` [positions, r, d_in] and `lora_B` [positions, d_out, r] (PEFT's
orientation). A batch whose rows sit at different depths is served per distinct depth (rows
grouped, one matmul pair per depth), or, when every row has its own depth, by one gather and two
batched matmuls (the BGMV idea of Punica / S-LoRA); never by a Python loop over rows.
The scale is exactly 1: y = x W^T + (x A^T) B^T.

When a call covers many tokens at one position (training, prefill), `merge_pays` says the dense
weight W + B A is cheaper than the adapter's two thin matmuls, and the model uses it instead.
"""

from __future__ import annotations

import torch
from torch import nn

from .util.positions import RowPositions


class DepthwiseLoRA(nn.Module):
    def __init__(self, num_positions: int, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.rank = rank
        self.lora_A = nn.Parameter(torch.zeros(num_positions, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_positions, out_features, rank))
        self._views: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None

    def split_positions(self) -> None:
        """Cache per-position views of the stacked weights until `merge_positions()`.

        `self.lora_A[p]` is an int index into the stacked Parameter, whose backward writes the
        gradient into a fresh zero [positions, r, d_in] tensor; with one use per position that is
        O(positions^2) memory traffic per backward. One `unbind(0)` per model forward (its backward
        is a single stack) makes it O(positions). The views belong to one forward's autograd
        graph, so the model drops them when that forward ends (see `RecursiveForCausalLM.adapter_views`).
        """
        self._views = (self.lora_A.unbind(0), self.lora_B.unbind(0))

    def merge_positions(self) -> None:
        self._views = None

    def _weights(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._views is not None:
            return self._views[0][position], self._views[1][position]
        return self.lora_A[position], self.lora_B[position]

    def _at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        A, B = self._weights(position)
        return (x @ A.transpose(0, 1)) @ B.transpose(0, 1)

    def merge_pays(self, x: torch.Tensor) -> bool:
        """True when forming W + B A costs less than applying the adapter to x's tokens.

        The adapter costs tokens * r * (d_in + d_out) multiply-adds, twice that again in the
        backward; the merge costs d_out * r * d_in, after which the dense matmul runs at no extra
        cost and its weight gradient also gives A's and B's (one more d_out * r * d_in each). For
        SmolLM2's linears and a step of 1,024 tokens that is 2.4-7x fewer operations for the
        adapter's part; a decode step of a few tokens keeps the adapter. The price is memory: a
        training step keeps each position's dense weight for its backward, as much as the
        original model's layers.
        """
        d_in, d_out = self.lora_A.shape[-1], self.lora_B.shape[1]
        tokens = x.numel() // d_in
        return tokens * (d_in + d_out) > d_in * d_out

    def merged(self, weight: torch.Tensor, position: int) -> torch.Tensor:
        """W + B_p A_p: the dense weight of `position` (differentiable in W, A and B)."""
        A, B = self._weights(position)
        return torch.addmm(weight, B, A)

    def forward(self, x: torch.Tensor, position: "int | RowPositions | torch.Tensor") -> torch.Tensor:
        """Low-rank delta for x [batch, seq, d_in] at `position` (an int, or one per row).

        Which rows share an adapter is read from the host ints of `RowPositions`: grouping rows
        never reads a device tensor back."""
        if isinstance(position, int):
            return self._at(x, position)
        position = RowPositions.of(position)
        groups = position.groups()
        if len(groups) == 1:
            return self._at(x, position.values[0])
        index = position.index
        if len(groups) == len(position):  # every row at its own depth: gather + bmm
            A = self.lora_A.index_select(0, index)  # [batch, r, d_in]
            B = self.lora_B.index_select(0, index)  # [batch, d_out, r]
            return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))
        # Rows usually sit at a few depths (at most one per loop): one matmul pair per distinct
        # position over its rows, instead of copying one adapter per row.
        y = None
        for p, rows in position.group_rows():
            part = self._at(x.index_select(0, rows), p)
            if y is None:
                y = part.new_empty((x.shape[0],) + part.shape[1:])
            y.index_copy_(0, rows, part)  # the rows partition the batch: every row written once
        return y


class DepthwiseDiagonal(nn.Module):
    """The ResidualTransformer's per-layer learned diagonal: y[:, :m] += x[:, :m] * d_l."""

    def __init__(self, num_positions: int, in_features: int, out_features: int):
        super().__init__()
        self.size = min(in_features, out_features)
        self.out_features = out_features
        self.diag = nn.Parameter(torch.zeros(num_positions, self.size))

    def forward(self, x: torch.Tensor, position: "int | RowPositions | torch.Tensor") -> torch.Tensor:
        if isinstance(position, int):
            d = self.diag[position]
        else:
            d = self.diag.index_select(0, RowPositions.of(position).index).unsqueeze(1)
        y = x[..., : self.size] * d
        if self.size < self.out_features:
            y = torch.nn.functional.pad(y, (0, self.out_features - self.size))
        return y


@torch.no_grad()
def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of a batch of matrices [n, out, in]: B = U_r diag(S_r), A = Vh_r.

    Computed from the eigendecomposition of the small Gram matrix (Delta^T Delta or
    Delta Delta^T, solved in float64), which is several times faster than a batched LAPACK SVD on
    CPU and exact at full rank: B A = Delta V V^T with V orthogonal.
    """
    n, out_f, in_f = delta.shape
    x = delta.float()
    if in_f <= out_f:
        gram = x.transpose(1, 2) @ x  # [n, in, in] = V S^2 V^T
        evals, evecs = torch.linalg.eigh(gram.double())
        V = evecs.flip(-1)[..., :rank]  # [n, in, r], largest first
        B = x.double() @ V  # U_r S_r, in float64 so that full rank reproduces Delta to fp32 rounding
        A = V.transpose(1, 2)  # Vh_r
    else:
        gram = x @ x.transpose(1, 2)  # [n, out, out] = U S^2 U^T
        evals, evecs = torch.linalg.eigh(gram.double())
        U = evecs.flip(-1)[..., :rank]
        S = evals.flip(-1)[..., :rank].clamp(min=0).sqrt()
        SVh = U.transpose(1, 2) @ x.double()  # S_r Vh_r
        inv = torch.where(S > S.amax(-1, keepdim=True) * 1e-10, 1.0 / S, torch.zeros_like(S))
        A = (SVh * inv.unsqueeze(-1)).to(x.dtype)
        B = (U * S.unsqueeze(-2)).to(x.dtype)
    return B.to(delta.dtype).contiguous(), A.to(delta.dtype).contiguous()
