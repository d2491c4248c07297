"""Every tool and reasoning parser on recorded outputs in its model's format, whole and
streamed in random fragment sizes: the streamed deltas assemble into the whole answer."""

from __future__ import annotations

import json
import random

import pytest

from pagedllm.entrypoints.openai.chat_output import ChoiceOutput
from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedllm.entrypoints.openai.tool_choice import NamedToolParser, RequiredToolParser
from pagedllm.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ToolParser,
    get_tool_parser,
    load_tool_parser_plugin,
)

WEATHER_ARGS = '{"city": "Paris, FR", "unit": "celsius"}'

# (parser, recorded output, expected content, expected [(name, arguments as objects)])
TOOL_CASES = [
    ("hermes",  # Qwen2.5 / Qwen3 / Hermes-2-Pro
     'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + WEATHER_ARGS
     + '}\n</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
     "Let me check.\n", [("get_weather", json.loads(WEATHER_ARGS)), ("ping", {})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and "
     "<tool is not a tag.", []),
    ("llama3_json",  # Llama 3.1 / 3.2 JSON
     '{"name": "get_weather", "parameters": ' + WEATHER_ARGS + '}; {"name": "ping", '
     '"parameters": {}}', None, [("get_weather", json.loads(WEATHER_ARGS)), ("ping", {})]),
    ("llama3_json", '<|python_tag|>{"name": "ping", "parameters": {}}', None, [("ping", {})]),
    ("llama3_json", "The weather is fine {mostly}.", "The weather is fine {mostly}.", []),
    ("mistral",  # Mistral-7B-Instruct-v0.3 (special tokens kept)
     '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + WEATHER_ARGS + '}, {"name": '
     '"ping", "arguments": {}}]', None, [("get_weather", json.loads(WEATHER_ARGS)),
                                          ("ping", {})]),
    ("mistral",  # Mistral-Small-3.2 / Magistral: name[ARGS]{...}
     'Sure.[TOOL_CALLS]get_weather[ARGS]' + WEATHER_ARGS, "Sure.",
     [("get_weather", json.loads(WEATHER_ARGS))]),
    ("pythonic",  # Llama 3.2 / Llama 4 pythonic
     '[get_weather(city="Paris, FR", unit="celsius"), ping()]', None,
     [("get_weather", json.loads(WEATHER_ARGS)), ("ping", {})]),
    ("pythonic", "<|python_start|>[ping()]<|python_end|>", None, [("ping", {})]),
    ("pythonic", "Paris is sunny [citation needed].", "Paris is sunny [citation needed].", []),
]


def _fragments(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i:i + n])
        i += n
    return out


def _stream(make, text: str, seed: int) -> tuple[str, str, list[dict]]:
    """(content, reasoning, calls) assembled from deltas; checks OpenAI's delta shape."""
    parsed = make()
    content, reasoning, calls = "", "", {}
    frags = _fragments(text, random.Random(seed))
    for k, frag in enumerate(frags):
        delta = parsed.delta(frag, k == len(frags) - 1) or {}
        content += delta.get("content", "")
        reasoning += delta.get("reasoning", "")
        assert delta.get("reasoning") == delta.get("reasoning_content")
        for tc in delta.get("tool_calls", []):
            if tc["index"] not in calls:
                assert tc["type"] == "function" and tc["id"] and tc["function"]["name"]
                assert tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, reasoning, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("name,text,content,expected", TOOL_CASES)
def test_tool_parser_whole_and_streamed(name, text, content, expected):
    cls = get_tool_parser(name)

    def make() -> ChoiceOutput:
        return ChoiceOutput(None, cls())

    msg, has_calls = make().message(text)
    assert has_calls == bool(expected)
    assert msg["content"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
           for c in msg["tool_calls"]]
    assert got == expected
    for seed in range(8):
        s_content, _, s_calls = _stream(make, text, seed)
        assert s_content == (content or "")
        assert [(c["name"], c["arguments"]) for c in s_calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]


def test_parallel_tool_calls_false_keeps_the_first():
    text = TOOL_CASES[0][1]
    msg, _ = ChoiceOutput(None, get_tool_parser("hermes")(), parallel=False).message(text)
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    _, _, calls = _stream(lambda: ChoiceOutput(None, get_tool_parser("hermes")(), False), text, 1)
    assert [c["name"] for c in calls] == ["get_weather"]


def test_constrained_tool_forms_stream_exactly():
    required = '[{"name":"get_weather","parameters":{"city":"Oslo","unit":"celsius"}},' \
               '{"name":"ping","parameters":{}}]'
    msg, _ = ChoiceOutput(None, RequiredToolParser()).message(required)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("get_weather", '{"city":"Oslo","unit":"celsius"}'), ("ping", "{}")]
    for seed in range(5):
        _, _, calls = _stream(lambda: ChoiceOutput(None, RequiredToolParser()), required, seed)
        assert [(c["name"], c["arguments"]) for c in calls] == [
            ("get_weather", '{"city":"Oslo","unit":"celsius"}'), ("ping", "{}")]
        _, _, calls = _stream(lambda: ChoiceOutput(None, NamedToolParser("ping")), "{}", seed)
        assert calls == [{"name": "ping", "arguments": "{}"}]


