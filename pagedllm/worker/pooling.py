"""The worker side of embedding (pooling) requests.

Owns three decisions for a model loaded with task="embed":
- which pooler it gets: the sentence-transformers files of an HF directory when present
  (modules.json, the Pooling module's config, a Normalize module), else the model class's
  `default_pooling_type` (CLS for BERT-family encoders), else last-token pooling, always
  normalized (vLLM's defaults);
- how many KV-cache blocks it needs: a pooling request runs its whole prompt in one step and
  never reuses cached blocks, so one step's worth of tokens is enough;
- turning one step's hidden states into `ModelRunnerOutput.pooler_output` vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.model_executor.layers.pooler import (
    Pooler,
    PoolerConfig,
    PoolingType,
    pooling_types_from_sentence_transformers,
)
from pagedllm.model_executor.loader.errors import ModelLoadError
from pagedllm.model_executor.loader.resolve import read_sentence_transformers_config
from pagedllm.worker.input_batch import CachedRequestState

logger = logging.getLogger(__name__)

# sentence-transformers modules whose effect we reproduce (the transformer is the model).
_ST_SUPPORTED_SUFFIXES = (".Transformer", ".Pooling", ".Normalize")


def get_pooler_config(model_config: ModelConfig, model: nn.Module) -> PoolerConfig:
    """The pooling the model's files ask for; ModelLoadError if they ask for what we lack."""
    st = None
    if model_config.model_format == "hf":
        st = read_sentence_transformers_config(model_config.model_path)
    if st is not None and st.pooling is not None:
        unsupported = [t for t in st.module_types if not t.endswith(_ST_SUPPORTED_SUFFIXES)]
        if unsupported:
            raise ModelLoadError(
                f"{model_config.model_path}: sentence-transformers modules "
                f"{', '.join(unsupported)} are not supported (only Transformer, Pooling, "
                "Normalize)"
            )
        try:
            kinds = pooling_types_from_sentence_transformers(st.pooling)
        except ValueError as e:
            raise ModelLoadError(f"{model_config.model_path}: {e}") from e
        return PoolerConfig(kinds, normalize=st.normalize)
    default = getattr(model, "default_pooling_type", "LAST")
    return PoolerConfig((PoolingType[default],), normalize=True)


def pooling_num_blocks(config: EngineConfig) -> int:
    """KV blocks enough for any one step of pooling requests.

    A step holds at most max_num_batched_tokens tokens over at most max_num_seqs requests, each
    rounded up to whole blocks; a request's blocks are freed when it finishes, in that step.
    """
    sc = config.scheduler_config
    bs = config.cache_config.block_size
    tokens = max(sc.max_num_batched_tokens, config.model_config.max_model_len)
    return -(-tokens // bs) + sc.max_num_seqs


class PoolingRunner:
    """Pools the hidden states of a step's pooling requests, one vector per request."""

    def __init__(self, model_config: ModelConfig, model: nn.Module) -> None:
        self.config = get_pooler_config(model_config, model)
        self.pooler = Pooler(self.config)
        logger.info(
            "pooling: %s, normalize=%s",
            "+".join(t.value for t in self.config.pooling_types), self.config.normalize,
        )

    def pool(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size], requests back to back
        states: Sequence[CachedRequestState],
        counts: Sequence[int],  # tokens scheduled per request this step
    ) -> dict[str, list[float]]:
        """req_id -> embedding. Every request must run its whole prompt in this step."""
        for state, n in zip(states, counts, strict=True):
            if state.num_computed_tokens != 0 or n != len(state.prompt_token_ids):
                raise RuntimeError(
                    f"pooling request {state.req_id} was not scheduled as one whole-prompt "
                    f"step ({state.num_computed_tokens} computed, {n} of "
                    f"{len(state.prompt_token_ids)} scheduled)"
                )
        lens = torch.tensor(list(counts), dtype=torch.int64)
        vectors = self.pooler(hidden, lens).tolist()  # the one host sync of a pooling step
        return {state.req_id: vec for state, vec in zip(states, vectors)}
