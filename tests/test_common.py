"""alpaca2._common: llama.cpp's common library (JSON schema -> GBNF, chat templates, tool-call parsing).

Oracles: the tiny model sampling under the grammar (its output must validate under the schema),
llama.cpp's own test expectations (tests/test-chat.cpp) for the tool-call formats, and llama-server's
/apply-template for the rendered prompts when the build has the oracles (ALPACA2_BUILD_TOOLS).
The templates are read from the vendored llama.cpp tree at test time, never copied here.
"""
import contextlib
import json
import os
import socket
import subprocess
import time

import pytest

import alpaca2
from alpaca2 import ChatFormatter, json_schema_to_grammar
from alpaca2._common import ChatParseError, ChatStream, ChatTemplateError, chat_msg_diff

from conftest import LLAMA_CPP_DIR, run_python

TEMPLATES = LLAMA_CPP_DIR / "models" / "templates"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": -3, "maximum": 40},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "n", "ok", "color"],
    "additionalProperties": False,
}

# llama.cpp's tests/test-chat.cpp special_function_tool
SPECIAL_TOOL = {"type": "function", "function": {
    "name": "special_function", "description": "I'm special",
    "parameters": {"type": "object", "properties": {"arg1": {"type": "integer", "description": "The arg."}},
                   "required": ["arg1"]}}}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "Hey there!"}]


def template(name):
    path = TEMPLATES / name
    if not path.exists():
        pytest.skip(f"{path} is not in this llama.cpp tree")
    return path.read_text()


def check_schema(doc):
    """The document is valid under SCHEMA (checked by hand: no jsonschema dependency)."""
    assert isinstance(doc, dict)
    assert set(doc) <= set(SCHEMA["properties"]) and {"name", "n", "ok", "color"} <= set(doc)
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 5
    assert type(doc["n"]) is int and -3 <= doc["n"] <= 40
    assert type(doc["ok"]) is bool
    assert doc["color"] in ("red", "green", "blue")
    if "tags" in doc:
        assert isinstance(doc["tags"], list) and len(doc["tags"]) <= 2
        assert all(isinstance(t, str) and len(t) <= 3 for t in doc["tags"])


def generate(model, sampler, prompt, n_max=600):
    ctx = alpaca2.Context(model, n_ctx=1024, n_batch=64, n_threads=2)
    try:
        ctx.decode(model.tokenize(prompt) if isinstance(prompt, str) else prompt)
        out = []
        for _ in range(n_max):
            tok = sampler.sample(ctx)
            if model.token_is_eog(tok):
                return model.detokenize(out), True
            out.append(tok)
            ctx.decode([tok])
        return model.detokenize(out), False
    finally:
        ctx.close()


# --- json_schema_to_grammar ------------------------------------------------------------------

def test_schema_grammar_is_gbnf():
    g = json_schema_to_grammar(SCHEMA)
    assert "root ::=" in g
    assert '"\\"red\\""' in g                          # the enum's literals
    assert json_schema_to_grammar(json.dumps(SCHEMA)) == g


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_schema_grammar_constrains_sampling(model, seed):
    sampler = alpaca2.Sampler(grammar=json_schema_to_grammar(SCHEMA), model=model, temp=1.5, top_k=0,
                              top_p=1.0, min_p=0.0, seed=seed)
    text, finished = generate(model, sampler, "Answer in JSON:")
    assert finished, f"the grammar never completed: {text!r}"
    check_schema(json.loads(text))


