// alpaca2's shim over llama.cpp's common library (common/chat.h, common/json-schema-to-grammar.h).
//
// JSON text in, JSON text out, so the Cython side needs no C++ type from llama.cpp. Every function is
// noexcept: a C++ exception becomes a status code and a message in `out`, never a crash.
// The calls mirror what llama-server does (tools/server/server-common.cpp: oaicompat_chat_params_parse,
// server-schema.cpp: grammar triggers and preserved tokens, server-task.cpp: update_chat_msg).
#pragma once

#include <string>

struct llama_model;

namespace alpaca2_common {

enum status {
    STATUS_OK           = 0,
    STATUS_BAD_INPUT    = 1,  // the request itself is wrong (messages, tools, tool_choice): ValueError
    STATUS_BAD_SCHEMA   = 2,  // a JSON schema or GBNF grammar that cannot be used: GrammarError
    STATUS_BAD_TEMPLATE = 3,  // the Jinja template does not parse or fails to render: ChatTemplateError
    STATUS_BAD_OUTPUT   = 4,  // generated text that does not match the template's format: ChatParseError
    STATUS_INTERNAL     = 5,  // anything else (out of memory...): RuntimeError
};

// Silences (false) or restores (true) llama.cpp's common log (LOG_ERR/LOG_WRN in chat.cpp ...).
void set_log_enabled(bool enabled) noexcept;

// schema_json: a JSON schema as JSON text. out: the GBNF grammar, or the error message.
int json_schema_to_grammar(const std::string & schema_json, std::string & out) noexcept;

// The model's chat templates (the default one and the tool_use variant), parsed once.
struct formatter;

// model may be NULL (then template_override is required and there are no BOS/EOS strings).
// template_override: Jinja source, or "" for the model's own template (chatml when it has none).
formatter * formatter_new(const llama_model * model, const std::string & template_override,
                          int & status, std::string & error) noexcept;
void formatter_free(formatter * fmt) noexcept;

// {"source", "tool_use_source", "explicit", "caps": {...}, "supports_thinking"}
int formatter_info(const formatter * fmt, std::string & out) noexcept;

// request_json: {"messages", "tools", "tool_choice", "parallel_tool_calls", "add_generation_prompt",
// "continue_final_message", "json_schema", "grammar", "enable_thinking", "reasoning_format",
// "chat_template_kwargs"} in llama-server's request shapes.
// out: {"prompt", "format", "grammar", "grammar_lazy", "grammar_triggers", "lazy_patterns",
// "lazy_tokens", "grammar_prefill_tokens", "preserved_tokens", "preserved_token_ids",
// "additional_stops", "generation_prompt", "supports_thinking", "thinking_start_tag",
// "thinking_end_tags", "parser_state": {...}} or the error message.
int formatter_apply(const formatter * fmt, const std::string & request_json, std::string & out) noexcept;

// A parser for one response: the "parser_state" that formatter_apply returned, loaded once.
// It also keeps what llama-server keeps per streamed response (text so far, last message, tool call ids).
struct chat_stream;

chat_stream * stream_new(const std::string & parser_state_json, int & status, std::string & error) noexcept;
void stream_free(chat_stream * st) noexcept;

// Parses `text` on its own (the stream's text so far is left alone). out: the OpenAI assistant message.
int stream_parse(chat_stream * st, const std::string & text, bool is_partial, std::string & out) noexcept;

// Appends text_added to the response, parses all of it and returns {"message": ..., "deltas": [...]}:
// the OpenAI chat.completion.chunk deltas since the previous call (llama-server's update_chat_msg).
int stream_update(chat_stream * st, const std::string & text_added, bool is_partial, std::string & out) noexcept;

// The deltas from one OpenAI assistant message to the next (common_chat_msg_diff::compute_diffs).
int msg_diff(const std::string & prev_msg_json, const std::string & new_msg_json, std::string & out) noexcept;

}  // namespace alpaca2_common
