"""The offline `LLM` class: vLLM's Python API over an in-process engine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.input_processor import PromptType
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.chat_utils import render_chat
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Generates text for batches of prompts with continuous batching.

    `LLM()` with no model loads the default SmolLM2-135M-Instruct GGUF. Keyword arguments are
    vLLM's engine arguments (`dtype`, `max_model_len`, `max_num_seqs`, `enable_prefix_caching`,
    `seed`, `block_size`, `num_gpu_blocks_override`, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        known = EngineArgs.field_names()
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM got unexpected engine arguments: {', '.join(unknown)}")
        if "kv_cache_space" not in kwargs and "swap_space" in kwargs:
            kwargs.pop("swap_space")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    # ---- generation ----
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: None = None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        if lora_request is not None:
            raise NotImplementedError("lora_request: LoRA adapters are not supported yet")
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"priority: got {len(priority)} values for {len(prompt_list)} prompts")
        return self._run(prompt_list, params, use_tqdm, add_special_tokens=True, priority=priority)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)
        tok = self.get_tokenizer()
        prompts = [
            render_chat(
                tok, conv, chat_template, add_generation_prompt, continue_final_message,
                chat_template_kwargs, tools,
            )
            for conv in conversations
        ]
        params = _as_params_list(sampling_params, len(prompts))
        # The template already holds BOS and other special tokens.
        return self._run(prompts, params, use_tqdm, add_special_tokens=False)

    def embed(
        self, prompts: PromptType | Sequence[PromptType], use_tqdm: bool = True
    ) -> list[EmbeddingRequestOutput]:
        if self.llm_engine.model_config.task != "embed":
            raise ValueError(
                "LLM.embed needs an embedding model; this model was loaded with task='generate'"
            )
        prompt_list = _as_prompt_list(prompts)
        return self._run(prompt_list, [None] * len(prompt_list), use_tqdm, add_special_tokens=True)

    def encode(self, prompts, use_tqdm: bool = True):
        return self.embed(prompts, use_tqdm)

    def reset_prefix_cache(self) -> None:
        self.llm_engine.engine_core.reset_prefix_cache()

    # ---- loop ----
    def _run(self, prompts, params, use_tqdm: bool, add_special_tokens: bool, priority=None):
        engine = self.llm_engine
        if engine.model_config.task == "embed" and any(p is not None for p in params):
            raise ValueError("this is an embedding model: use LLM.embed, not generate/chat")
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = engine.next_request_id()
                if p is not None and p.output_kind != RequestOutputKind.FINAL_ONLY:
                    p = p.clone()
                    p.output_kind = RequestOutputKind.FINAL_ONLY
                engine.add_request(rid, prompt, p, add_special_tokens=add_special_tokens,
                                   priority=priority[i] if priority else 0)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list = [None] * len(ids)
        pbar = None
        if use_tqdm and ids:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        in_toks = out_toks = 0
        start = time.perf_counter()
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if not out.finished:
                        continue
                    results[order[out.request_id]] = out
                    if pbar is not None:
                        in_toks += len(out.prompt_token_ids)
                        if isinstance(out, RequestOutput):
                            out_toks += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = max(time.perf_counter() - start, 1e-6)
                        pbar.set_postfix_str(
                            f"est. speed input: {in_toks / elapsed:.2f} toks/s, "
                            f"output: {out_toks / elapsed:.2f} toks/s"
                        )
                        pbar.update(1)
        except BaseException:
            engine.abort_request([rid for rid, r in zip(ids, results) if r is None])
            raise
        finally:
            if pbar is not None:
                pbar.close()
        return results


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def _as_params_list(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(
            f"got {len(params)} sampling_params for {n} prompts; pass one or one per prompt"
        )
    return params