def test_unconstrained_sampling_is_not_json(model):
    # the check above can fail: the same model without the grammar writes no valid document
    sampler = alpaca2.Sampler(model=model, temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    text, _ = generate(model, sampler, "Answer in JSON:", n_max=60)
    with pytest.raises(ValueError):
        check_schema(json.loads(text))


def test_empty_schema_means_any_object():
    assert json_schema_to_grammar({}) == json_schema_to_grammar({"type": "object"})


@pytest.mark.parametrize("schema", [
    '{"type": "object", ',                                   # not JSON
    {"$ref": "#/definitions/missing"},                        # dangling reference
    {"type": "string", "pattern": "^(unclosed$"},             # bad regex (unanchored ones become any string)
    {"type": "object", "properties": {"a": {"$ref": "https://example.com/remote.json"}}},
])
def test_invalid_schema_raises(schema):
    with pytest.raises(alpaca2.GrammarError):
        json_schema_to_grammar(schema)


def test_schema_type_errors():
    with pytest.raises(TypeError):
        json_schema_to_grammar(42)
    with pytest.raises(TypeError):
        json_schema_to_grammar({"x": object()})


# --- ChatFormatter.apply ---------------------------------------------------------------------

def test_needs_model_or_template():
    with pytest.raises(ValueError):
        ChatFormatter()
    with pytest.raises(TypeError):
        ChatFormatter("not a model")


@pytest.mark.parametrize("source", ["{% if %}", "{{ messages[0].content ", "{% for m in messages %}"])
def test_bad_template_raises(source):
    with pytest.raises(ChatTemplateError):
        ChatFormatter(template=source)


def test_template_that_fails_to_render_raises():
    source = ("{% for m in messages %}{% if 'boom' in m.content %}{{ raise_exception('no booms here') }}"
              "{% endif %}{{ m.content }}{% endfor %}")
    fmt = ChatFormatter(template=source)
    assert fmt.apply(USER)["prompt"] == "Hey there!"
    with pytest.raises(ChatTemplateError, match="no booms here"):
        fmt.apply([{"role": "user", "content": "boom"}])
    # one that fails for every conversation fails at once, as llama-server does at start-up
    with pytest.raises(ChatTemplateError, match="always"):
        ChatFormatter(template="{{ raise_exception('always') }}")


@pytest.mark.parametrize("name,marker", [
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "<tools>"),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "<tools>"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", '"name": "special_function"'),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "[AVAILABLE_TOOLS]"),
])
def test_tools_are_rendered(name, marker):
    fmt = ChatFormatter(template=template(name))
    assert fmt.caps["supports_tools"]
    plain = fmt.apply(USER)
    with_tools = fmt.apply(USER, tools=[SPECIAL_TOOL])
    assert "special_function" not in plain["prompt"]
    assert "special_function" in with_tools["prompt"] and marker in with_tools["prompt"]
    assert "Hey there!" in with_tools["prompt"]
    assert with_tools["parser_state"]["parse_tool_calls"]
    if marker != '"name": "special_function"':
        # tool_choice=auto: a lazy grammar, started by the template's trigger (Llama 3.x has none: free text)
        assert with_tools["grammar"] and with_tools["grammar_lazy"] and with_tools["grammar_triggers"]
    # tool_choice=none: no grammar, no tool-call parsing
    none = fmt.apply(USER, tools=[SPECIAL_TOOL], tool_choice="none")
    assert not none["grammar"] and not none["parser_state"]["parse_tool_calls"]


