"""The HTTP schema of the OpenAI-compatible server (pydantic models, requests only).

Request models forbid unknown fields: a field that is neither OpenAI's nor one of vLLM's
extras is a 400 naming it. Accepted-but-ignored OpenAI fields are listed in the README
("Server"). Conversion to SamplingParams happens here so every endpoint validates the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from pagedllm.entrypoints.openai.structured_outputs import (
    REMOVED_GUIDED_FIELDS,
    from_response_format,
    from_structured_outputs,
    pick_constraint,
    refuse_removed_fields,
)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

# OpenAI's chat top_logprobs limit; completions' legacy `logprobs` is bounded by --max-logprobs.
MAX_TOP_LOGPROBS = 20
# msgpack (the engine boundary) and torch generators take a signed 64-bit seed.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# Counts OpenAI types as integers: "10", 10.0 and true are refused, not coerced.
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    include_obfuscation: bool | None = None  # accepted, ignored


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported by the chat template."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: ChatRole
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingFields(OpenAIBaseModel):
    """Fields shared by chat and completions: OpenAI's and vLLM's sampling extras."""

    model: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = 1
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None  # accepted, ignored
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    add_special_tokens: bool | None = None
    request_id: str | None = None
    priority: int = 0
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # Removed by vLLM; declared only to be refused by name (see structured_outputs.py).
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_json_object: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    def check_structured_fields(self) -> None:
        refuse_removed_fields({n: getattr(self, n) for n in REMOVED_GUIDED_FIELDS})

    def output_constraint(
        self, tool_constraint: StructuredOutputsParams | None = None
    ) -> StructuredOutputsParams | None:
        """The request's one output constraint (response_format, structured_outputs or a
        required/named tool_choice); ValueError naming the fields if more than one."""
        return pick_constraint({
            "response_format": from_response_format(self.response_format),
            "structured_outputs": from_structured_outputs(self.structured_outputs),
            "tool_choice": tool_constraint,
        })

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, default_max_tokens: int | None,
        constraint: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError as e:
                raise ValueError("logit_bias keys must be token ids (integers as strings)") from e
        return SamplingParams(
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            bad_words=self.bad_words,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=bias,
            allowed_token_ids=self.allowed_token_ids,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=constraint,
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: StrictBool | None = False
    top_logprobs: NonNegativeInt | None = None
    max_tokens: StrictInt | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Accepted, ignored (see README).
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False

    def echo_prefix(self) -> str:
        """vLLM's chat `echo`: the last message's text when it has the response's role (the
        assistant, or the last message's own role without a generation prompt), else ""."""
        if not self.echo or not self.messages:
            return ""
        last = self.messages[-1]
        role = "assistant" if self.add_generation_prompt else last.role
        if last.role != role or last.content is None:
            return ""
        if isinstance(last.content, str):
            return last.content
        return "".join(part.text or "" for part in last.content if part.type == "text")

    def check_supported(self) -> None:
        """Rejects fields whose meaning we cannot honour (instead of silently ignoring them)."""
        self.check_structured_fields()
        if self.modalities and any(m != "text" for m in self.modalities):
            raise ValueError("modalities: only 'text' is supported")
        if self.audio is not None:
            raise ValueError("audio: audio output is not supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.top_logprobs is not None and self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs: must be at most {MAX_TOP_LOGPROBS}")

    def to_sampling_params(
        self, default_max_tokens: int | None,
        tool_constraint: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        max_tokens = (
            self.max_completion_tokens if self.max_completion_tokens is not None
            else self.max_tokens
        )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(
            max_tokens, logprobs, default_max_tokens, self.output_constraint(tool_constraint)
        )


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    best_of: int | None = None
    echo: bool = False
    logprobs: NonNegativeInt | None = None
    max_tokens: StrictInt | None = 16
    suffix: str | None = None

    def check_supported(self) -> None:
        self.check_structured_fields()
        if self.suffix:
            raise ValueError("suffix: is not supported (no fill-in-the-middle models)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(
                f"best_of: is not supported (got best_of={self.best_of}, n={self.n}); "
                "request n samples instead"
            )

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens=0: score the prompt, return no completion (vLLM's
        "echo without generation"; the engine still runs one step, whose token is dropped)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        max_tokens = 1 if self.echo_only else self.max_tokens
        params = self._sampling_params(
            max_tokens, self.logprobs, default_max_tokens, self.output_constraint()
        )
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs
        return params


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


FinishReason = Literal["stop", "length", "abort"]
