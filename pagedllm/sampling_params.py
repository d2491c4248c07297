"""SamplingParams: every generation control of a request, validated on construction."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

_SAMPLING_EPS = 1e-5
DEFAULT_MAX_LOGPROBS = 20


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's `StructuredOutputsParams`): exactly one of `json` (a JSON
    schema, dict or string), `regex`, `choice` (a list of strings), `grammar` (EBNF),
    `json_object` (any JSON object) or `structural_tag` (xgrammar's format, dict or string).

    JSON output never has free whitespace (a model can otherwise loop on it): separators are
    compact (`,` and `:`), so `disable_any_whitespace` (vLLM's opt-in) is always in effect and
    accepted for compatibility. `disable_additional_properties` closes every object of the
    schema that does not say otherwise.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    # Set by the chat handler under a reasoning parser, not by users: the token ids that end
    # the reasoning; the constraint applies from there on.
    reasoning_end: list[int] | None = None

    def __post_init__(self) -> None:
        given = self.constraint_names()
        if len(given) != 1:
            what = " and ".join(given) if given else "none"
            raise ValueError(
                "structured_outputs: exactly one of json, regex, choice, grammar, json_object, "
                f"structural_tag must be set; got {what}"
            )
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice: must be a non-empty list of strings")
        if self.whitespace_pattern is not None:
            raise ValueError(
                "structured_outputs.whitespace_pattern: is not supported (JSON separators "
                "are always compact)"
            )

    def constraint_names(self) -> list[str]:
        """The constraint fields that are set (json_object only when true)."""
        return [
            n for n in _CONSTRAINTS
            if getattr(self, n) is not None and (n != "json_object" or self.json_object)
        ]

    @property
    def kind(self) -> str:
        return self.constraint_names()[0]


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output holds all text and tokens so far
    DELTA = 1  # every output holds only what is new since the last one
    FINAL_ONLY = 2  # only the finished output is emitted


@dataclass
class SamplingParams:
    """vLLM-compatible sampling parameters. Invalid values raise ValueError naming the field."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the input processor, not by users.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(
                f"best_of is not supported (got best_of={self.best_of}, n={self.n}); "
                "request n samples instead"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            # vLLM uses -1 for "off"; 0 means the same here.
            self.top_k = 0 if (self.top_k is None or self.top_k == -1) else self.top_k
        if self.logit_bias is not None:
            self.logit_bias = {
                int(k): max(-100.0, min(100.0, float(v))) for k, v in self.logit_bias.items()
            }
        self._verify()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: other sampling knobs are irrelevant.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
        # Union, not assignment: decoding from msgspec runs __post_init__ again and must keep
        # the EOS id the input processor added.
        self.all_stop_token_ids = set(self.all_stop_token_ids or ()) | set(self.stop_token_ids)

    def _verify(self) -> None:
        def bad(field_name: str, msg: str) -> ValueError:
            return ValueError(f"{field_name} {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", f"must be greater than 0, got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            raise bad("temperature", f"must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int):
            raise bad("top_k", f"must be an integer, got {self.top_k!r}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                "min_tokens",
                f"must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.",
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", f"must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", f"must be non-negative, got {self.prompt_logprobs}.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise bad(
                "truncate_prompt_tokens", f"must be at least 1, got {self.truncate_prompt_tokens}."
            )
        if any(not s for s in self.stop):
            raise bad("stop", "cannot contain an empty string.")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids}.")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise bad("allowed_token_ids", "must not be empty.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}.")

    def verify_against_model(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that need the model: token ids in range and logprob counts under the limit."""
        for t in self.stop_token_ids or []:
            if t >= vocab_size:
                raise ValueError(
                    f"stop_token_ids contains token id {t} outside the vocabulary (size {vocab_size})."
                )
        for t in self.allowed_token_ids or []:
            if not 0 <= t < vocab_size:
                raise ValueError(
                    f"allowed_token_ids contains token id {t} outside the vocabulary (size {vocab_size})."
                )
        for t in (self.logit_bias or {}):
            if not 0 <= t < vocab_size:
                raise ValueError(
                    f"logit_bias contains token id {t} outside the vocabulary (size {vocab_size})."
                )
        limit = max_logprobs if max_logprobs >= 0 else vocab_size
        if self.logprobs is not None and self.logprobs > limit:
            raise ValueError(f"logprobs must be at most {limit} (max_logprobs), got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs > limit:
            raise ValueError(
                f"prompt_logprobs must be at most {limit} (max_logprobs), got {self.prompt_logprobs}."
            )

    @property
    def sampling_type_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
