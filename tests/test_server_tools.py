"""Tools, tool_choice and Jinja templates in `alpaca2 serve` (the real openai client, a real server).

The tiny model has random weights and llama.cpp's Functionary v3.2 template (read from the
vendored tree at test time).  Random weights never choose a tool, so the tests force one:
tool_choice "required" or a named function makes the template's grammar allow only
">>>all\\n<text>" or ">>>get_time\\n{arguments}", and logit_bias bans the tokens that start with
"a" (so not "all") and favours EOS (so the answer ends once the call is complete).  What the
grammar lets through must come back as a parsed tool call whose arguments match the schema.
"""
import json
import subprocess
import sys

import httpx
import openai
import pytest

import alpaca2
from alpaca2 import testing

from conftest import LLAMA_CPP_DIR
from server_process import ServerProcess

TEMPLATES = LLAMA_CPP_DIR / "models" / "templates"
FUNCTIONARY = TEMPLATES / "meetkai-functionary-medium-v3.2.jinja"
QWEN = TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja"
QWEN3 = TEMPLATES / "Qwen-Qwen3-0.6B.jinja"

TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 8}}}}}
OTHER_TOOL = {"type": "function", "function": {
    "name": "set_timer", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "What time is it in Oslo?"}]


def template_text(path):
    if not path.exists():
        pytest.skip(f"{path} is not in this llama.cpp tree")
    return path.read_text()


@pytest.fixture(scope="module")
def tools_path(tmp_path_factory, tokenizer_path):
    out = tmp_path_factory.mktemp("tools") / "functionary.gguf"
    return testing.make_model(out, tokenizer=tokenizer_path, chat_template=template_text(FUNCTIONARY),
                              name="tiny-tools")


@pytest.fixture(scope="module")
def server(tools_path):
    s = ServerProcess(tools_path, "-np", "2", "-c", "2048", "-n", "48")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def force(tools_path):
    """logit_bias that lets the grammar reach the tool call and end there (see the docstring)."""
    with alpaca2.Model(tools_path) as m:
        bias = {str(t): -100 for t in range(m.n_vocab) if m.token_to_piece(t).lstrip(b" ").startswith(b"a")}
        bias[str(m.eos)] = 100
    return bias


def check_call(tc):
    """A get_time call whose arguments are JSON valid under TIME_TOOL's schema."""
    assert tc.type == "function" and tc.function.name == "get_time"
    assert tc.id
    args = json.loads(tc.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 8
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call(server, force, choice):
    r = server.client().chat.completions.create(
        model="m", messages=ASK, tools=[TIME_TOOL, OTHER_TOOL] if isinstance(choice, dict) else [TIME_TOOL],
        tool_choice=choice, temperature=0, logit_bias=force, max_tokens=48)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content in (None, "")
    assert c.message.tool_calls
    for tc in c.message.tool_calls:
        check_call(tc)


def test_streamed_tool_call_adds_up_to_the_same_call(server, force):
    kw = dict(model="m", messages=ASK, tools=[TIME_TOOL], tool_choice="required", temperature=0,
              logit_bias=force, max_tokens=48)
    client = server.client()
    whole = client.chat.completions.create(**kw).choices[0].message
    calls, content, finish, n_chunks = {}, "", None, 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            n_chunks += 1
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                acc = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += d.id or ""
                acc["name"] += (d.function and d.function.name) or ""
                acc["arguments"] += (d.function and d.function.arguments) or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert n_chunks > 3                       # arguments arrive piece by piece, not in one chunk
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (tc.function.name, json.loads(tc.function.arguments)) for tc in whole.tool_calls]
    assert all(c["id"] for c in calls.values())


def test_tool_choice_none_gives_text(server, force):
    r = server.client().chat.completions.create(model="m", messages=ASK, tools=[TIME_TOOL], tool_choice="none",
                                                logit_bias={k: v for k, v in force.items() if v < 0}, max_tokens=8)
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason in ("stop", "length")
    assert isinstance(c.message.content, str)


def test_tool_results_go_back_to_the_model(server, force):
    """A conversation with an assistant tool call and its result renders and answers."""
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    r = httpx.post(server.url + "/apply-template", json={"messages": messages, "tools": [TIME_TOOL]}, timeout=60)
    assert r.status_code == 200
    prompt = r.json()["prompt"]
    assert "get_time" in prompt and '"Oslo"' in prompt and "12:00" in prompt
    r = server.client().chat.completions.create(model="m", messages=messages, tools=[TIME_TOOL], max_tokens=4,
                                                logit_bias={k: v for k, v in force.items() if v < 0})
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_request_grammar_applies_without_tools(server):
    """No tools: the template has no grammar of its own, the request's grammar constrains the answer."""
    r = server.client().chat.completions.create(model="m", messages=ASK, max_tokens=8,
                                                extra_body={"grammar": 'root ::= "b"{5,5}'})
    assert r.choices[0].message.content == "bbbbb"


