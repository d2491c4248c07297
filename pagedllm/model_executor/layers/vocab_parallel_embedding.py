"""Token embedding and LM head, with the vocabulary split by tensor-parallel rank.

Rank r holds rows [r * V / tp, (r + 1) * V / tp) of the (padded) vocabulary. Lookups mask ids
outside the local range and sum over ranks; logits are gathered over ranks and the padding
is cut off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.model_executor.layers.utils import dense_linear, set_weight_attrs


def _pad_to_multiple(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


class VocabParallelEmbedding(nn.Module):
    """[num_tokens] token ids -> [num_tokens, embedding_dim]."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.org_vocab_size = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = _pad_to_multiple(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(
                self.num_embeddings_per_partition,
                embedding_dim,
                dtype=params_dtype or torch.get_default_dtype(),
            ),
            requires_grad=False,
        )
        set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if loaded_weight.shape[0] != self.org_vocab_size or (
            loaded_weight.shape[1:] != param.shape[1:]
        ):
            raise ValueError(
                f"shape mismatch: embedding expects [{self.org_vocab_size}, "
                f"{self.embedding_dim}], checkpoint has {tuple(loaded_weight.shape)}"
            )
        start = self.vocab_start_index
        end = min(self.vocab_end_index, self.org_vocab_size)
        n = max(end - start, 0)
        param.data[:n].copy_(loaded_weight[start:end])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index) * in_range
        out = F.embedding(local_ids, self.weight)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharing the embedding's layout; use `compute_logits`, not forward."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead computes logits via compute_logits(), not forward()")


def compute_logits(head: VocabParallelEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """[num_tokens, hidden] -> [num_tokens, vocab_size] float32 logits."""
    packed = getattr(head, "gguf_packed", None)  # (bytes, type, K): quantization/gguf.py
    if packed is not None:
        from pagedllm.model_executor.layers.quantization.gguf import gguf_linear

        return gguf_linear(hidden.float(), *packed)[..., : head.org_vocab_size]
    logits = dense_linear(hidden, head.weight)
    logits = tensor_model_parallel_all_gather(logits, dim=-1)
    return logits[..., : head.org_vocab_size].float()
