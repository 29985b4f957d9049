"""Depth-wise LoRA: one low-rank adapter per unrolled position, stored stacked.

Weights live as `lora_A` [positions, r, d_in] and `lora_B` [positions, d_out, r] (PEFT's
orientation), so a batch whose rows sit at different depths is served by one gather and two
batched matmuls (the BGMV idea of Punica / S-LoRA) instead of a Python loop over rows.
The scale is exactly 1: y = x W^T + (x A^T) B^T.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseLoRA(nn.Module):
    def __init__(self, num_positions: int, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.rank = rank
        self.lora_A = nn.Parameter(torch.zeros(num_positions, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_positions, out_features, rank))

    def forward(self, x: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Low-rank delta for x [batch, seq, d_in] at `position` (an int, or one per row)."""
        if isinstance(position, int):
            return (x @ self.lora_A[position].transpose(0, 1)) @ self.lora_B[position].transpose(0, 1)
        A = self.lora_A.index_select(0, position)  # [batch, r, d_in]
        B = self.lora_B.index_select(0, position)  # [batch, d_out, r]
        return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))

    def delta_weight(self, position: int) -> torch.Tensor:
        """B_l A_l, the dense correction this adapter adds to the shared weight."""
        return self.lora_B[position] @ self.lora_A[position]


class DepthwiseDiagonal(nn.Module):
    """The ResidualTransformer's per-layer learned diagonal: y[:, :m] += x[:, :m] * d_l."""

    def __init__(self, num_positions: int, in_features: int, out_features: int):
        super().__init__()
        self.size = min(in_features, out_features)
        self.out_features = out_features
        self.diag = nn.Parameter(torch.zeros(num_positions, self.size))

    def forward(self, x: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        d = self.diag[position] if isinstance(position, int) else self.diag.index_select(0, position).unsqueeze(1)
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
