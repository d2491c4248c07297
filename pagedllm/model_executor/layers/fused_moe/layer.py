"""`FusedMoE`: the experts of one MoE block, their weights, routing and dispatch.

Parameters (this tensor-parallel rank's share; TP shards every expert's intermediate dim):
w13_weight [num_experts, 2 * intermediate / tp, hidden] (gate rows, then up rows) and
w2_weight [num_experts, hidden, intermediate / tp]; the partial outputs are all-reduced.
Checkpoint tensors arrive one expert matrix at a time with shard_id (expert, "gate" | "up" |
"down"), each the full [intermediate, hidden] or [hidden, intermediate] HF matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pagedllm.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from pagedllm.model_executor.layers.fused_moe.routing import select_experts
from pagedllm.model_executor.layers.fused_moe.torch_moe import grouped_experts_torch
from pagedllm.model_executor.layers.utils import set_weight_attrs

EXPERT_SHARDS = ("gate", "up", "down")


class FusedMoE(nn.Module):
    """forward(hidden [num_tokens, hidden], router_logits [num_tokens, num_experts]) ->
    [num_tokens, hidden]: top-k softmax routing, then the experts (Triton on CUDA, grouped
    torch on CPU)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        if intermediate_size % self.tp_size != 0:
            raise ValueError(f"expert intermediate size {intermediate_size} is not divisible "
                             f"by the tensor-parallel size {self.tp_size}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.reduce_results = reduce_results
        self.intermediate_size = intermediate_size
        self.inter_per_rank = intermediate_size // self.tp_size
        dtype = params_dtype or torch.get_default_dtype()
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * self.inter_per_rank, hidden_size, dtype=dtype),
            requires_grad=False,
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, self.inter_per_rank, dtype=dtype),
            requires_grad=False,
        )
        for param in (self.w13_weight, self.w2_weight):
            set_weight_attrs(param, {"weight_loader": self.weight_loader})

    def expected_shards(self, param_name: str) -> set[tuple[int, str]]:
        """Shard ids a parameter needs before it counts as loaded."""
        kinds = ("down",) if param_name.endswith("w2_weight") else ("gate", "up")
        return {(e, kind) for e in range(self.num_experts) for kind in kinds}

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2
                and shard_id[1] in EXPERT_SHARDS):  # fmt: skip
            raise ValueError(f"expert weights need shard_id (expert, gate|up|down), "
                             f"got {shard_id!r}")
        expert, kind = int(shard_id[0]), shard_id[1]
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (num_experts {self.num_experts})")
        n, lo = self.inter_per_rank, self.tp_rank * self.inter_per_rank
        if kind == "down":
            want = (param.shape[1], self.intermediate_size)
            dst, src_dim, dst_rows = param.data[expert], 1, None
        else:
            want = (self.intermediate_size, param.shape[2])
            offset = 0 if kind == "gate" else n
            dst, src_dim, dst_rows = param.data[expert], 0, (offset, n)
        if tuple(loaded_weight.shape) != want:
            raise ValueError(f"expert {kind} weight: expected {want}, checkpoint has "
                             f"{tuple(loaded_weight.shape)}")
        src = loaded_weight.narrow(src_dim, lo, n)
        if dst_rows is not None:
            dst = dst.narrow(0, *dst_rows)
        dst.copy_(src)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        if hidden.is_cuda:
            out = pick_fused_experts(hidden)(
                hidden, self.w13_weight, self.w2_weight, topk_weights, topk_ids
            )
        else:
            out = grouped_experts_torch(
                hidden, self.w13_weight, self.w2_weight, topk_weights, topk_ids
            )
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out


def pick_fused_experts(hidden: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The GPU experts kernel for this many tokens: matrix-vector launches for a few tokens
    (decode), the sorted grouped GEMM above that. Shape-based, so fixed per CUDA graph."""
    from pagedllm.model_executor.layers.fused_moe import moe_gemv, triton_moe

    if hidden.shape[0] <= moe_gemv.MOE_GEMV_MAX_TOKENS:
        return moe_gemv.fused_experts_gemv
    return triton_moe.fused_experts_triton
