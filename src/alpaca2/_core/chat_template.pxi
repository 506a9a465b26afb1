# llama.cpp's built-in chat templates (no Jinja). Included by _core.pyx.


def chat_builtin_templates():
    """Names of the chat templates llama.cpp knows without a Jinja engine."""
    cdef const char * names[128]
    n = llama_chat_builtin_templates(names, 128)
    return [names[i].decode() for i in range(min(n, 128))]


def chat_apply_template(str tmpl, messages, bint add_assistant=True):
    """Format [{'role':..., 'content':...}] with llama.cpp's built-in template support."""
    msgs = [(_to_bytes(m["role"]), _to_bytes(m["content"])) for m in messages]
    cdef size_t n = len(msgs), i
    cdef llama_chat_message * c_msgs = <llama_chat_message *>malloc(max(n, 1) * sizeof(llama_chat_message))
    if c_msgs == NULL:
        raise MemoryError()
    cdef bytes c_tmpl = _to_bytes(tmpl)
    cdef int32_t need, cap = 256
    for r, c in msgs:
        cap += len(r) + len(c) * 2 + 64
    cdef bytearray buf
    try:
        for i in range(n):
            c_msgs[i].role = msgs[i][0]
            c_msgs[i].content = msgs[i][1]
        buf = bytearray(cap)
        need = llama_chat_apply_template(c_tmpl, c_msgs, n, add_assistant, buf, cap)
        if need > cap:
            cap = need
            buf = bytearray(cap)
            need = llama_chat_apply_template(c_tmpl, c_msgs, n, add_assistant, buf, cap)
        if need < 0:
            raise ValueError("llama.cpp does not support this chat template")
        return bytes(buf[:need]).decode("utf-8", "replace")
    finally:
        free(c_msgs)