def test_required_tool_choice_is_not_lazy():
    fmt = ChatFormatter(template=template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja"))
    res = fmt.apply(USER, tools=[SPECIAL_TOOL], tool_choice="required")
    assert res["grammar"] and not res["grammar_lazy"]


def test_named_tool_choice_keeps_that_tool():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    res = fmt.apply(USER, tools=[SPECIAL_TOOL, WEATHER_TOOL],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert "get_weather" in res["prompt"] and "special_function" not in res["prompt"]
    assert not res["grammar_lazy"]
    with pytest.raises(ValueError, match="not in tools"):
        fmt.apply(USER, tools=[SPECIAL_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})


def test_tool_calls_and_results_are_rendered():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "special_function", "arguments": '{"arg1": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "result: 7"},
    ]
    prompt = fmt.apply(messages, tools=[SPECIAL_TOOL])["prompt"]
    assert '{"name": "special_function", "arguments": {"arg1": 1}}' in prompt
    assert "<tool_response>\nresult: 7\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kwargs,error", [
    ({"tools": [{"type": "function"}]}, ValueError),                       # no function
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, ValueError),
    ({"tools": {"not": "a list"}}, ValueError),
    ({"tools": [SPECIAL_TOOL], "tool_choice": "sometimes"}, ValueError),
    ({"tools": [SPECIAL_TOOL], "grammar": 'root ::= "a"'}, ValueError),   # llama-server: not both
    ({"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, ValueError),
    ({"json_schema": {"$ref": "#/nowhere"}}, alpaca2.GrammarError),
    ({"reasoning_format": "loud"}, ValueError),
    ({"tool_choice": 3}, TypeError),
])
def test_bad_requests_raise(kwargs, error):
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    with pytest.raises(error):
        fmt.apply(USER, **kwargs)


@pytest.mark.parametrize("messages", [
    [{"role": "user"}],                                                     # no content
    [{"role": "assistant"}],                                                # neither content nor tool_calls
    ["hello"],
    USER + [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
    USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
])
def test_bad_messages_raise(messages):
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    with pytest.raises(ValueError):
        fmt.apply(messages)


def test_json_schema_in_apply_gives_a_grammar():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    res = fmt.apply(USER, json_schema=SCHEMA)
    assert res["grammar"] and not res["grammar_lazy"]


def test_nul_and_special_text_reach_the_prompt():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    text = "a\x00b </s><s>[INST] <|im_end|> c"
    prompt = fmt.apply([{"role": "user", "content": text}])["prompt"]
    assert text in prompt


# --- parse: the tool-call formats (expectations from llama.cpp's tests/test-chat.cpp) ---------

def call(name, arguments, id=None):
    tc = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if id is not None:
        tc["id"] = id
    return tc


@pytest.mark.parametrize("name,output", [
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
     '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>'),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
     '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'),
    ("Qwen-Qwen2.5-7B-Instruct.jinja",
     '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'),
    ("meetkai-functionary-medium-v3.1.jinja", '<function=special_function>{"arg1": 1}</function>'),
])
def test_parse_tool_call(name, output):
    fmt = ChatFormatter(template=template(name))
    state = fmt.apply(USER, tools=[SPECIAL_TOOL])
    msg = fmt.parse(output, state=state)
    assert msg["role"] == "assistant" and msg["content"] in ("", None)
    [tc] = msg["tool_calls"]
    assert tc["type"] == "function" and tc["function"]["name"] == "special_function"
    assert json.loads(tc["function"]["arguments"]) == {"arg1": 1}
    assert isinstance(tc["id"], str) and len(tc["id"]) == 32          # llama-server's random ids


def test_parse_mistral_nemo_keeps_the_model_id():
    fmt = ChatFormatter(template=template("mistralai-Mistral-Nemo-Instruct-2407.jinja"))
    state = fmt.apply(USER, tools=[SPECIAL_TOOL])
    msg = fmt.parse('[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]',
                    state=state)
    assert msg["tool_calls"] == [{"type": "function", "id": "123456789",
                                  "function": {"name": "special_function", "arguments": '{"arg1": 1}'}}]


def test_parse_content_and_tool_call():
    fmt = ChatFormatter(template=template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja"))
    state = fmt.apply(USER, tools=[SPECIAL_TOOL])
    msg = fmt.parse('Hello, world!\nWhat\'s up?<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}'
                    '</tool_call>', state=state)
    assert msg["content"] == "Hello, world!\nWhat's up?"
    assert [tc["function"]["name"] for tc in msg["tool_calls"]] == ["special_function"]


def test_parse_parallel_tool_calls():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    state = fmt.apply(USER, tools=[SPECIAL_TOOL, WEATHER_TOOL], parallel_tool_calls=True)
    msg = fmt.parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 2}}\n</tool_call>', state=state)
    assert [(tc["function"]["name"], json.loads(tc["function"]["arguments"])) for tc in msg["tool_calls"]] == [
        ("get_weather", {"city": "Paris"}), ("special_function", {"arg1": 2})]
    assert len({tc["id"] for tc in msg["tool_calls"]}) == 2


def test_parse_plain_content_and_reasoning():
    fmt = ChatFormatter(template=template("Qwen-Qwen3-0.6B.jinja"))
    state = fmt.apply(USER)
    msg = fmt.parse("<think>I'm\nthinking</think>Hello, world!\nWhat's up?", state=state)
    assert msg["reasoning_content"] == "I'm\nthinking"
    assert msg["content"] == "Hello, world!\nWhat's up?"
    assert "tool_calls" not in msg
    off = fmt.apply(USER, reasoning_format="none")
    assert fmt.parse("<think>I'm\nthinking</think>Hello", state=off)["content"] == "<think>I'm\nthinking</think>Hello"