REASONING_CASES = [
    # DeepSeek-R1: the template opens <think> in the prompt.
    ("deepseek_r1", None, "The user wants 2+2. That is 4.\n</think>\n\nThe answer is 4.",
     "The user wants 2+2. That is 4.\n", "The answer is 4."),
    ("deepseek_r1", None, "<think>Hmm, cut off before the end", "Hmm, cut off before the end", ""),
    ("qwen3", None, "<think>\nCount the r's: three.\n</think>\n\nThere are 3.",
     "\nCount the r's: three.\n", "There are 3."),
    ("qwen3", None, "Just an answer with < and </thin.", "", "Just an answer with < and </thin."),
    ("qwen3", {"enable_thinking": False}, "<think>literal</think> text", "",
     "<think>literal</think> text"),
]


@pytest.mark.parametrize("name,kwargs,text,reasoning,content", REASONING_CASES)
def test_reasoning_parser_whole_and_streamed(name, kwargs, text, reasoning, content):
    cls = get_reasoning_parser(name)

    def make() -> ChoiceOutput:
        return ChoiceOutput(cls(kwargs), None)

    msg, _ = make().message(text)
    assert msg["reasoning"] == (reasoning or None) == msg["reasoning_content"]
    assert msg["content"] == content
    for seed in range(8):
        s_content, s_reasoning, _ = _stream(make, text, seed)
        assert (s_reasoning, s_content) == (reasoning, content)


def test_reasoning_then_tool_call():
    text = "<think>Need the weather.</think>\n\n<tool_call>\n{\"name\": \"ping\", " \
           "\"arguments\": {}}\n</tool_call>"

    def make() -> ChoiceOutput:
        return ChoiceOutput(get_reasoning_parser("qwen3")(), get_tool_parser("hermes")())

    msg, has_calls = make().message(text)
    assert has_calls and msg["reasoning"] == "Need the weather." and msg["content"] is None
    for seed in range(5):
        content, reasoning, calls = _stream(make, text, seed)
        assert reasoning == "Need the weather." and content == ""
        assert calls == [{"name": "ping", "arguments": "{}"}]


def test_tool_parser_plugin(tmp_path):
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from pagedllm.entrypoints.openai.tool_parsers import ToolParser, ParsedToolCall, "
        "register_tool_parser\n\n"
        "@register_tool_parser('shout')\n"
        "class Shout(ToolParser):\n"
        "    def parse(self, text, final):\n"
        "        if text.startswith('CALL '):\n"
        "            return '', [ParsedToolCall(text[5:].strip(), '{}', final)]\n"
        "        return text, []\n")
    load_tool_parser_plugin(str(plugin))
    assert issubclass(TOOL_PARSERS["shout"], ToolParser)
    msg, has_calls = ChoiceOutput(None, get_tool_parser("shout")()).message("CALL ping")
    assert has_calls and msg["tool_calls"][0]["function"]["name"] == "ping"
    with pytest.raises(ValueError, match="unknown"):
        get_tool_parser("no_such_parser")


QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for tc in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}'
    "\n</tool_call>{% for k, v in tc.function.arguments.items() %}[{{ k }}={{ v }}]"
    "{% endfor %}{% endfor %}{% elif m.role == 'tool' %}<tool_response>\n{{ m.content }}"
    "\n</tool_response>{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
)


def test_tool_history_renders_through_the_chat_template():
    from pagedllm.entrypoints.chat_utils import render_chat
    from pagedllm.tokenizer import get_tokenizer
    from tests.engine.conftest import smollm2_path

    tok = get_tokenizer(smollm2_path())
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    text = render_chat(tok, msgs, QWEN_LIKE_TEMPLATE, add_generation_prompt=False, tools=tools)
    # Arguments reach the template as an object (it iterates them), the tool result renders.
    assert '"arguments": {"city": "Paris"}' in text and "[city=Paris]" in text
    assert "<tool_response>\n21 C\n</tool_response>" in text and "TOOLS:get_weather;" in text
    assert "TOOLS" not in render_chat(tok, msgs, QWEN_LIKE_TEMPLATE, False, tools=None)


def test_tool_choice_resolution_and_schema():
    from pagedllm.entrypoints.openai.tool_choice import (
        resolve_tool_choice,
        tool_constraint,
        tools_for_template,
    )

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "g"}}]
    none = resolve_tool_choice(tools, "none", None, auto_enabled=False)
    assert tools_for_template(tools, none, exclude_when_none=True) is None
    assert tools_for_template(tools, none, exclude_when_none=False) == tools
    assert tool_constraint(tools, none) is None
    # tools without tool_choice means "auto" (as vLLM), which needs the server flags.
    with pytest.raises(ValueError, match="--enable-auto-tool-choice"):
        resolve_tool_choice(tools, None, None, auto_enabled=False)
    assert resolve_tool_choice(tools, None, None, auto_enabled=True).mode == "auto"
    req = resolve_tool_choice(tools, "required", False, auto_enabled=False)
    schema = tool_constraint(tools, req).json
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["f"], ["g"]]
    named = resolve_tool_choice(tools, {"type": "function", "function": {"name": "g"}}, None,
                                auto_enabled=False)
    assert tool_constraint(tools, named).json == {"type": "object", "properties": {}}
    with pytest.raises(ValueError, match="tools\\[0\\]"):
        resolve_tool_choice([{"type": "function"}], "required", None, auto_enabled=False)
