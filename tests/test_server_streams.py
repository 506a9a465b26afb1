"""Resumable streams (alpaca2.server.streams, llama-server's X-Conversation-Id and /v1/stream).

The bookkeeping (caps, expiry, replacement) is tested on the classes directly; the HTTP side on a
real server subprocess with an API key, a tiny f32 model and httpx.
"""
import asyncio
import json
import time
from urllib.parse import quote

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_process import NO_EOS, ServerProcess  # noqa: E402

from alpaca2.server.streams import StreamSession, StreamSessions  # noqa: E402

KEY = {"Authorization": "Bearer sekrit"}


def drain(session, offset=0):
    async def go():
        return b"".join([c async for c in session.read(offset)])
    return asyncio.run(go())


# -- the bookkeeping ------------------------------------------------------------------------------

def test_a_recording_keeps_only_its_last_bytes():
    s = StreamSession("c", max_bytes=10)
    s.append(b"0123456")
    s.append(b"789ab")                  # 12 bytes: the first 2 dropped
    assert bytes(s.buffer) == b"23456789ab" and s.dropped == 2 and s.total_bytes == 12
    s.append(b"x" * 25)                 # one piece over the cap: its tail
    assert bytes(s.buffer) == b"x" * 10 and s.dropped == 27 and s.total_bytes == 37
    s.finish()
    assert not s.append(b"late") and s.total_bytes == 37
    assert drain(s, 30) == b"x" * 7
    assert drain(s, 5) == b""           # the bytes at 5 are gone: the reader gets nothing


def test_the_number_of_recordings_is_capped():
    streams = StreamSessions(max_sessions=2, max_bytes=100)
    a = streams.create_or_replace("a")
    b = streams.create_or_replace("b")
    assert streams.create_or_replace("c") is None and streams.unrecorded == 1    # both still running
    a.finish()
    c = streams.create_or_replace("c")                   # the finished one makes room
    assert c is not None and streams.get("a") is None and streams.get("b") is b
    assert len(streams.sessions) == 2


def test_a_new_stream_on_an_id_cancels_the_old_one():
    streams = StreamSessions()
    old = streams.create_or_replace("conv")
    stopped = []
    old.on_cancel(lambda: stopped.append(True))
    new = streams.create_or_replace("conv")
    assert old.cancelled and old.done and stopped == [True]
    assert streams.get("conv") is new and not new.cancelled


def test_finished_recordings_expire():
    streams = StreamSessions(ttl_s=0.05)
    s = streams.create_or_replace("conv")
    time.sleep(0.1)
    assert streams.get("conv") is s                      # running: kept, however long
    s.finish()
    time.sleep(0.1)
    assert streams.get("conv") is None


def test_lookup_answers_only_the_ids_asked_for():
    streams = StreamSessions()
    for cid in ("conv", "conv::org/model", "conversation", "other"):
        streams.create_or_replace(cid)
    assert sorted(i["conversation_id"] for i in streams.lookup(["conv"])) == ["conv", "conv::org/model"]
    assert streams.lookup([]) == []


# -- over HTTP -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerProcess(tiny_path, "-np", "2", "-c", "32768", "--template", "alpaca2", "--api-key", "sekrit",
                      "--metrics")
    yield s
    s.stop()


def qs(conv):
    return "conv_id=" + quote(conv, safe="")


def chat(n, **kw):
    return dict({"messages": [{"role": "user", "content": "hello"}], "max_tokens": n, "stream": True,
                 "temperature": 0, "logit_bias": NO_EOS}, **kw)


def stream_bytes(server, body, conv, path="/v1/chat/completions"):
    with httpx.stream("POST", server.url + path, json=body, timeout=120,
                      headers=dict(KEY, **{"X-Conversation-Id": conv})) as r:
        assert r.status_code == 200
        return b"".join(r.iter_raw())


