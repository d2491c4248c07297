"""Phi-3 / Phi-3.5 / Phi-4 (`Phi3ForCausalLM`): the Llama decoder with fused `qkv_proj` and
`gate_up_proj` tensors in the checkpoint, LongRoPE scaling (rope_type "longrope", see
`LongRoPEScalingRotaryEmbedding`), an optional sliding window and partial rotary dims
(Phi-4-mini).

Nothing here but the registration: the fused tensors load through the QKV and merged
gate/up layers' own pre-fused paths (which split them per tensor-parallel rank), the RoPE
variant comes from the config, and the window from `sliding_window`.
"""

from __future__ import annotations

from pagedllm.model_executor.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 family; see the module docstring."""
