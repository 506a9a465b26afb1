"""The prebuilt SSE text chunks (alpaca2.server.sse.TextChunks) are byte for byte what dumping the
whole chunk dict gives (the encoding the stream used before, and still uses for other chunks)."""
import pytest

from alpaca2.server.sse import TextChunks, sse

TEXTS = [" hello", "a", "\"quoted\" and \\backslash\\", "tab\tnew\nline\rcr", "\x00\x01\x1f\x7f\x80\x9f",
         "café ñ 日本語 🦙", "\u2028\u2029", "\ufffd", "</script>", "{\"json\": [1, 2]}", "'", "/", " " * 7,
         "".join(chr(c) for c in range(0, 0x250)), "\U0010ffff"]

HEADS = [{"id": "cmpl-0123abcd", "object": "text_completion", "created": 1700000000, "model": "gemma.gguf",
          "system_fingerprint": "b-alpaca2-0.1.0"},
         {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "modèle \"ü\" 🦙",
          "system_fingerprint": "fp"}]


def old_chunk(head, chat, index, text):
    """openai_api's chunk() for a text-only chunk, as it was built before TextChunks."""
    if chat:
        choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": None}
    return sse(dict(head, choices=[choice]))


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("head", HEADS)
def test_text_chunks_equal_the_dumped_dict(head, chat):
    chunks = TextChunks(head, chat)
    for index in (0, 1, 15):
        for text in TEXTS:
            assert chunks.text(index, text) == old_chunk(head, chat, index, text)
            assert chunks.text(index, text).encode() == old_chunk(head, chat, index, text).encode()


def test_text_chunks_need_a_head():
    with pytest.raises(ValueError):
        TextChunks({}, chat=False)
