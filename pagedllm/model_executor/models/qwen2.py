"""Qwen2: the Llama decoder with a bias on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from pagedllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    qkv_bias_default = True
    o_bias_follows_config = False


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen2Attention
