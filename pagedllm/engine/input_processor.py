"""InputProcessor: validates and tokenizes a user request into an EngineCoreRequest."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from pagedllm.config import ModelConfig
from pagedllm.engine.protocol import EngineCoreRequest
from pagedllm.sampling_params import SamplingParams

# What `LLM.generate` and the server accept as one prompt.
PromptType = str | dict[str, Any] | list[int]


def check_priority(priority: int, policy: str) -> None:
    """Under first-come-first-served scheduling, like vLLM, a request priority other than 0 is
    refused rather than silently ignored."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority: must be an integer, got {priority!r}")
    if priority != 0 and policy != "priority":
        raise ValueError(
            f"priority: got priority {priority}, but priority scheduling is not enabled "
            "(start the engine with --scheduling-policy priority)"
        )


def _generation_config_eos_ids(model_config: ModelConfig) -> list[int]:
    path = model_config.model_path
    if not os.path.isdir(path):
        return []
    gc_path = os.path.join(path, "generation_config.json")
    if not os.path.exists(gc_path):
        return []
    try:
        with open(gc_path) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(e) for e in eos]


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer, scheduling_policy: str = "fcfs",
                 structured_outputs_backend: str = "auto") -> None:
        self.model_config = model_config
        self.structured_outputs_backend = structured_outputs_backend
        self.tokenizer = tokenizer
        self.scheduling_policy = scheduling_policy
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        if tokenizer is None:
            eos = getattr(model_config.hf_config, "eos_token_id", None)
            self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        self.extra_eos_ids = [
            e for e in _generation_config_eos_ids(model_config) if e != self.eos_token_id
        ]
        self.vocab_size = model_config.vocab_size

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                "text prompts need a tokenizer (skip_tokenizer_init=True): pass prompt_token_ids"
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def tokenize(
        self, prompt: PromptType, add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._encode(prompt, add_special_tokens)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                return prompt.get("prompt"), [int(t) for t in ids]
            if "prompt" in prompt:
                text = prompt["prompt"]
                return text, self._encode(text, add_special_tokens)
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def validate_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("The prompt cannot be empty.")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"Token id {bad[0]} is out of vocabulary (vocab_size={self.vocab_size})."
            )

    def prepare_params(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        mc = self.model_config
        params = params.clone()
        params.verify_against_model(self.vocab_size, mc.max_logprobs)
        if params.max_tokens is None:
            params.max_tokens = max(1, mc.max_model_len - num_prompt_tokens)
        if not params.ignore_eos:
            for e in self.extra_eos_ids:
                if e not in params.stop_token_ids:
                    params.stop_token_ids.append(e)
        stops = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stops.add(self.eos_token_id)
        params.all_stop_token_ids = stops
        if self.tokenizer is None:
            params.detokenize = False
        if params.structured_outputs is not None:
            from pagedllm.structured_output import validate_structured_outputs

            validate_structured_outputs(params.structured_outputs, self.structured_outputs_backend)
        if params.bad_words and self.tokenizer is not None:
            seqs: list[list[int]] = []
            for word in params.bad_words:
                for variant in (word, " " + word.lstrip()):
                    ids = self.tokenizer.encode(variant, add_special_tokens=False)
                    if ids and ids not in seqs:
                        seqs.append(ids)
            params.bad_words_token_ids = seqs
        return params

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
        priority: int = 0,
    ) -> tuple[EngineCoreRequest, str | None]:
        """Returns the engine request and the prompt text (None if given as token ids)."""
        check_priority(priority, self.scheduling_policy)
        text, token_ids = self.tokenize(prompt, add_special_tokens)
        if params is not None and params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens :]
        self.validate_token_ids(token_ids)
        max_len = self.model_config.max_model_len
        if len(token_ids) > max_len:
            raise ValueError(
                f"The prompt (length {len(token_ids)}) is longer than the maximum model length "
                f"of {max_len}. Make sure that `max_model_len` is no smaller than the number of "
                "text tokens."
            )
        if params is not None:
            params = self.prepare_params(params, len(token_ids))
        req = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_id=self.eos_token_id,
            arrival_time=arrival_time if arrival_time is not None else time.time(),
            pooling=params is None,
            priority=priority,
        )
        return req, text
