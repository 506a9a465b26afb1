"""llama-server's environment variables: LLAMA_ARG_<NAME> sets a flag, as in llama.cpp's common/arg.cpp.

A flag given on the command line wins over its variable (llama.cpp reads the environment first).
A switch is set by a true value ("1", "true", "on", "enabled"); a flag with a negative form takes
true or false ("0", "false", "off", "disabled"), and LLAMA_ARG_NO_<NAME> set to anything means
false.  Variables of flags alpaca2 serve does not have are named in one warning line and ignored
(an unknown flag on the command line is an error; a variable is ambient).  The names are those of
llama.cpp's arg.cpp at the vendored commit.
"""
from __future__ import annotations

import os
import sys

TRUE, FALSE = ("1", "true", "on", "enabled"), ("0", "false", "off", "disabled")

# LLAMA_ARG_<NAME>: the flag it gives a value to
VALUE = {
    "THREADS": "--threads", "CTX_SIZE": "--ctx-size", "KV_UNIFIED_PER_SLOT": "--kv-unified-per-slot",
    "N_PREDICT": "--n-predict", "BATCH": "--batch-size", "UBATCH": "--ubatch-size",
    "CTX_CHECKPOINTS": "--swa-checkpoints", "CHECKPOINT_MIN_SPACING_NT": "--checkpoint-min-step",
    "CACHE_RAM": "--cache-ram", "FLASH_ATTN": "--flash-attn", "TEMPERATURE": "--temperature", "TOP_K": "--top-k",
    "TOP_P": "--top-p", "MIN_P": "--min-p", "REPEAT_PENALTY": "--repeat-penalty",
    "PRESENCE_PENALTY": "--presence-penalty", "FREQUENCY_PENALTY": "--frequency-penalty", "POOLING": "--pooling",
    "ROPE_SCALING_TYPE": "--rope-scaling", "ROPE_SCALE": "--rope-scale", "ROPE_FREQ_BASE": "--rope-freq-base",
    "ROPE_FREQ_SCALE": "--rope-freq-scale", "YARN_ORIG_CTX": "--yarn-orig-ctx",
    "YARN_EXT_FACTOR": "--yarn-ext-factor", "YARN_ATTN_FACTOR": "--yarn-attn-factor",
    "YARN_BETA_SLOW": "--yarn-beta-slow", "YARN_BETA_FAST": "--yarn-beta-fast", "GRP_ATTN_N": "--grp-attn-n",
    "GRP_ATTN_W": "--grp-attn-w", "CACHE_TYPE_K": "--cache-type-k", "CACHE_TYPE_V": "--cache-type-v",
    "DEFRAG_THOLD": "--defrag-thold", "N_PARALLEL": "--parallel", "MMPROJ": "--mmproj",
    "MMPROJ_URL": "--mmproj-url", "IMAGE_MIN_TOKENS": "--image-min-tokens",
    "IMAGE_MAX_TOKENS": "--image-max-tokens", "MTMD_BATCH_MAX_TOKENS": "--mtmd-batch-max-tokens",
    "VIDEO_FPS": "--video-fps", "VIDEO_TIMESTAMP_INTERVAL": "--video-timestamp-interval",
    "VIDEO_FFMPEG_DIR": "--video-ffmpeg-dir", "RPC": "--rpc", "LOAD_MODE": "--load-mode",
    "LAZY_MODE": "--lazy-mode", "NUMA": "--numa", "DEVICE": "--device", "OVERRIDE_TENSOR": "--override-tensor",
    "N_CPU_MOE": "--n-cpu-moe", "N_CPU_FFN": "--n-cpu-ffn", "N_GPU_LAYERS": "--n-gpu-layers",
    "SPLIT_MODE": "--split-mode", "TENSOR_SPLIT": "--tensor-split", "MAIN_GPU": "--main-gpu", "FIT": "--fit",
    "FIT_ESTIMATE": "--fit-print", "FIT_TARGET": "--fit-target", "FIT_CTX": "--fit-ctx", "ALIAS": "--alias",
    "TAGS": "--tags", "MODEL": "--model", "MODEL_URL": "--model-url", "DOCKER_REPO": "--docker-repo",
    "HF_REPO": "--hf-repo", "HF_FILE": "--hf-file", "HOST": "--host", "PORT": "--port", "STATIC_PATH": "--path",
    "CORS_ORIGINS": "--cors-origins", "CORS_METHODS": "--cors-methods", "CORS_HEADERS": "--cors-headers",
    "API_PREFIX": "--api-prefix", "UI_CONFIG": "--webui-config", "UI_CONFIG_FILE": "--webui-config-file",
    "TOOLS": "--tools", "TOOLS_RUNTIME": "--tools-runtime", "MCP_SERVERS_CONFIG": "--mcp-servers-config",
    "MCP_SERVERS_JSON": "--mcp-servers-json", "API_KEY_FILE": "--api-key-file", "SSL_KEY_FILE": "--ssl-key-file",
    "SSL_CERT_FILE": "--ssl-cert-file", "CHAT_TEMPLATE_KWARGS": "--chat-template-kwargs", "TIMEOUT": "--timeout",
    "SSE_PING_INTERVAL": "--sse-ping-interval", "THREADS_HTTP": "--threads-http", "CACHE_REUSE": "--cache-reuse",
    "MODELS_DIR": "--models-dir", "MODELS_PRESET": "--models-preset", "MODELS_MAX": "--models-max",
    "THINK": "--reasoning-format", "REASONING": "--reasoning", "REASONING_EFFORT": "--reasoning-effort",
    "THINK_BUDGET": "--reasoning-budget", "THINK_BUDGET_MESSAGE": "--reasoning-budget-message",
    "CHAT_TEMPLATE": "--chat-template", "CHAT_TEMPLATE_FILE": "--chat-template-file", "LOG_FILE": "--log-file",
    "LOG_COLORS": "--log-colors", "LOG_VERBOSITY": "--log-verbosity", "SPEC_DRAFT_HF_REPO": "--hf-repo-draft",
    "SPEC_DRAFT_CACHE_TYPE_K": "--cache-type-k-draft", "SPEC_DRAFT_CACHE_TYPE_V": "--cache-type-v-draft",
    "SPEC_DRAFT_N_CPU_MOE": "--n-cpu-moe-draft", "SPEC_DRAFT_N_MAX": "--spec-draft-n-max",
    "SPEC_DRAFT_N_MIN": "--spec-draft-n-min", "SPEC_SYNTH_LEN": "--spec-synth-len",
    "SPEC_SYNTH_RATES": "--spec-synth-rates", "SPEC_DRAFT_P_SPLIT": "--draft-p-split",
    "SPEC_DRAFT_P_MIN": "--draft-p-min", "N_GPU_LAYERS_DRAFT": "--n-gpu-layers-draft",
    "SPEC_DRAFT_MODEL": "--model-draft", "SPEC_TYPE": "--spec-type", "DRAFT_MAX": "--draft-max",
    "DRAFT_MIN": "--draft-n-min",
}
# LLAMA_ARG_<NAME>: a flag without a value, set by a true value
SWITCH = {
    "SWA_FULL": "--swa-full", "BACKEND_SAMPLING": "--backend-sampling", "NO_HOST": "--no-host",
    "CPU_MOE": "--cpu-moe", "REUSE_PORT": "--reuse-port", "EMBEDDINGS": "--embeddings", "RERANKING": "--reranking",
    "ENDPOINT_METRICS": "--metrics", "ENDPOINT_PROPS": "--props", "OFFLINE": "--offline",
    "SPEC_DRAFT_CPU_MOE": "--cpu-moe-draft",
}
# LLAMA_ARG_<NAME>: (the flag, its negative form)
BOOL = {
    "KV_UNIFIED": ("--kv-unified", "-no-kvu"), "CACHE_IDLE_SLOTS": ("--cache-idle-slots", "--no-cache-idle-slots"),
    "CONTEXT_SHIFT": ("--context-shift", "--no-context-shift"), "PERF": ("--perf", "--no-perf"),
    "SHOW_TIMINGS": ("--show-timings", "--no-show-timings"), "KV_OFFLOAD": ("--kv-offload", "-nkvo"),
    "REPACK": ("--repack", "-nr"), "CONT_BATCHING": ("--cont-batching", "-nocb"),
    "MMPROJ_AUTO": ("--mmproj-auto", "--no-mmproj"), "MMPROJ_OFFLOAD": ("--mmproj-offload", "--no-mmproj-offload"),
    "CORS_CREDENTIALS": ("--cors-credentials", "--no-cors-credentials"),
    "UI_MCP_PROXY": ("--webui-mcp-proxy", "--no-ui-mcp-proxy"), "AGENT": ("--agent", "-no-ag"),
    "UI": ("--webui", "--no-ui"), "CACHE_PROMPT": ("--cache-prompt", "--no-cache-prompt"),
    "ENDPOINT_SLOTS": ("--slots", "--no-slots"), "MODELS_AUTOLOAD": ("--models-autoload", "--no-models-autoload"),
    "JINJA": ("--jinja", "--no-jinja"), "REASONING_PRESERVE": ("--reasoning-preserve", "--no-reasoning-preserve"),
    "SKIP_CHAT_PARSING": ("--skip-chat-parsing", "--no-skip-chat-parsing"),
    "PREFILL_ASSISTANT": ("--prefill-assistant", "--no-prefill-assistant"),
    "LOG_JSONL": ("--log-jsonl", "--no-log-jsonl"), "LOG_PREFIX": ("--log-prefix", "--no-log-prefix"),
    "LOG_TIMESTAMPS": ("--log-timestamps", "--no-log-timestamps"),
    "SPEC_DRAFT_BACKEND_SAMPLING": ("--spec-draft-backend-sampling", "--no-spec-draft-backend-sampling"),
}


