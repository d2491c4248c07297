"""What the scheduler hands the worker each step, and what the worker hands back."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.engine.protocol import LogprobsLists
from pagedllm.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the worker has no state for: first schedule, or resumed after preemption."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty only when resumed after preemption
    sampling_params: SamplingParams | None  # None for embedding (pooling) requests
    block_ids: list[int]  # the request's whole block table (KV cache group 0)
    num_computed_tokens: int  # tokens already in the cache (prefix hit)
    # Models with several KV cache groups: the tables of groups 1.. (null ids where freed).
    extra_block_ids: tuple[list[int], ...] = ()


@dataclass(slots=True)
class CachedRequestData:
    """A request the worker already holds; only what changed since its last step."""

    req_id: str
    new_block_ids: list[int]  # appended to its block table (KV cache group 0)
    num_computed_tokens: int
    extra_new_block_ids: tuple[list[int], ...] = ()  # groups 1.., appended to theirs
    # Pipeline batch queue only: the output tokens the request gained since it was last
    # scheduled, for stages before the last (they do not sample, and no broadcast tells them).
    new_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step. Order of iteration = batch order.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the worker must drop (finished, aborted or preempted since last step).
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Structured outputs: the constrained requests that sample this step, in batch order
    # (their token bitmask is computed just before sampling, see EngineCore).
    structured_output_request_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ModelRunnerOutput:
    req_ids: list[str]
    # Per request, the tokens sampled this step ([] for a prefill chunk that did not reach
    # the end of the prompt).
    sampled_token_ids: list[list[int]]
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    pooler_output: dict[str, list[float]] = field(default_factory=dict)


EMPTY_MODEL_RUNNER_OUTPUT = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
