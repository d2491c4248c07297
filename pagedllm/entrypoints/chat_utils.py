"""Rendering chat conversations with the model's chat template (jinja2 sandbox via transformers)."""

from __future__ import annotations

import json
from typing import Any


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Text-part lists (`[{"type": "text", "text": ...}]`) become plain strings."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError("each message needs a 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, str):
                    parts.append(p)
                elif isinstance(p, dict) and p.get("type") in ("text", "input_text"):
                    parts.append(p.get("text", ""))
                else:
                    kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                    raise ValueError(f"unsupported content part type {kind!r}: only text is supported")
            content = "\n".join(parts)
        msg = dict(m)
        msg["content"] = "" if content is None else content
        if msg.get("tool_calls"):
            msg["tool_calls"] = [_template_tool_call(c) for c in msg["tool_calls"]]
        out.append(msg)
    return out


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """Templates index into a call's arguments, so its JSON string becomes the object."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}}


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "this model has no chat template; pass chat_template (or --chat-template for the server)"
        )
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("tokenize", "conversation", "messages", "chat_template"):
        kwargs.pop(reserved, None)
    return tokenizer.apply_chat_template(
        normalize_messages(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=tools,
        **kwargs,
    )
