// alpaca2's shim over llama.cpp's common library: see _common_shim.h.
#include "_common_shim.h"

#include "chat.h"
#include "common.h"
#include "json-schema-to-grammar.h"
#include "log.h"
#include "llama.h"

#include <algorithm>
#include <cctype>
#include <mutex>
#include <new>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

using json = common_json;

namespace alpaca2_common {

namespace {

// A status and its message, thrown inside the shim and caught at its edge.
struct shim_error : std::runtime_error {
    int status;
    shim_error(int status, const std::string & msg) : std::runtime_error(msg), status(status) {}
};

// Runs fn, turning every exception into a status and its message in `out`.
template <typename F>
int guarded(std::string & out, int fallback_status, F && fn) noexcept {
    try {
        fn();
        return STATUS_OK;
    } catch (const shim_error & e) {
        out = e.what();
        return e.status;
    } catch (const std::bad_alloc &) {
        out = "out of memory";
        return STATUS_INTERNAL;
    } catch (const std::exception & e) {
        out = e.what();
        return fallback_status;
    } catch (...) {
        out = "unknown C++ exception in llama.cpp's common library";
        return STATUS_INTERNAL;
    }
}

json parse_json(const std::string & text, int status, const char * what) {
    try {
        return json::parse(text);
    } catch (const std::exception & e) {
        throw shim_error(status, std::string(what) + " is not valid JSON: " + e.what());
    }
}

// llama-server's ids for tool calls the model did not name itself (server-common.cpp: random_string)
std::string random_id() {
    static const char chars[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    thread_local std::mt19937 gen{std::random_device{}()};
    std::string id(32, ' ');
    for (auto & c : id) {
        c = chars[gen() % (sizeof(chars) - 1)];
    }
    return id;
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    return common_tokenize(vocab, text, /* add_special */ false, /* parse_special */ true);
}

const char * trigger_type_name(common_grammar_trigger_type type) {
    switch (type) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:        return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:         return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:      return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

// The schema as llama-server reads "json_schema": an empty object means any object.
json schema_of(const json & schema) {
    if (schema.is_object() && schema.empty()) {
        return json{{"type", "object"}};
    }
    return schema;
}

std::string grammar_of_schema(const json & schema) {
    try {
        return ::json_schema_to_grammar(schema_of(schema));
    } catch (const std::exception & e) {
        throw shim_error(STATUS_BAD_SCHEMA, std::string("invalid JSON schema: ") + e.what());
    }
}

json diff_to_json(const common_chat_msg_diff & diff) {
    // llama-server's server_chat_msg_diff_to_json_oaicompat
    json delta = json::object();
    if (!diff.reasoning_content_delta.empty()) {
        delta["reasoning_content"] = diff.reasoning_content_delta;
    }
    if (!diff.content_delta.empty()) {
        delta["content"] = diff.content_delta;
    }
    if (diff.tool_call_index != std::string::npos) {
        json tool_call = json::object();
        tool_call["index"] = diff.tool_call_index;
        if (!diff.tool_call_delta.id.empty()) {
            tool_call["id"]   = diff.tool_call_delta.id;
            tool_call["type"] = "function";
        }
        if (!diff.tool_call_delta.name.empty() || !diff.tool_call_delta.arguments.empty()) {
            json function = json::object();
            if (!diff.tool_call_delta.name.empty()) {
                function["name"] = diff.tool_call_delta.name;
            }
            if (!diff.tool_call_delta.arguments.empty()) {
                function["arguments"] = diff.tool_call_delta.arguments;
            }
            tool_call["function"] = function;
        }
        json tool_calls = json::array();
        tool_calls.push_back(tool_call);
        delta["tool_calls"] = tool_calls;
    }
    return delta;
}

// An OpenAI assistant message back into llama.cpp's struct (for msg_diff).
common_chat_msg msg_of_json(const json & j) {
    if (!j.is_object()) {
        throw shim_error(STATUS_BAD_INPUT, "a message must be a JSON object");
    }
    common_chat_msg msg;
    msg.role = j.value("role", std::string("assistant"));
    if (j.contains("content") && j.at("content").is_string()) {
        msg.content = j.at("content").get<std::string>();
    }
    if (j.contains("reasoning_content") && j.at("reasoning_content").is_string()) {
        msg.reasoning_content = j.at("reasoning_content").get<std::string>();
    }
    if (j.contains("tool_calls") && j.at("tool_calls").is_array()) {
        for (const auto & tc : j.at("tool_calls")) {
            common_chat_tool_call call;
            call.id = tc.value("id", std::string());
            const json fn = tc.value("function", json::object());
            call.name = fn.value("name", std::string());
            if (fn.contains("arguments")) {
                const auto & args = fn.at("arguments");
                call.arguments = args.is_string() ? args.get<std::string>() : args.dump();
            }
            msg.tool_calls.push_back(call);
        }
    }
    return msg;
}

}  // namespace

void set_log_enabled(bool enabled) noexcept {
    common_log_set_verbosity_thold(enabled ? LOG_LEVEL_INFO : -1);
}

int json_schema_to_grammar(const std::string & schema_json, std::string & out) noexcept {
    return guarded(out, STATUS_BAD_SCHEMA, [&] {
        const json schema = parse_json(schema_json, STATUS_BAD_SCHEMA, "the JSON schema");
        out = grammar_of_schema(schema);
    });
}

// --- chat templates ---------------------------------------------------------------------------

struct formatter {
    const llama_model *       model = nullptr;
    common_chat_templates_ptr tmpls;
    bool                      supports_thinking = false;
};

formatter * formatter_new(const llama_model * model, const std::string & template_override,
                          int & status, std::string & error) noexcept {
    formatter * fmt = nullptr;
    status = guarded(error, STATUS_BAD_TEMPLATE, [&] {
        std::unique_ptr<formatter> f(new formatter());
        f->model = model;
        f->tmpls = common_chat_templates_init(model, template_override);
        // llama-server: thinking is on when the template can turn it on (--reasoning auto)
        f->supports_thinking = common_chat_templates_support_enable_thinking(f->tmpls.get());
        fmt = f.release();
    });
    return fmt;
}

void formatter_free(formatter * fmt) noexcept {
    delete fmt;
}

int formatter_info(const formatter * fmt, std::string & out) noexcept {
    return guarded(out, STATUS_INTERNAL, [&] {
        json caps = json::object();
        for (const auto & [name, value] : common_chat_templates_get_caps(fmt->tmpls.get())) {
            caps[name] = value;
        }
        json info = json::object();
        info["source"]            = common_chat_templates_source(fmt->tmpls.get());
        info["tool_use_source"]   = common_chat_templates_source(fmt->tmpls.get(), "tool_use");
        info["explicit"]          = common_chat_templates_was_explicit(fmt->tmpls.get());
        info["supports_thinking"] = fmt->supports_thinking;
        info["caps"]              = caps;
        out = info.dump();
    });
}

namespace {

// llama-server's oaicompat_chat_params_parse: the request checks and the template inputs.
common_chat_templates_inputs inputs_of_request(const formatter * fmt, json & req) {
    common_chat_templates_inputs inputs;
    const json tools = req.value("tools", json());
    const std::string tool_choice = req.value("tool_choice", std::string("auto"));

    json json_schema = req.value("json_schema", json());
    const std::string grammar = req.value("grammar", std::string());
    if (!json_schema.is_null() && !grammar.empty()) {
        throw shim_error(STATUS_BAD_INPUT, "Cannot use both json_schema and grammar");
    }
    if (!json_schema.is_null()) {
        json_schema = schema_of(json_schema);
        grammar_of_schema(json_schema);  // a bad schema is the caller's, not the template's
    }

    if (!req.contains("messages") || !req.at("messages").is_array()) {
        throw shim_error(STATUS_BAD_INPUT, "'messages' must be an array");
    }
    const json & messages = req.at("messages");
    for (const auto & msg : messages) {
        if (!msg.is_object()) {
            throw shim_error(STATUS_BAD_INPUT, "each message must be an object, got " + msg.dump());
        }
        const std::string role = msg.value("role", std::string());
        if (role != "assistant" && !msg.contains("content")) {
            throw shim_error(STATUS_BAD_INPUT, "All non-assistant messages must contain 'content'");
        }
        if (role == "assistant" && !msg.contains("content") && !msg.contains("tool_calls")) {
            throw shim_error(STATUS_BAD_INPUT, "Assistant message must contain either 'content' or 'tool_calls'!");
        }
    }
    try {
        inputs.messages    = common_chat_msgs_parse_oaicompat(messages);
        inputs.tools       = common_chat_tools_parse_oaicompat(tools);
        inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(tool_choice);
    } catch (const shim_error &) {
        throw;
    } catch (const std::exception & e) {
        throw shim_error(STATUS_BAD_INPUT, e.what());
    }
    auto caps = common_chat_templates_get_caps(fmt->tmpls.get());
    inputs.json_schema            = json_schema.is_null() ? "" : json_schema.dump();
    inputs.grammar                = grammar;
    inputs.use_jinja              = true;
    inputs.parallel_tool_calls    = req.value("parallel_tool_calls", caps["supports_parallel_tool_calls"]);
    inputs.add_generation_prompt  = req.value("add_generation_prompt", true);
    inputs.continue_final_message = req.contains("continue_final_message") ?
        common_chat_continuation_parse(req.at("continue_final_message")) : COMMON_CHAT_CONTINUATION_NONE;
    if (inputs.continue_final_message == COMMON_CHAT_CONTINUATION_NONE && req.value("prefill_assistant", true)
        && !inputs.messages.empty() && inputs.messages.back().role == "assistant") {
        if (inputs.messages.size() >= 2 && inputs.messages[inputs.messages.size() - 2].role == "assistant") {
            throw shim_error(STATUS_BAD_INPUT, "Cannot have 2 or more assistant messages at the end of the list.");
        }
        inputs.continue_final_message = COMMON_CHAT_CONTINUATION_AUTO;
        inputs.add_generation_prompt  = false;
    }
    if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE && inputs.add_generation_prompt) {
        throw shim_error(STATUS_BAD_INPUT, "Cannot set both add_generation_prompt and continue_final_message to true.");
    }
    if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE && !inputs.messages.empty()
        && inputs.messages.back().role == "assistant" && !inputs.messages.back().tool_calls.empty()) {
        throw shim_error(STATUS_BAD_INPUT, "Cannot continue an assistant message that contains tool calls.");
    }
    try {
        inputs.reasoning_format = common_reasoning_format_from_name(req.value("reasoning_format", std::string("deepseek")));
    } catch (const std::exception & e) {
        throw shim_error(STATUS_BAD_INPUT, e.what());
    }
    inputs.enable_thinking = req.value("enable_thinking", true) && fmt->supports_thinking;
    if (!inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE && !grammar.empty()) {
        throw shim_error(STATUS_BAD_INPUT, "Cannot use custom grammar constraints with tools.");
    }
    const json kwargs = req.value("chat_template_kwargs", json::object());
    for (const auto & item : kwargs.items()) {
        inputs.chat_template_kwargs[item.key()] = item.value().dump();
    }
    auto it = inputs.chat_template_kwargs.find("enable_thinking");
    if (it != inputs.chat_template_kwargs.end()) {
        if (it->second == "true") {
            inputs.enable_thinking = true;
        } else if (it->second == "false") {
            inputs.enable_thinking = false;
        } else if (!it->second.empty() && it->second[0] == '"') {
            throw shim_error(STATUS_BAD_INPUT, "invalid type for \"enable_thinking\" (expected boolean, got string)");
        }
    }
    return inputs;
}

}  // namespace

int formatter_apply(const formatter * fmt, const std::string & request_json, std::string & out) noexcept {
    return guarded(out, STATUS_BAD_TEMPLATE, [&] {
        json req = parse_json(request_json, STATUS_BAD_INPUT, "the request");
        const common_chat_templates_inputs inputs = inputs_of_request(fmt, req);

        common_chat_params params;
        try {
            params = common_chat_templates_apply(fmt->tmpls.get(), inputs);
        } catch (const std::bad_alloc &) {
            throw;
        } catch (const std::exception & e) {
            // also a template's raise_exception() on messages it refuses: ChatTemplateError, a ValueError
            throw shim_error(STATUS_BAD_TEMPLATE, std::string("the chat template failed: ") + e.what());
        }

        json res = json::object();
        res["prompt"]            = params.prompt;
        res["format"]            = common_chat_format_name(params.format);
        res["grammar"]           = params.grammar;
        res["grammar_lazy"]      = params.grammar_lazy;
        res["generation_prompt"] = params.generation_prompt;
        res["supports_thinking"] = params.supports_thinking;
        res["thinking_start_tag"] = params.thinking_start_tag;
        res["thinking_end_tags"] = params.thinking_end_tags;
        res["preserved_tokens"]  = params.preserved_tokens;
        res["additional_stops"]  = params.additional_stops;
        json triggers = json::array();
        for (const auto & t : params.grammar_triggers) {
            json jt = json::object();
            jt["type"]  = trigger_type_name(t.type);
            jt["value"] = t.value;
            if (t.type == COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN) {
                jt["token"] = t.token;
            }
            triggers.push_back(jt);
        }
        res["grammar_triggers"] = triggers;

        // What llama-server's sampler is then given (server-schema.cpp, common/sampling.cpp), needing the vocab:
        // preserved tokens that are one token; trigger words that are one (preserved) token become token
        // triggers; the rest become regex patterns for llama_sampler_init_grammar_lazy_patterns.
        std::vector<int> preserved_ids;
        std::vector<std::string> lazy_patterns;
        std::vector<int> lazy_tokens;
        std::vector<int> prefill_tokens;
        const llama_vocab * vocab = fmt->model ? llama_model_get_vocab(fmt->model) : nullptr;
        if (vocab) {
            for (const auto & t : params.preserved_tokens) {
                auto ids = tokenize(vocab, t);
                if (ids.size() == 1) {
                    preserved_ids.push_back(ids[0]);
                }
            }
            for (const auto & t : params.grammar_triggers) {
                switch (t.type) {
                    case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                        auto ids = tokenize(vocab, t.value);
                        if (ids.size() == 1) {
                            if (std::find(preserved_ids.begin(), preserved_ids.end(), ids[0]) == preserved_ids.end()) {
                                throw shim_error(STATUS_BAD_TEMPLATE,
                                                 "Grammar trigger word should be marked as preserved token: " + t.value);
                            }
                            lazy_tokens.push_back(ids[0]);
                        } else {
                            lazy_patterns.push_back(regex_escape(t.value));
                        }
                        break;
                    }
                    case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                        lazy_patterns.push_back(t.value);
                        break;
                    case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                        const auto & p = t.value;
                        lazy_patterns.push_back(p.empty() ? std::string("^$") :
                            (p.front() != '^' ? "^" : "") + p + (p.back() != '$' ? "$" : ""));
                        break;
                    }
                    case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                        lazy_tokens.push_back(t.token);
                        break;
                }
            }
            if (params.grammar_lazy && !params.grammar.empty() && lazy_patterns.empty() && lazy_tokens.empty()) {
                throw shim_error(STATUS_BAD_TEMPLATE, "no triggers set for lazy grammar");
            }
            // A template's grammar (tool calls, output format) starts before the generation prompt:
            // llama-server feeds it those tokens first (a user's own grammar is not prefilled).
            if (!params.grammar.empty() && !params.grammar_lazy && !params.generation_prompt.empty()) {
                auto ids = tokenize(vocab, params.generation_prompt);
                for (size_t i = 0; i < ids.size(); i++) {
                    const std::string piece = common_token_to_piece(vocab, ids[i], true);
                    if (i == 0 && !piece.empty() && std::isspace((unsigned char) piece[0])
                        && !std::isspace((unsigned char) params.generation_prompt[0])) {
                        continue;  // a tokenizer's leading space before the first special token
                    }
                    prefill_tokens.push_back(ids[i]);
                }
            }
        }
        res["preserved_token_ids"]    = preserved_ids;
        res["lazy_patterns"]          = lazy_patterns;
        res["lazy_tokens"]            = lazy_tokens;
        res["grammar_prefill_tokens"] = prefill_tokens;

        // Everything the parse step needs (server-schema.cpp: chat_format, reasoning_format, chat_parser ...)
        json state = json::object();
        state["format"]           = (int) params.format;
        state["reasoning_format"] = common_reasoning_format_name(inputs.reasoning_format);
        state["generation_prompt"] = params.generation_prompt;
        state["parser"]           = params.parser;
        state["parse_tool_calls"] = !inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE;
        state["is_continuation"]  = inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE;
        res["parser_state"] = state;
        out = res.dump();
    });
}