def test_a_stream_replays_from_any_offset_then_stop_evicts_it(server):
    conv = "conv-1::ggml-org/tinygemma3-GGUF:Q8_0"       # slashes and colons travel in the query string
    original = stream_bytes(server, chat(12), conv)
    assert original.endswith(b"data: [DONE]\n\n")
    r = httpx.get(f"{server.url}/v1/stream?{qs(conv)}&from=0", headers=KEY, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content == original
    r = httpx.get(f"{server.url}/v1/stream?{qs(conv)}&from=40", headers=KEY, timeout=60)
    assert r.content == original[40:]
    r = httpx.post(server.url + "/v1/streams/lookup", json={"conversation_ids": ["conv-1"]}, headers=KEY, timeout=60)
    [info] = r.json()
    assert info["conversation_id"] == conv and info["is_done"] and info["total_bytes"] == len(original)
    r = httpx.delete(f"{server.url}/v1/stream?{qs(conv)}", headers=KEY, timeout=60)
    assert r.status_code == 204 and r.content == b""
    r = httpx.get(f"{server.url}/v1/stream?{qs(conv)}&from=0", headers=KEY, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.delete(f"{server.url}/v1/stream?{qs(conv)}", headers=KEY, timeout=60).status_code == 204


def test_bad_stream_requests_get_400(server):
    conv = "conv-bad"
    stream_bytes(server, chat(2), conv)
    for url in ("/v1/stream", "/v1/stream?from=0", f"/v1/stream?{qs(conv)}&from=abc",
                f"/v1/stream?{qs(conv)}&from=-1"):
        r = httpx.get(server.url + url, headers=KEY, timeout=60)
        assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type"}, url
    assert httpx.delete(server.url + "/v1/stream", headers=KEY, timeout=60).status_code == 400
    r = httpx.post(server.url + "/v1/streams/lookup", content=b"nope", headers=KEY, timeout=60)
    assert r.status_code == 400


def test_the_api_key_applies(server):
    conv = "conv-auth"
    stream_bytes(server, chat(2), conv)
    assert httpx.get(f"{server.url}/v1/stream?{qs(conv)}", timeout=60).status_code == 401
    assert httpx.delete(f"{server.url}/v1/stream?{qs(conv)}", timeout=60).status_code == 401
    assert httpx.post(server.url + "/v1/streams/lookup", json={"conversation_ids": [conv]},
                      timeout=60).status_code == 401
    # the refused DELETE did not stop anything: the recording is still there
    assert httpx.get(f"{server.url}/v1/stream?{qs(conv)}", headers=KEY, timeout=60).status_code == 200


def test_only_streams_are_recorded(server):
    conv = "conv-plain"
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(3, stream=False), timeout=60,
                   headers=dict(KEY, **{"X-Conversation-Id": conv}))
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/v1/stream?{qs(conv)}", headers=KEY, timeout=60).status_code == 404
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(3, temperature=-1), timeout=60,
                   headers=dict(KEY, **{"X-Conversation-Id": conv}))       # refused: nothing recorded
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/v1/stream?{qs(conv)}", headers=KEY, timeout=60).status_code == 404


def test_a_recorded_stream_outlives_its_client(server):
    conv = "conv-reload"
    n = 300
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json={"prompt": "hello", "max_tokens": n, "stream": True, "temperature": 0,
                            "logit_bias": NO_EOS}, headers=dict(KEY, **{"X-Conversation-Id": conv})) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data:"))
    # the client left after one event (a page reload); the answer is still made to its end
    r = httpx.get(f"{server.url}/v1/stream?{qs(conv)}&from=0", headers=KEY, timeout=120)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    events = [json.loads(line[5:]) for line in r.text.splitlines()
              if line.startswith("data:") and "[DONE]" not in line]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in events if e["choices"][0]["text"]) > 1


def test_stop_cancels_a_running_stream_and_its_readers(server):
    conv = "conv-stop"
    before = server.metrics(**KEY)
    body = {"prompt": "hello", "max_tokens": 16000, "stream": True, "temperature": 0, "logit_bias": NO_EOS}
    with httpx.Client(timeout=120, headers=KEY) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers={"X-Conversation-Id": conv}) as gen:
            lines = gen.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            with c.stream("GET", f"{server.url}/v1/stream?{qs(conv)}&from=0") as live:
                assert live.status_code == 200
                chunks = live.iter_raw()
                assert next(chunks)                           # the reader follows the live stream
                assert c.delete(f"{server.url}/v1/stream?{qs(conv)}").status_code == 204
                replayed = b"".join(chunks)                   # ... and ends with the stop
            rest = "\n".join(lines)                           # the generating client's stream ends too
    assert "[DONE]" not in rest and b"[DONE]" not in replayed
    assert httpx.get(f"{server.url}/v1/stream?{qs(conv)}", headers=KEY, timeout=60).status_code == 404
    deadline = time.monotonic() + 60
    while server.metrics(**KEY)["alpaca2_slots_busy"] != 0:
        assert time.monotonic() < deadline, "the stopped generation still holds its slot"
        time.sleep(0.05)
    after = server.metrics(**KEY)
    assert after["alpaca2_completion_tokens_total"] - before["alpaca2_completion_tokens_total"] < 16000


def test_a_new_stream_on_the_same_conversation_replaces_the_old(server):
    conv = "conv-twice"
    body = {"prompt": "hello", "max_tokens": 16000, "stream": True, "temperature": 0, "logit_bias": NO_EOS}
    with httpx.Client(timeout=120, headers=KEY) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers={"X-Conversation-Id": conv}) as old:
            lines = old.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            new = stream_bytes(server, chat(4), conv)
            rest = "\n".join(lines)
    assert "[DONE]" not in rest                         # the old one was cancelled
    r = httpx.get(f"{server.url}/v1/stream?{qs(conv)}&from=0", headers=KEY, timeout=60)
    assert r.content == new