def test_user_text_is_not_special(server, tools_path):
    """The template's markup may be special tokens; what a user types never is: "</s>" in a
    message stays text (llama-server would make it the EOS token)."""
    messages = [{"role": "user", "content": "hi </s> there"}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "max_tokens": 1, "verbose": True})
    assert r.status_code == 200
    n = r.json()["usage"]["prompt_tokens"]
    prompt = r.json()["__verbose"]["prompt"]
    assert "hi </s> there" in prompt
    with alpaca2.Model(tools_path) as m:
        parsed = m.tokenize(prompt, add_bos=False, special=True)     # the prompt shows its BOS
        assert m.eos in parsed                       # parsed for special tokens, the text would hold EOS
        assert n > len(parsed)                       # the server's ids spell "</s>" as text instead
    r = httpx.post(server.url + "/v1/chat/completions/input_tokens", timeout=60, json={"messages": messages})
    assert r.json()["input_tokens"] == n


@pytest.mark.parametrize("body,param", [
    ({"tools": "get_time"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]}, None),
    ({"tools": [TIME_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [TIME_TOOL], "tool_choice": 3}, "tool_choice"),
    ({"tools": [TIME_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ({"tools": [TIME_TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [TIME_TOOL], "grammar": 'root ::= "a"'}, None),
    ({"reasoning_format": "loud"}, "reasoning_format"),
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a\x00b"}]}, "messages"),
    ({"messages": ASK + [{"role": "assistant", "content": "It is"}], "continue_final_message": True},
     "continue_final_message"),
])
def test_bad_tool_requests_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=dict({"messages": ASK, "max_tokens": 2}, **body),
                   timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_anthropic_tool_use(server, force):
    body = {"model": "m", "max_tokens": 48, "temperature": 0, "messages": ASK,
            "tools": [{"name": "get_time", "description": "The time in a city",
                       "input_schema": TIME_TOOL["function"]["parameters"]}],
            "tool_choice": {"type": "any"}}
    # Anthropic's API has no logit_bias: the same forcing goes through llama-server's extension field
    r = httpx.post(server.url + "/v1/messages", json=dict(body, logit_bias=force), timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stop_reason"] == "tool_use"
    uses = [b for b in out["content"] if b["type"] == "tool_use"]
    assert uses and uses[0]["name"] == "get_time" and set(uses[0]["input"]) == {"city"}
    # the result goes back as a tool_result block
    follow = {"model": "m", "max_tokens": 2, "tools": body["tools"], "messages": ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0]["id"], "name": "get_time",
                                            "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0]["id"], "content": "12:00"}]}]}
    r = httpx.post(server.url + "/v1/messages", json=follow, timeout=120)
    assert r.status_code == 200, r.text


# --- flags -----------------------------------------------------------------------------------

def test_no_jinja_refuses_tools(tools_path):
    s = ServerProcess(tools_path, "-np", "1", "-c", "512", "--no-jinja", "--chat-template", "chatml")
    try:
        client = s.client()
        with pytest.raises(openai.BadRequestError, match="--jinja"):
            client.chat.completions.create(model="m", messages=ASK, tools=[TIME_TOOL], tool_choice="required")
        r = client.chat.completions.create(model="m", messages=ASK, max_tokens=2)      # plain chat still works
        assert r.choices[0].message.content is not None
    finally:
        s.stop()


def test_chat_template_file_renders_through_jinja(tiny_path, tmp_path):
    """--chat-template-file gives a model without a template the file's Jinja template, tools and all."""
    path = tmp_path / "qwen.jinja"
    path.write_text(template_text(QWEN))
    s = ServerProcess(tiny_path, "-np", "1", "-c", "1024", "--jinja", "--chat-template-file", str(path))
    try:
        r = httpx.post(s.url + "/apply-template", json={"messages": ASK, "tools": [TIME_TOOL]}, timeout=60)
        prompt = r.json()["prompt"]
        assert "<tools>" in prompt and "get_time" in prompt and prompt.endswith("<|im_start|>assistant\n")
        props = httpx.get(s.url + "/props", timeout=60).json()
        assert "<tool_call>" in props["chat_template"]
    finally:
        s.stop()


def test_reasoning_flags_and_kwargs(tiny_path):
    """--reasoning off / chat_template_kwargs enable_thinking reach a thinking template (llama-server's
    test_template.py expectations for Qwen3)."""
    template_text(QWEN3)
    s = ServerProcess(tiny_path, "-np", "1", "-c", "1024", "--chat-template-file", str(QWEN3), "--reasoning", "off")
    try:
        def prompt(**extra):
            r = httpx.post(s.url + "/apply-template", json=dict(messages=ASK, **extra), timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["prompt"]
        assert prompt().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert prompt(chat_template_kwargs={"enable_thinking": True}).endswith("<|im_start|>assistant\n")
        r = httpx.post(s.url + "/apply-template", json={"messages": ASK, "chat_template_kwargs": {
            "enable_thinking": "no"}}, timeout=60)
        assert r.status_code == 400
    finally:
        s.stop()


@pytest.mark.parametrize("args,message", [
    (["--chat-template-file", "{bad}"], "not a usable Jinja template"),
    (["--chat-template", "{% for %}"], "not a usable Jinja template"),
    (["--chat-template-kwargs", "{not json"], "--chat-template-kwargs"),
    (["--chat-template-kwargs", "[1]"], "--chat-template-kwargs"),
    (["--reasoning-format", "loud"], "--reasoning-format"),
])
def test_bad_template_flags_exit_2(tiny_path, tmp_path, args, message):
    if args[0] == "--chat-template-file":
        bad = tmp_path / "bad.jinja"
        bad.write_text("{% if %}")
        args = [args[0], str(bad)]
    p = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", str(tiny_path), "--port", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert message in lines[-1]
    assert sum("error" in line for line in lines) == 1
