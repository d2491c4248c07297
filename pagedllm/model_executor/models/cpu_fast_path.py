"""The CPU forward of Llama-style decoder layers without per-module dispatch.

A decode step of a small model on CPU spends as much time in Python as in arithmetic: ~12
`nn.Module.__call__`s per layer, attribute lookups through `nn.Module.__getattr__`, and a
few small torch ops each. Here one function runs a layer with the C++ CPU ops (fused
add + RMSNorm, RoPE in place, SiLU-and-mul; the attention backend's KV write and paged
decode kernel) and calls the projections' and the attention's `forward` directly, through
references gathered once per model.

It is the same computation as `LlamaDecoderLayer.forward` on those ops (the per-module paths
call the same kernels), so results are identical; it is taken only where that holds: every
layer, its attention, MLP, norms and rotary embedding of the Llama classes' own behaviour
(subclasses that override none of the methods involved, e.g. Qwen2, qualify; QK-norm goes
through the module path), no forward hooks anywhere, plain RMSNorm weights in the model's
dtype, and activations the CPU ops take (CPU float32/bfloat16). The references are gathered
at the model's first CPU forward (after loading): a hook registered later is not seen
(drop `LlamaModel._cpu_fast_plan` to re-check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm import cpu_ops
from pagedllm.model_executor.layers.activation import SiluAndMul
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding


@dataclass(slots=True)
class _LayerRefs:
    """What one layer's fast forward touches, looked up once."""

    input_norm: RMSNorm
    post_norm: RMSNorm
    qkv: Any  # bound forward of the QKV projection
    split: list[int]  # [q_size, kv_size, kv_size]
    attn: nn.Module  # LlamaAttention (for QK-norm models: its _apply_qk)
    rope: RotaryEmbedding | None  # None: QK-norm path through attn._apply_qk
    attention: Any  # bound forward of the paged Attention layer
    o_proj: Any
    gate_up: Any
    down: Any


def _no_hooks(module: nn.Module) -> bool:
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules()
    )


def _plain_norm(norm: nn.Module, dtype: torch.dtype) -> bool:
    return (type(norm).forward is RMSNorm.forward and type(norm)._norm is RMSNorm._norm
            and norm.weight.dtype == dtype)


def _layer_refs(layer: nn.Module, dtype: torch.dtype) -> _LayerRefs | None:
    """The layer's references, or None when it does not behave as the plain Llama layer."""
    from pagedllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not (isinstance(layer, LlamaDecoderLayer) and isinstance(attn, LlamaAttention)
            and isinstance(mlp, LlamaMLP)):
        return None
    cls, acls, mcls = type(layer), type(attn), type(mlp)
    if (cls.forward is not LlamaDecoderLayer.forward
            or cls.norm_input is not LlamaDecoderLayer.norm_input
            or acls.forward is not LlamaAttention.forward
            or mcls.forward is not LlamaMLP.forward or type(mlp.act_fn) is not SiluAndMul):
        return None
    if not (_plain_norm(layer.input_layernorm, dtype)
            and _plain_norm(layer.post_attention_layernorm, dtype)):
        return None
    rope = attn.rotary_emb
    qk_norm = attn.q_norm is not None or acls._apply_qk is not LlamaAttention._apply_qk
    if not qk_norm and (type(rope).forward is not RotaryEmbedding.forward
                        or rope.cos_sin_cache.dtype != torch.float32):
        return None
    return _LayerRefs(
        layer.input_layernorm, layer.post_attention_layernorm, attn.qkv_proj.forward,
        [attn.q_size, attn.kv_size, attn.kv_size], attn, None if qk_norm else rope,
        attn.attn.forward, attn.o_proj.forward, mlp.gate_up_proj.forward,
        mlp.down_proj.forward,
    )


def build_plan(layers: list[nn.Module], dtype: torch.dtype) -> list[_LayerRefs] | None:
    """Per-layer references for `layers`, or None when any layer must take the module path."""
    if torch.nn.modules.module._global_forward_hooks or (
        torch.nn.modules.module._global_forward_pre_hooks
    ):
        return None
    plan = []
    for layer in layers:
        refs = _layer_refs(layer, dtype) if _no_hooks(layer) else None
        if refs is None:
            return None
        plan.append(refs)
    return plan


def usable(hidden: torch.Tensor) -> bool:
    """Whether this step's activations take the fast path (CPU, an op dtype, 2-D)."""
    return hidden.dim() == 2 and hidden.stride(-1) == 1 and cpu_ops.supports(hidden)


def layer_forward(
    refs: _LayerRefs,
    positions: torch.Tensor,  # [num_tokens] int64
    hidden: torch.Tensor,  # [num_tokens, hidden_size]
    residual: torch.Tensor | None,
    kv_cache: torch.Tensor,
    attn_metadata: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`LlamaDecoderLayer.forward` on the CPU ops: (hidden, residual) of the next layer."""
    norm = refs.input_norm
    if residual is None:
        residual = hidden
        hidden = cpu_ops.rms_norm(hidden, norm.weight, norm.eps)
    else:
        hidden, residual = cpu_ops.fused_add_rms_norm(hidden, residual, norm.weight, norm.eps)
    q, k, v = refs.qkv(hidden).split(refs.split, dim=-1)
    rope = refs.rope
    if rope is None:
        q, k = refs.attn._apply_qk(positions, q, k)
    else:
        cpu_ops.rope_(positions, q, k, rope.cos_sin_cache, rope.head_size, rope.is_neox_style)
    hidden = refs.o_proj(refs.attention(q, k, v, kv_cache, attn_metadata))
    norm = refs.post_norm
    hidden, residual = cpu_ops.fused_add_rms_norm(hidden, residual, norm.weight, norm.eps)
    return refs.down(cpu_ops.silu_and_mul(refs.gate_up(hidden))), residual