def test_parse_without_tools_leaves_tool_markup_as_content():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    state = fmt.apply(USER)
    text = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
    assert fmt.parse(text, state=state) == {"role": "assistant", "content": text}


def test_parse_broken_tool_call_raises():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    state = fmt.apply(USER, tools=[SPECIAL_TOOL], tool_choice="required")
    with pytest.raises(ChatParseError):
        fmt.parse('<tool_call>\n{"name": "special_function", "arguments": {"arg1": </tool_call>', state=state)


def test_parse_needs_a_state():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    with pytest.raises(TypeError):
        fmt.parse("hi", state="nope")
    with pytest.raises(ValueError):
        fmt.parse("hi", state={"parser_state": {"format": 999}})
    with pytest.raises(ValueError):
        fmt.parse("hi", state={"parser_state": {"format": 1, "parser": "garbage"}})


# --- streaming -------------------------------------------------------------------------------

TOOL_OUTPUT = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def stream_deltas(fmt, state, text, step):
    stream = fmt.stream(state)
    deltas = []
    for i in range(0, len(text), step):
        deltas += stream.update(text[i:i + step])
    deltas += stream.finish()
    return stream, deltas


def merge(deltas):
    """An OpenAI client's accumulation of streamed deltas into one message."""
    msg = {"content": "", "tool_calls": []}
    for d in deltas:
        msg["content"] += d.get("content", "")
        for tc in d.get("tool_calls", []):
            while len(msg["tool_calls"]) <= tc["index"]:
                msg["tool_calls"].append({"id": "", "name": "", "arguments": ""})
            acc = msg["tool_calls"][tc["index"]]
            acc["id"] += tc.get("id", "")
            acc["name"] += tc.get("function", {}).get("name", "")
            acc["arguments"] += tc.get("function", {}).get("arguments", "")
    return msg


@pytest.mark.parametrize("step", [1, 3, 17])
def test_streamed_deltas_add_up_to_the_message(step):
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    state = fmt.apply(USER, tools=[WEATHER_TOOL])
    stream, deltas = stream_deltas(fmt, state, TOOL_OUTPUT, step)
    final = fmt.parse(TOOL_OUTPUT, state=state)
    merged = merge(deltas)
    assert merged["content"] == final["content"] == "Let me check."
    [tc] = merged["tool_calls"]
    assert (tc["name"], json.loads(tc["arguments"])) == ("get_weather", {"city": "Paris"})
    assert tc["id"] == stream.message["tool_calls"][0]["id"]             # one id for the whole stream
    # no delta ever carries the tool-call markup as content
    assert all("<tool_call>" not in d.get("content", "") for d in deltas)