// --- parsing the model's output ---------------------------------------------------------------

struct chat_stream {
    common_chat_parser_params params;
    std::string               generated_text;
    common_chat_msg           msg;
    std::vector<std::string>  tool_call_ids;
};

chat_stream * stream_new(const std::string & parser_state_json, int & status, std::string & error) noexcept {
    chat_stream * st = nullptr;
    status = guarded(error, STATUS_BAD_INPUT, [&] {
        const json state = parse_json(parser_state_json, STATUS_BAD_INPUT, "the parser state");
        std::unique_ptr<chat_stream> s(new chat_stream());
        auto & p = s->params;
        const int format = state.value("format", 0);
        if (format < 0 || format >= COMMON_CHAT_FORMAT_COUNT) {
            throw shim_error(STATUS_BAD_INPUT, "unknown chat format " + std::to_string(format));
        }
        p.format            = (common_chat_format) format;
        p.reasoning_format  = common_reasoning_format_from_name(state.value("reasoning_format", std::string("deepseek")));
        p.reasoning_in_content = state.value("stream", false) && p.reasoning_format == COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY;
        p.generation_prompt = state.value("generation_prompt", std::string());
        p.parse_tool_calls  = state.value("parse_tool_calls", true);
        p.is_continuation   = state.value("is_continuation", false);
        p.echo              = state.value("echo", false);
        const std::string parser = state.value("parser", std::string());
        if (!parser.empty()) {
            try {
                p.parser.load(parser);
            } catch (const std::exception & e) {
                throw shim_error(STATUS_BAD_INPUT, std::string("the chat parser could not be loaded: ") + e.what());
            }
        }
        if (p.is_continuation && !p.echo) {
            // llama-server's task_result_state: no first delta repeating the assistant prefill
            s->msg = common_chat_parse("", true, p);
        }
        st = s.release();
    });
    return st;
}

