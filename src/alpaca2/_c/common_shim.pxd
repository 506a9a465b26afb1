# alpaca2's own C++ shim over llama.cpp's common library (src/alpaca2/_common_shim.h): JSON text in and out.
from libcpp cimport bool
from libcpp.string cimport string

from alpaca2._c.llama cimport llama_model


cdef extern from "_common_shim.h" namespace "alpaca2_common" nogil:
    enum status:
        STATUS_OK
        STATUS_BAD_INPUT
        STATUS_BAD_SCHEMA
        STATUS_BAD_TEMPLATE
        STATUS_BAD_OUTPUT
        STATUS_INTERNAL

    void set_log_enabled(bool enabled) noexcept
    int json_schema_to_grammar(const string & schema_json, string & out) noexcept

    cppclass formatter:
        pass
    formatter * formatter_new(const llama_model * model, const string & template_override,
                              int & status, string & error) noexcept
    void formatter_free(formatter * fmt) noexcept
    int formatter_info(const formatter * fmt, string & out) noexcept
    int formatter_apply(const formatter * fmt, const string & request_json, string & out) noexcept

    cppclass chat_stream:
        pass
    chat_stream * stream_new(const string & parser_state_json, int & status, string & error) noexcept
    void stream_free(chat_stream * st) noexcept
    int stream_parse(chat_stream * st, const string & text, bool is_partial, string & out) noexcept
    int stream_update(chat_stream * st, const string & text_added, bool is_partial, string & out) noexcept
    int msg_diff(const string & prev_msg_json, const string & new_msg_json, string & out) noexcept