def test_partial_parse_of_unfinished_tool_call():
    fmt = ChatFormatter(template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    state = fmt.apply(USER, tools=[WEATHER_TOOL])
    partial = fmt.parse('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
                        is_partial=True, state=state)
    assert partial["content"] == "Let me check."
    for tc in partial.get("tool_calls", []):
        assert tc["function"]["name"] == "get_weather"


def test_chat_msg_diff():
    prev = {"role": "assistant", "content": "Hel"}
    new = {"role": "assistant", "content": "Hello", "tool_calls": [call("f", '{"a"', id="x")]}
    assert chat_msg_diff(prev, new) == [
        {"content": "lo"},
        {"tool_calls": [{"index": 0, "id": "x", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]},
    ]
    newer = dict(new, tool_calls=[call("f", '{"a": 1}', id="x")])
    assert chat_msg_diff(new, newer) == [{"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    with pytest.raises(ValueError, match="less tool calls"):
        chat_msg_diff(newer, prev)                    # tool calls never go away


# --- with a model: BOS/EOS, token ids, lifetime ----------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_formatter_with_model(model):
    fmt = ChatFormatter(model, template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    assert fmt.model is model
    res = fmt.apply(USER, tools=[WEATHER_TOOL], tool_choice="required")
    # the generation prompt's tokens, less SentencePiece's leading space (common/sampling.cpp's prefill)
    ids = list(model.tokenize(res["generation_prompt"], add_bos=False, special=True))
    assert model.token_to_piece(ids[0]) == b" "
    assert res["grammar_prefill_tokens"] == ids[1:]
    # the tiny vocabulary has no <tool_call> token: the trigger word stays a pattern
    lazy = fmt.apply(USER, tools=[WEATHER_TOOL])
    assert lazy["grammar_lazy"] and lazy["lazy_patterns"] == ["<tool_call>\n"] and lazy["lazy_tokens"] == []
    assert lazy["preserved_tokens"] == ["<tool_call>", "</tool_call>"] and lazy["preserved_token_ids"] == []


SHORT_CITY_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                                          "properties": {"city": {"type": "string", "maxLength": 6}}}}}


@pytest.mark.parametrize("seed", [1, 2])
def test_required_tool_call_end_to_end(model, seed):
    # apply -> grammar (prefilled) -> real sampling on the tiny model -> parse: always a valid call
    fmt = ChatFormatter(model, template=template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    res = fmt.apply(USER, tools=[SHORT_CITY_TOOL], tool_choice="required", parallel_tool_calls=False, tokenize=True)
    sampler = alpaca2.Sampler(grammar=res["grammar"], model=model, temp=1.5, top_k=0, top_p=1.0, min_p=0.0,
                              seed=seed)
    for tok in res["grammar_prefill_tokens"]:
        sampler.accept(tok)
    # the format lets free text come first (until "<tool_call>"): a random model might never stop, so the
    # call is opened by hand, through the grammar, and the model writes the rest under it
    opening = list(model.tokenize("<tool_call>\n", add_bos=False, special=True))
    for tok in opening:
        sampler.accept(tok)
    text, finished = generate(model, sampler, res["prompt_tokens"] + opening)
    assert finished, text
    msg = fmt.parse(model.detokenize(opening) + text, state=res)
    [tc] = msg["tool_calls"]
    assert tc["function"]["name"] == "get_weather"
    args = json.loads(tc["function"]["arguments"])
    assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 6


def test_model_default_template_is_chatml(model):
    fmt = ChatFormatter(model)
    assert "<|im_start|>" in fmt.source
    assert fmt.apply(USER)["prompt"] == "<|im_start|>user\nHey there!<|im_end|>\n<|im_start|>assistant\n"


def test_formatter_closes_with_its_model(tiny_path):
    m = alpaca2.Model(tiny_path)
    fmt = ChatFormatter(m, template=CHATML)
    m.close()
    assert fmt.closed
    with pytest.raises(alpaca2.ClosedError):
        fmt.apply(USER)


def test_formatter_outlives_dropped_references(tiny_path):
    r = run_python(f"""
import gc, alpaca2
fmt = alpaca2.ChatFormatter(alpaca2.Model({str(tiny_path)!r}))
gc.collect()
print(fmt.apply([{{"role": "user", "content": "hi"}}])["prompt"].count("hi"))
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


# --- llama-server as the oracle (built with ALPACA2_BUILD_TOOLS=1, or LLAMA_SERVER_BIN_PATH) ---

def llama_server_bin():
    from alpaca2 import _build_info
    path = os.environ.get("LLAMA_SERVER_BIN_PATH") or (
        os.path.join(_build_info.TOOLS_DIR, "llama-server") if _build_info.TOOLS_DIR else "")
    if not path or not os.path.exists(path):
        pytest.skip("no llama-server binary (build with ALPACA2_BUILD_TOOLS=1 or set LLAMA_SERVER_BIN_PATH)")
    return path


@contextlib.contextmanager
def llama_server(model_path, template_path):
    httpx = pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([llama_server_bin(), "-m", str(model_path), "--jinja", "--chat-template-file",
                             str(template_path), "--host", "127.0.0.1", "--port", str(port), "-c", "1024",
                             "-np", "1", "-t", "2", "--verbosity", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        for _ in range(600):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "llama-server exited"
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)


ORACLE_TEMPLATES = ["NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja",
                    "mistralai-Mistral-Nemo-Instruct-2407.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja"]
ORACLE_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris? </s><s>[INST] \x00 ok"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny, 21C"},
    {"role": "user", "content": "And in Rome?"},
]


@pytest.mark.parametrize("name", ORACLE_TEMPLATES)
def test_prompt_and_tool_call_equal_llama_server(model, tiny_path, name):
    path = TEMPLATES / name
    if not path.exists():
        pytest.skip(f"{path} is not in this llama.cpp tree")
    fmt = ChatFormatter(model, template=path.read_text())
    request = {"messages": ORACLE_MESSAGES, "tools": [WEATHER_TOOL]}
    with llama_server(tiny_path, path) as client:
        r = client.post("/apply-template", json=request)
        assert r.status_code == 200, r.text
        assert fmt.apply(ORACLE_MESSAGES, tools=[WEATHER_TOOL])["prompt"] == r.json()["prompt"]
        # a forced tool call: the tiny model's text under llama-server's grammar, and its parse
        body = dict(request, tool_choice="required", temperature=0, max_tokens=300, seed=1)
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        raw = data["__verbose"]["content"]
        expected = data["choices"][0]["message"]
    state = fmt.apply(ORACLE_MESSAGES, tools=[WEATHER_TOOL], tool_choice="required")
    got = fmt.parse(raw, state=state)
    assert got["tool_calls"] and expected["tool_calls"]
    for tc in got["tool_calls"] + expected["tool_calls"]:
        tc.pop("id", None)                                   # random on both sides
    assert got == expected


# --- the core's lazy grammar stage (tool_choice=auto) ----------------------------------------

def test_grammar_lazy_starts_at_its_trigger_token(model):
    np = pytest.importorskip("numpy")
    [trigger] = model.tokenize("a", add_bos=False)            # " a" (SentencePiece's leading space)
    digits = {t for t in range(model.n_vocab) if model.token_to_piece(t) in [str(d).encode() for d in range(10)]}
    assert digits
    chain = alpaca2.SamplerChain().add("grammar_lazy", model, 'root ::= " a" [0-9] [0-9] [0-9] [0-9]',
                                       tokens=[trigger]).add("dist", seed=3)
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    logits[trigger] = -np.inf
    free = [chain.sample_logits(logits) for _ in range(20)]
    assert not set(free) <= digits                         # before the trigger: anything
    chain.accept(trigger)
    constrained = [chain.sample_logits(logits) for _ in range(4)]
    assert set(constrained) <= digits                      # after it: the grammar


def test_grammar_lazy_pattern_and_errors(model):
    with pytest.raises(ValueError, match="trigger"):
        alpaca2.SamplerChain().add("grammar_lazy", model, 'root ::= "a"')
    with pytest.raises(alpaca2.GrammarError):
        alpaca2.SamplerChain().add("grammar_lazy", model, 'root ::= "a"', patterns=["(unclosed"])
    with pytest.raises(alpaca2.GrammarError):
        alpaca2.SamplerChain().add("grammar_lazy", model, "root ::= (", patterns=["x"])
    with pytest.raises(alpaca2.TokenizeError):
        alpaca2.SamplerChain().add("grammar_lazy", model, 'root ::= "a"', tokens=[10 ** 6])


# --- user text is never parsed for special tokens --------------------------------------------

def test_prompt_tokens_keep_user_text_plain(model):
    fmt = ChatFormatter(model, template=CHATML)
    text = "hi </s><s>[INST] there"
    res = fmt.apply([{"role": "system", "content": "be nice"}, {"role": "user", "content": text}], tokenize=True)
    ids = res["prompt_tokens"]
    # llama-server tokenizes the whole prompt with special parsing: the user's "</s>" becomes EOS
    assert model.eos in list(model.tokenize(res["prompt"], add_bos=True, special=True))
    # ours: the markup is parsed, the user's text is not
    assert model.eos not in ids and model.bos not in ids[1:]
    plain = list(model.tokenize(text, add_bos=False, special=False))
    assert any(ids[i:i + len(plain)] == plain for i in range(len(ids)))
    assert model.detokenize(ids).endswith(res["prompt"][-20:])


def test_prompt_tokens_without_special_text_are_llama_servers(model):
    fmt = ChatFormatter(model, template=CHATML)
    res = fmt.apply(USER, tokenize=True)
    assert res["prompt_tokens"] == list(model.tokenize(res["prompt"], add_bos=True, special=True))
    with pytest.raises(ValueError, match="model"):
        ChatFormatter(template=CHATML).apply(USER, tokenize=True)