void stream_free(chat_stream * st) noexcept {
    delete st;
}

int stream_parse(chat_stream * st, const std::string & text, bool is_partial, std::string & out) noexcept {
    return guarded(out, STATUS_BAD_OUTPUT, [&] {
        common_chat_msg msg = common_chat_parse(text, is_partial, st->params);
        std::vector<std::string> ids;
        msg.set_tool_call_ids(ids, random_id);
        if (msg.role.empty()) {
            msg.role = "assistant";
        }
        out = msg.to_json_oaicompat().dump();
    });
}

int stream_update(chat_stream * st, const std::string & text_added, bool is_partial, std::string & out) noexcept {
    return guarded(out, STATUS_BAD_OUTPUT, [&] {
        // llama-server's task_result_state::update_chat_msg (filter_tool_calls = false)
        st->generated_text += text_added;
        common_chat_msg prev = st->msg;
        common_chat_msg msg = common_chat_parse(st->generated_text, is_partial, st->params);
        json deltas = json::array();
        if (!msg.empty()) {
            msg.set_tool_call_ids(st->tool_call_ids, random_id);
            st->msg = msg;
            for (const auto & diff : common_chat_msg_diff::compute_diffs(prev, st->msg)) {
                deltas.push_back(diff_to_json(diff));
            }
        }
        common_chat_msg shown = st->msg;
        if (shown.role.empty()) {
            shown.role = "assistant";
        }
        json res = json::object();
        res["message"] = shown.to_json_oaicompat();
        res["deltas"]  = deltas;
        out = res.dump();
    });
}

int msg_diff(const std::string & prev_msg_json, const std::string & new_msg_json, std::string & out) noexcept {
    return guarded(out, STATUS_BAD_INPUT, [&] {
        const common_chat_msg prev = msg_of_json(parse_json(prev_msg_json, STATUS_BAD_INPUT, "the previous message"));
        const common_chat_msg next = msg_of_json(parse_json(new_msg_json, STATUS_BAD_INPUT, "the new message"));
        json deltas = json::array();
        for (const auto & diff : common_chat_msg_diff::compute_diffs(prev, next)) {
            deltas.push_back(diff_to_json(diff));
        }
        out = deltas.dump();
    });
}

}  // namespace alpaca2_common
