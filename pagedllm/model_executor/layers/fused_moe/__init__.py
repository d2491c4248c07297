"""Mixture-of-experts: one layer (`FusedMoE`) that models call with the hidden states and the
router logits; routing (`select_experts`), the CPU path grouped by expert (`torch_moe`) and the
fused Triton kernel (`triton_moe`) are its business."""

from pagedllm.model_executor.layers.fused_moe.layer import FusedMoE
from pagedllm.model_executor.layers.fused_moe.routing import select_experts

__all__ = ["FusedMoE", "select_experts"]
