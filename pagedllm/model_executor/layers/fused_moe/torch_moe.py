"""Experts in plain torch: the CPU path, grouped by expert, and a per-token reference.

Weights, as `FusedMoE` holds them: w13 [num_experts, 2 * intermediate, hidden] (gate rows,
then up rows) and w2 [num_experts, hidden, intermediate]. Each token's output is
sum_j weight_j * down_e(silu(gate_e(x)) * up_e(x)) over its top-k experts e = ids_j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate_up = x @ w13.t()  # [n, 2 * intermediate]
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()  # [n, hidden]


def grouped_experts_torch(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
) -> torch.Tensor:  # [num_tokens, hidden]
    """(token, expert) pairs sorted by expert, then one pair of GEMMs per expert that got
    tokens: experts without tokens cost nothing, and no token visits an expert it did not pick.
    Reads the per-expert counts on the host once (a CPU path)."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, token order kept
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order]
    out = torch.zeros_like(hidden)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        y = _expert_mlp(hidden.index_select(0, rows), w13[expert], w2[expert])
        out.index_add_(0, rows, (y * weights[start : start + count, None]).to(out.dtype))
        start += count
    return out


def experts_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Per-token, per-choice loop in float64: the reference tests compare against."""
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    for t in range(hidden.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            y = _expert_mlp(hidden[t : t + 1].double(), w13[e].double(), w2[e].double())
            out[t] += float(topk_weights[t, j]) * y[0]
    return out
