"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import cpu_ops
from pagedllm.model_executor.layers.utils import set_weight_attrs


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32.

    forward(x) returns the normed x; forward(x, residual) returns
    (normed(x + residual), x + residual) so the caller carries the new residual.
    """

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self._shape = (hidden_size,)
        self.weight = nn.Parameter(
            torch.empty(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
            requires_grad=False,
        )
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if tuple(param.shape) != tuple(loaded_weight.shape):
            raise ValueError(f"shape mismatch: RMSNorm {tuple(param.shape)} vs checkpoint "
                             f"{tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm (one op, the same arithmetic as x * rsqrt(mean(x^2) + eps));
        # below fp32 the normed x is rounded to x's dtype before the weight, as in HF.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self._shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self._shape, None, self.eps).to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:
            # Triton kernels; the fused variant writes x + residual into `residual` in place.
            from pagedllm.model_executor.layers.ops import rms_norm as ops

            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps)
            return ops.fused_add_rms_norm(x, residual.contiguous(), self.weight, self.eps)
        if (x.dim() == 2 and type(self)._norm is RMSNorm._norm
                and cpu_ops.supports(x, self.weight)):
            # One C++ call; like the CUDA kernel, the fused variant writes x + residual into
            # `residual` in place.
            if residual is None:
                return cpu_ops.rms_norm(x, self.weight, self.eps)
            if residual.dtype == x.dtype and residual.stride(-1) == 1:
                return cpu_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        summed = x + residual
        return self._norm(summed), summed
