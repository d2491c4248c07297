"""Request fields that constrain the output: OpenAI's `response_format`, vLLM's
`structured_outputs` object, and the removed `guided_*` fields (refused by name).

At most one constraint per request: `response_format` (other than text), `structured_outputs`
and a required or named `tool_choice` are mutually exclusive (400 naming them).
"""

from __future__ import annotations

from typing import Any

from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output import validate_structured_outputs

# vLLM removed these in favour of `structured_outputs`; a 400 beats silently ignoring them.
REMOVED_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_json_object": "json_object",
    "guided_decoding_backend": None,
    "guided_whitespace_pattern": None,
}


def refuse_removed_fields(extra: dict[str, Any]) -> None:
    for name, value in extra.items():
        if name in REMOVED_GUIDED_FIELDS and value is not None:
            new = REMOVED_GUIDED_FIELDS[name]
            hint = (f'use "structured_outputs": {{"{new}": ...}} or response_format' if new
                    else "use structured_outputs (the backend is --structured-outputs-backend)")
            raise ValueError(f"{name}: was removed; {hint}")


def from_response_format(rf: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """OpenAI's response_format -> a constraint (None for text)."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ValueError("response_format: must be an object")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ValueError("response_format.json_schema: is required for type json_schema")
        schema = js.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema: must be a JSON schema object")
        params = StructuredOutputsParams(json=schema)
        _validate(params, "response_format.json_schema.schema")
        return params
    raise ValueError(
        f"response_format.type: must be one of text, json_object, json_schema; got {kind!r}"
    )


def from_structured_outputs(obj: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """vLLM's `structured_outputs` request object."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ValueError("structured_outputs: must be an object")
    known = set(StructuredOutputsParams.__dataclass_fields__) - {"reasoning_end"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"structured_outputs: unknown field {unknown[0]!r}")
    try:
        params = StructuredOutputsParams(**obj)
    except TypeError as e:
        raise ValueError(f"structured_outputs: {e}") from e
    _validate(params, None)
    return params


def _validate(params: StructuredOutputsParams, field: str | None) -> None:
    try:
        validate_structured_outputs(params)
    except ValueError as e:
        if field is None:
            raise
        msg = str(e).split(": ", 1)[1] if ": " in str(e) else str(e)
        raise ValueError(f"{field}: {msg}") from e


def pick_constraint(sources: dict[str, StructuredOutputsParams | None]
                    ) -> StructuredOutputsParams | None:
    """The one constraint of a request; ValueError when more than one field sets one."""
    given = {k: v for k, v in sources.items() if v is not None}
    if len(given) > 1:
        names = " and ".join(given)
        raise ValueError(f"{next(iter(given))}: only one output constraint per request; got {names}")
    return next(iter(given.values()), None)
