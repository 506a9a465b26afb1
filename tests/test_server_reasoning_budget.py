"""The thinking budget (--reasoning-budget, reasoning_budget_tokens; alpaca2.server.reasoning_budget).

The state machine is tested with a scripted sampler; the server with a tiny f32 model that has
``<think>`` and ``</think>`` as tokens of their own and llama.cpp's QwQ template, whose generation
prompt opens the thinking block.  The oracle is the same request without a budget (greedy, so
token for token the same until the budget is spent): with budget B, the answer must be that
answer's first B - (tokens of the prompt after ``<think>``) tokens, then the message and
``</think>``, then more text.
"""
import json
import subprocess
import sys

import httpx
import pytest

import alpaca2
from alpaca2 import testing
from alpaca2.server.reasoning_budget import COUNTING, DONE, FORCING, IDLE, WAITING_UTF8, ReasoningBudget

from conftest import LLAMA_CPP_DIR
from server_process import NO_EOS, ServerProcess

QWQ = LLAMA_CPP_DIR / "models" / "templates" / "Qwen-QwQ-32B.jinja"
ASK = [{"role": "user", "content": "What time is it in Oslo?"}]
MESSAGE = "Enough thinking."


# -- the state machine -----------------------------------------------------------------------

class Scripted:
    """A sampler that samples the given tokens in turn and records what it was told."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.accepted = []

    def sample(self, ctx, idx=-1):
        return self.tokens.pop(0)

    def accept(self, tok):
        self.accepted.append(tok)


START, END, MSG = 90, 91, 92       # <think>, </think>, a one-token message


def run(budget, script, n, prefill=(), piece=None):
    sampler = Scripted(script)
    rb = ReasoningBudget(sampler, [START], [[END]], [MSG, END], budget, piece=piece, prefill=prefill)
    out = [rb.sample(None) for _ in range(n)]
    return out, rb, sampler


def test_the_budget_counts_from_the_start_tag_then_forces_the_end():
    out, rb, sampler = run(3, [1, START, 2, 3, 4, 5, 6, 7], 8)
    assert out == [1, START, 2, 3, 4, MSG, END, 5]
    assert rb.state == DONE and rb.forced_total == 2
    assert sampler.accepted == [MSG, END]            # forced tokens enter the sampler's history


def test_a_natural_end_within_the_budget_forces_nothing():
    out, rb, _ = run(5, [START, 2, END, 3, 4], 5)
    assert out == [START, 2, END, 3, 4] and rb.state == DONE and rb.forced_total == 0


def test_a_new_start_tag_rearms_the_budget():
    out, rb, _ = run(1, [START, 2, 3, START, 4, 5, 6], 9)
    assert out == [START, 2, MSG, END, 3, START, 4, MSG, END]


def test_budget_zero_and_a_prompt_that_opens_the_block():
    out, rb, _ = run(0, [5, 6, 7], 3, prefill=[10, START, 11])
    assert out == [MSG, END, 5]
    out, rb, _ = run(2, [5, 6, 7, 8], 4, prefill=[START, 11])    # the prompt's 11 spent one
    assert out == [5, MSG, END, 6]
    _, rb, _ = run(2, [], 0, prefill=[START, 11, END])            # the prompt closed it: nothing to do
    assert rb.state == DONE


def test_a_spent_budget_waits_for_a_whole_utf8_character():
    pieces = {2: b"\xe4", 3: b"\xb8\xad", 4: b"a"}
    out, rb, _ = run(1, [START, 2, 3, 4, 9], 5, piece=pieces.get)
    assert out == [START, 2, 3, 4, MSG]          # 3 ends on continuation bytes only, 4 completes
    _, rb, _ = run(1, [START, 2], 2, piece=pieces.get)
    assert rb.state == WAITING_UTF8


def test_without_a_start_tag_nothing_changes():
    out, rb, _ = run(0, [1, 2, 3], 3)
    assert out == [1, 2, 3] and rb.state == IDLE


def test_multi_token_tags_match_as_sequences():
    sampler = Scripted([1, 7, 8, 2, 3, 4, 5, 6])
    rb = ReasoningBudget(sampler, [7, 8], [[5, 6], [4]], [MSG, 5, 6], 2)
    out = [rb.sample(None) for _ in range(6)]
    assert out == [1, 7, 8, 2, 3, MSG]
    assert rb.state == FORCING
    assert [rb.sample(None) for _ in range(2)] == [5, 6] and rb.state == DONE
    rb = ReasoningBudget(Scripted([7, 8, 2, 4, 9]), [7, 8], [[5, 6], [4]], [MSG, 5, 6], 5)
    assert [rb.sample(None) for _ in range(5)] == [7, 8, 2, 4, 9] and rb.state == DONE
    assert ReasoningBudget(Scripted([]), [7, 8], [[4]], [4], 5, prefill=[7]).state == IDLE
    assert ReasoningBudget(Scripted([]), [7, 8], [[4]], [4], 5, prefill=[7, 8]).state == COUNTING


# -- the server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def think_path(tmp_path_factory, tokenizer_path):
    if not QWQ.exists():
        pytest.skip(f"{QWQ} is not in this llama.cpp tree")
    out = tmp_path_factory.mktemp("think") / "think.gguf"
    return testing.make_model(out, tokenizer=tokenizer_path, chat_template=QWQ.read_text(), name="tiny-think",
                              added_tokens=("<think>", "</think>"))


@pytest.fixture(scope="module")
def server(think_path):
    s = ServerProcess(think_path, "-np", "2", "-c", "2048", "--reasoning-budget-message", MESSAGE)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(think_path):
    with alpaca2.Model(think_path) as m:
        yield m


def chat(server, **extra):
    body = dict(messages=ASK, max_tokens=24, temperature=0, logit_bias=NO_EOS, logprobs=True,
                reasoning_format="none", **extra)
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def tokens_of(choice):
    return [e["token"] for e in choice["logprobs"]["content"]]


def opened(server, model) -> int:
    """Tokens of the prompt after <think> (the template opens the block; they count too)."""
    prompt = httpx.post(server.url + "/apply-template", json={"messages": ASK}, timeout=60).json()["prompt"]
    assert prompt.endswith("<think>\n")
    tokens = model.tokenize(prompt, add_bos=False, special=True)
    think = model.tokenize("<think>", add_bos=False, special=True)
    assert len(think) == 1
    return len(tokens) - 1 - tokens.index(think[0])


@pytest.mark.parametrize("budget", [0, 4, 7])
def test_a_request_budget_cuts_thinking_short(server, model, budget):
    free = tokens_of(chat(server))
    assert "</think>" not in "".join(free[:12])        # the model alone thinks on (so the budget shows)
    cut = tokens_of(chat(server, reasoning_budget_tokens=budget))
    k = max(0, budget - opened(server, model))
    forced = "".join(cut[k:])
    assert cut[:k] == free[:k]
    assert forced.startswith(" " + MESSAGE + "</think>") and len(forced) > len(MESSAGE) + 9


def test_the_server_budget_applies_and_a_request_overrides_it(think_path, model):
    s = ServerProcess(think_path, "-np", "1", "-c", "1024", "--reasoning-budget", "0")
    try:
        # as llama-server, the answer starts with the block the prompt opened
        text = chat(s)["message"]["content"]
        assert text.startswith("<think>\n</think>")              # no message by default
        text = chat(s, reasoning_budget_tokens=-1)["message"]["content"]   # -1: the server's budget
        assert text.startswith("<think>\n</think>")
        choice = chat(s, thinking_budget_tokens=6, reasoning_budget_message="Stop.")
        k = 6 - opened(s, model)
        assert "".join(tokens_of(choice)[k:]).startswith(" Stop.</think>")
    finally:
        s.stop()


def test_reasoning_content_and_streaming(server):
    body = dict(messages=ASK, max_tokens=24, temperature=0, logit_bias=NO_EOS, reasoning_budget_tokens=0)
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    msg = r["choices"][0]["message"]
    assert msg["reasoning_content"].strip() == MESSAGE and msg["content"]
    reasoning, content = [], []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                reasoning.append(delta.get("reasoning_content") or "")
                content.append(delta.get("content") or "")
    assert "".join(reasoning) == msg["reasoning_content"] and "".join(content) == msg["content"]


def test_anthropic_thinking_budget(server):
    body = {"model": "m", "max_tokens": 24, "temperature": 0, "messages": ASK, "logit_bias": NO_EOS,
            "thinking": {"type": "enabled", "budget_tokens": 0}}
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=120)
    assert r.status_code == 200, r.text
    blocks = r.json()["content"]
    assert blocks[0]["type"] == "thinking" and blocks[0]["thinking"].strip() == MESSAGE
    r = httpx.post(server.url + "/v1/messages", json=dict(body, thinking={"type": "enabled", "budget_tokens": "x"}),
                   timeout=120)
    assert r.status_code == 400


@pytest.mark.parametrize("field", [{"reasoning_budget_tokens": -2}, {"reasoning_budget_tokens": "5"},
                                   {"thinking_budget_tokens": 1.5}, {"reasoning_budget_message": 7}])
def test_bad_budget_fields_get_400(server, field):
    r = httpx.post(server.url + "/v1/chat/completions", json=dict(messages=ASK, max_tokens=2, **field), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(field))


@pytest.mark.parametrize("value", ["-2", "x", "2147483648"])
def test_a_bad_budget_flag_exits_2(think_path, value):
    p = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", str(think_path), "--port", "0",
                        "--reasoning-budget", value], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--reasoning-budget" in p.stderr


# -- reasoning control (reasoning_control, POST /v1/chat/completions/control) ------------------

def test_control_arms_an_unlimited_budget_that_force_ends():
    sampler = Scripted([START, 2, 3, 4, 5, 6, 7, 8])
    rb = ReasoningBudget(sampler, [START], [[END]], [MSG, END], -1)
    assert not rb.force()                                     # idle: nothing to end
    assert [rb.sample(None) for _ in range(4)] == [START, 2, 3, 4] and rb.state == COUNTING   # no limit
    assert rb.force()
    assert [rb.sample(None) for _ in range(3)] == [MSG, END, 5] and rb.state == DONE
    assert not rb.force()


def _control(server, **body):
    return httpx.post(server.url + "/v1/chat/completions/control", json=body, timeout=60)


def test_reasoning_end_stops_a_live_completion_thinking(server):
    body = dict(messages=ASK, max_tokens=900, temperature=0, logit_bias=NO_EOS, stream=True, reasoning_control=True)
    reasoning, content, answers = [], [], []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as s:
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk["choices"]:
                continue
            delta = chunk["choices"][0]["delta"]
            reasoning.append(delta.get("reasoning_content") or "")
            content.append(delta.get("content") or "")
            if len([r for r in reasoning if r]) == 3 and not answers:     # thinking: end it now
                answers.append(_control(server, id=chunk["id"], action="reasoning_end"))
    assert answers[0].status_code == 200 and answers[0].json() == {"success": True}
    assert "".join(reasoning).rstrip().endswith(MESSAGE)       # the budget's message, then </think>
    assert "".join(content).strip()                            # and the answer went on after it
    r = _control(server, id=chunk["id"], action="reasoning_end")                   # it has ended
    assert r.json() == {"success": False, "message": "no active completion for this id"}


def test_control_without_reasoning_control_or_bad_fields(server):
    body = dict(messages=ASK, max_tokens=900, temperature=0, logit_bias=NO_EOS, stream=True)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                cmpl_id = json.loads(line[6:])["id"]
                r = _control(server, id=cmpl_id, action="reasoning_end")
                assert r.json() == {"success": False, "message": "reasoning control not enabled for this completion"}
                break
    assert _control(server, action="reasoning_end").status_code == 400
    assert _control(server, id="chatcmpl-x", action="stop").status_code == 400
    r = httpx.post(server.url + "/v1/chat/completions", json=dict(messages=ASK, reasoning_control="yes"), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_control"
