"""LLMEngine: the synchronous front-end over an in-process EngineCore (used by `LLM`)."""

from __future__ import annotations

import itertools
import time

from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core import EngineCore
from pagedllm.engine.input_processor import InputProcessor, PromptType
from pagedllm.engine.output_processor import OutputProcessor, ParentRequest
from pagedllm.engine.protocol import SchedulerStats
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import get_tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        dp = config.parallel_config.data_parallel_size
        if dp > 1:
            raise NotImplementedError(
                f"data_parallel_size={dp} runs behind the server (`pagedllm serve "
                f"--data-parallel-size {dp}`); the offline LLM runs one engine, so start one "
                "LLM per GPU (CUDA_VISIBLE_DEVICES) for offline data parallelism"
            )
        self.config = config
        self.model_config = config.model_config
        # Start-up stages in seconds (the engine core's own are its workers' `timings`).
        self.startup_timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.tokenizer = (
            None if config.model_config.skip_tokenizer_init else get_tokenizer(config.model_config)
        )
        self.startup_timings["tokenizer"] = time.perf_counter() - t0
        self.input_processor = InputProcessor(
            config.model_config, self.tokenizer, config.scheduler_config.policy,
            config.structured_outputs_config.backend,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        t0 = time.perf_counter()
        self.engine_core = EngineCore(config)
        self.startup_timings["engine_core"] = time.perf_counter() - t0
        self._counter = itertools.count()
        self.last_stats: SchedulerStats | None = None
        # Totals since start, for tests and progress bars.
        self.total_prefix_cache_queries = 0
        self.total_prefix_cache_hits = 0
        self.total_num_preemptions = 0
        self.total_prompt_tokens_computed = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        t0 = time.perf_counter()
        config = args.create_engine_config()  # reads the model's config (imports transformers)
        config_s = time.perf_counter() - t0
        engine = cls(config)
        engine.startup_timings["engine_config"] = config_s
        return engine

    def next_request_id(self) -> str:
        return str(next(self._counter))

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
        priority: int = 0,
    ) -> None:
        """Validates, tokenizes and queues; raises ValueError for a request that cannot run."""
        arrival_time = arrival_time or time.time()
        n = params.n if params is not None else 1
        if n == 1:
            req, text = self.input_processor.process(
                request_id, prompt, params, arrival_time, add_special_tokens, priority
            )
            self.engine_core.add_request(req)
            self.output_processor.add_request(
                request_id, request_id, text, req.prompt_token_ids, req.sampling_params, arrival_time
            )
            return
        parent = ParentRequest(request_id, n, params.output_kind)
        added: list[str] = []
        try:
            for i in range(n):
                child = ParentRequest.child_params(params, i)
                cid = parent.child_id(i)
                req, text = self.input_processor.process(
                    cid, prompt, child, arrival_time, add_special_tokens, priority
                )
                self.engine_core.add_request(req)
                added.append(cid)
                self.output_processor.add_request(
                    cid, request_id, text, req.prompt_token_ids, req.sampling_params,
                    arrival_time, parent=parent, index=i,
                )
        except Exception:
            self.engine_core.abort_requests(added)
            self.output_processor.abort_requests([request_id])
            raise

    def abort_request(self, request_ids: list[str]) -> None:
        dropped = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(dropped)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        outs = self.engine_core.step()
        stats = outs.scheduler_stats
        if stats is not None:
            self.last_stats = stats
            self.total_prefix_cache_queries += stats.prefix_cache_queries
            self.total_prefix_cache_hits += stats.prefix_cache_hits
            self.total_num_preemptions += stats.num_preemptions
            self.total_prompt_tokens_computed += stats.num_prompt_tokens
        processed = self.output_processor.process_outputs(outs.outputs)
        if processed.reqs_to_abort:
            self.engine_core.abort_requests(processed.reqs_to_abort)
        return processed.request_outputs
