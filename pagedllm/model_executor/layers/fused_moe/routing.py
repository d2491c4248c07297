"""Top-k routing: router logits -> (weights, expert ids) per token, as HF's MoE blocks do."""

from __future__ import annotations

import torch


def select_experts(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in float32, the top_k largest, rescaled to sum to 1 when
    `renormalize` (Mixtral always, Qwen MoE by `norm_topk_prob`).

    Returns (topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int64).
    """
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