def env_argv(parser, argv, environ=None):
    """What the environment adds to argv, as llama-server reads it.

    Returns (flags to put before argv, {dest: variable} for error messages, variables ignored:
    flags this parser lacks).  A variable whose flag (any of its spellings) argv gives is skipped:
    the command line wins.  Raises ValueError for a boolean that is neither true nor false."""
    environ = os.environ if environ is None else environ
    known = parser._option_string_actions
    given = {known[a.split("=", 1)[0]].dest for a in argv
             if a.startswith("-") and a.split("=", 1)[0] in known}
    out, sources, ignored = [], {}, []
    for table in (VALUE, SWITCH, BOOL):
        for name, flag in table.items():
            var, neg_var = f"LLAMA_ARG_{name}", f"LLAMA_ARG_NO_{name}"
            value = environ.get(var)
            if table is BOOL and neg_var in environ:          # llama.cpp: the NO_ form means false
                var, value = neg_var, "0"
            if value is None:
                continue
            pos, neg = flag if table is BOOL else (flag, None)
            action = known.get(pos)
            if action is None:
                ignored.append(var)
                continue
            if action.dest in given:
                continue
            if table is VALUE:
                out.append(f"{pos}={value}")
            elif table is SWITCH:
                if value in TRUE:
                    out.append(pos)
            elif value in TRUE:
                out.append(pos)
            elif value in FALSE:
                if neg in known:
                    out.append(neg)
            else:
                raise ValueError(f"{var}={value!r} is not a boolean (1, true, on, enabled; 0, false, off, disabled)")
            sources[action.dest] = var
    return out, sources, ignored


def warn_ignored(prog, ignored):
    if ignored:
        print(f"{prog}: warning: ignored (flags alpaca2 serve does not have): {', '.join(sorted(ignored))}",
              file=sys.stderr)
