"""The app: routes, authentication, errors and metrics around the API layers; its lifecycle
(load the model, start the decode thread, listen, drain on SIGINT/SIGTERM).

**Why Starlette + uvicorn.**  The server needs an ASGI toolkit that streams responses, notices a
client that went away, and shuts down gracefully on SIGINT/SIGTERM -- and nothing more: no
validation framework, no dependency injection, no OpenAPI generator.  Starlette is that toolkit
(FastAPI is Starlette plus pydantic models we would not use), has two small pure-Python
dependencies (anyio, typing-extensions) and is maintained by the Encode team, who also keep
uvicorn, the reference ASGI server (h11 for HTTP/1.1, graceful shutdown with a timeout).  Both
are imported only when the server starts, so ``import alpaca2`` never needs them.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import alpaca2
from alpaca2._core import Model
from alpaca2.sampling import LLAMA_CPP_SAMPLING
from alpaca2.server import gcp
from alpaca2.server.anthropic import AnthropicRoutes
from alpaca2.server.args import ngram_settings
from alpaca2.server.connections import guarded_protocol, limits_for, quiet_accept_errors
from alpaca2.server.engine import Engine
from alpaca2.server.generation import Generation
from alpaca2.server.llama_api import LlamaRoutes
from alpaca2.server.lora import LoraSet
from alpaca2.server.openai_api import OpenAIRoutes
from alpaca2.server.sleep import SleepWatch, reads_state
from alpaca2.server.sse import BODY_SEND
from alpaca2.server.streams import StreamSessions
from alpaca2.server.tools import ToolChat
from alpaca2.server.validation import APIError
from alpaca2.templates import JinjaTemplate, ModelTemplate, Template, choose_template

EXIT_OK, EXIT_ERROR, EXIT_MISSING_DEPENDENCY = 0, 1, 3


class Server(OpenAIRoutes, ToolChat, LlamaRoutes, AnthropicRoutes, Generation):
    """The HTTP side: parses requests, hands jobs to the Engine, formats the answers.

    Around the routes (in __call__): CORS (answers preflight OPTIONS itself), the API key
    (every path but /health), per-endpoint request counts for /metrics (successful monitoring
    reads are left out), and the recording of
    resumable streams (alpaca2.server.streams)."""

    def __init__(self, model: Model, engine: Engine, *, model_id: str, template="auto", api_keys=(),
                 max_body=1 << 20, max_tokens_limit=None, n_predict=-1, sampling=None, seed=None,
                 shutdown_timeout=10.0, cors_origins="*", metrics=True, slots=True, props=False,
                 slot_save_path=None, reranking=False, body_timeout=600.0, aliases=(), tags=(),
                 formatter=None, reasoning_format="deepseek", chat_template_kwargs=None, verbose=False,
                 sleep_idle_seconds=-1, reasoning_budget=-1, reasoning_budget_message="", builtin_tools=None,
                 cors_proxy=None):
        self.model = model
        self.engine = engine
        self.model_id = model_id
        self.model_names = {model_id, os.path.basename(model.path), *aliases}
        self.tags = list(tags)
        self.template = template if isinstance(template, Template) else choose_template(model, template)
        # the Jinja template (alpaca2._common.ChatFormatter) for tools and reasoning; None: --no-jinja
        # or no Jinja template at hand (then requests with tools get 400, as llama-server's)
        self.formatter = formatter or getattr(self.template, "formatter", None)
        self.reasoning_format = reasoning_format
        self.reasoning_budget = reasoning_budget                  # thinking tokens (-1: no budget)
        self.reasoning_budget_message = reasoning_budget_message  # said before the forced end of thinking
        self.live_completions = {}    # chat completion id -> its jobs, while it runs (reasoning control)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.verbose = verbose          # answers carry llama-server's __verbose (the prompt), as with its -v
        self.enable_thinking = bool(self.formatter is not None and self.formatter.supports_thinking)
        if isinstance(api_keys, str):
            api_keys = [api_keys]
        self.api_keys = [k.encode() for k in api_keys if k]
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.max_tokens_limit = max_tokens_limit or engine.n_ctx_slot
        self.n_predict = n_predict
        self.sampling = dict(LLAMA_CPP_SAMPLING, **(sampling or {}))
        self.seed = seed
        self.shutdown_timeout = shutdown_timeout
        self.cors_origins = [o.strip() for o in (cors_origins or "").split(",") if o.strip()]
        self.metrics_enabled = metrics
        self.slots_enabled = slots
        self.props_writable = props
        self.slot_save_path = slot_save_path
        self._metrics_bucket = (0, 0.0, 0, 0.0)   # what the previous /metrics scrape saw
        self.sleep_watch = SleepWatch(engine, sleep_idle_seconds) if sleep_idle_seconds > 0 else None
        if slot_save_path:                  # as llama-server: made at startup
            os.makedirs(slot_save_path, exist_ok=True)
        self.reranking = reranking
        self.builtin_tools = builtin_tools      # --tools: alpaca2.server.builtin_tools.BuiltinTools, or None
        self.cors_proxy = cors_proxy            # --ui-mcp-proxy: alpaca2.server.cors_proxy.CorsProxy, or None
        self.system_fingerprint = f"b-alpaca2-{alpaca2.__version__}"
        self.created = int(time.time())
        self.streams = StreamSessions()            # resumable streams (X-Conversation-Id, /v1/stream)
        self.requests = collections.Counter()      # (endpoint, status) -> count
        self.latency_sum = collections.Counter()   # endpoint -> seconds
        self.app = self._build_app()

    # -- ASGI ----------------------------------------------------------------------------------
    def _build_app(self):
        from starlette.applications import Starlette

        from starlette.routing import Route
        routes = self.openai_routes() + self.llama_routes() + self.anthropic_routes() + self.streams.routes()
        routes += [Route("/tools", self.tools_list, methods=["GET"]),
                   Route("/tools", self.tools_call, methods=["POST"]),
                   Route("/cors-proxy", self.cors_proxy_call, methods=["GET", "POST"])]
        if gcp.enabled():               # Vertex AI's custom-container contract (AIP_MODE=PREDICTION)
            post_paths = [r.path for r in routes if "POST" in (r.methods or ())]
            routes += gcp.routes(self, post_paths, self.health)
        app = Starlette(routes=routes)
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(404, self._not_found)
        app.add_exception_handler(405, self._not_allowed)
        app.add_exception_handler(Exception, self._internal_error)
        self._paths = {r.path for r in routes}
        return app

    async def __call__(self, scope, receive, send):
        """CORS, authentication and per-request metrics around the Starlette app."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self._paths else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = [0]
        t0 = time.monotonic()
        cors = self._cors_headers(scope)
        if path == "/metrics":        # as llama-server: when the process started
            cors = cors + [(b"Process-Start-Time-Unix", str(self.created).encode())]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if cors:
                    message = dict(message, headers=list(message.get("headers", [])) + cors)
            await send(message)
        scope[BODY_SEND] = send           # streamed body chunks: send_status only looks at the start
        try:
            if scope["method"] == "OPTIONS":          # a CORS preflight: no key needed, no body
                await send_status({"type": "http.response.start", "status": 200,
                                   "headers": [(b"content-length", b"0")]})
                await send_status({"type": "http.response.body", "body": b""})
                return
            if self.api_keys and path != "/health" and not self._authorized(scope):
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>' "
                               "or 'x-api-key: <key>'", type="authentication_error", code="invalid_api_key")
                await self._send_error(err, send_status)
                return
            if self.sleep_watch is not None and self.sleep_watch.wakes(scope["method"], path):
                await self.sleep_watch.enter()
                try:
                    await self.streams.record(self.app, scope, receive, send_status)
                finally:
                    self.sleep_watch.leave()
            else:
                await self.streams.record(self.app, scope, receive, send_status)
        finally:
            # successful monitoring reads are not counted: scraping /metrics (or polling /health,
            # /props) must not change what the next scrape reads, asleep or awake
            if not (reads_state(scope["method"], path) and 200 <= status[0] < 400):
                self.requests[(endpoint, status[0] or 499)] += 1
                self.latency_sum[endpoint] += time.monotonic() - t0

    async def tools_list(self, request):
        """GET /tools: the built-in tools --tools enabled and the MCP servers' tools (403 without
        either, as llama-server)."""
        return self._json(self._tools().listing())

    async def tools_call(self, request):
        """POST /tools: run one built-in or MCP tool (builtin_tools.py, mcp.py)."""
        return await self._tools().call(request)

    def _tools(self):
        if self.builtin_tools is None:
            raise APIError(403, "this feature is disabled", type="feature_disabled")
        return self.builtin_tools

    async def cors_proxy_call(self, request):
        """GET/POST /cors-proxy?url=...: the web UI's MCP proxy (cors_proxy.py; 403 without --ui-mcp-proxy)."""
        if self.cors_proxy is None:
            raise APIError(403, "this feature is disabled", type="feature_disabled")
        return await self.cors_proxy.handle(request)

    def _cors_headers(self, scope) -> list:
        """llama-server's CORS answer: the Origin reflected when it is allowed ('*': any;
        'localhost': this machine's), with credentials, methods and headers."""
        origin = None
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                origin = value.decode("latin-1")
                break
        if origin is None or not self._origin_allowed(origin):
            return []
        # spelled as llama-server sends them (h11 keeps the case; some clients compare it)
        return [(b"Access-Control-Allow-Origin", origin.encode("latin-1")),
                (b"Access-Control-Allow-Credentials", b"true"),
                (b"Access-Control-Allow-Methods", b"GET, POST, DELETE, OPTIONS"),
                (b"Access-Control-Allow-Headers", b"*")]

    def _origin_allowed(self, origin: str) -> bool:
        for allowed in self.cors_origins:
            if allowed == "*" or allowed == origin:
                return True
            if allowed == "localhost" and _LOCAL_ORIGIN.fullmatch(origin):
                return True
        return False

    def _authorized(self, scope) -> bool:
        token = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
            elif name == b"x-api-key" and token is None:
                token = value.strip()
        if token is None:
            return False
        ok = False
        for key in self.api_keys:           # constant time, every key compared
            ok |= hmac.compare_digest(token, key)
        return ok

    @staticmethod
    async def _send_error(err: APIError, send):
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _json(data, status=200, headers=None):
        from starlette.responses import Response
        return Response(json.dumps(data, ensure_ascii=False), status_code=status, headers=headers,
                        media_type="application/json")

    async def _api_error(self, request, exc: APIError):
        return self._json(exc.body(), exc.status, exc.headers)

    async def _not_found(self, request, exc):
        return self._json(APIError(404, f"no such endpoint: {request.method} {request.url.path}",
                                   type="not_found_error", code="not_found").body(), 404)

    async def _not_allowed(self, request, exc):
        return self._json(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed").body(), 405)

    async def _internal_error(self, request, exc):
        return self._json(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(), 500)


_LOCAL_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?")


def _listen_socket(host, port):
    """A bound, listening socket (so --port 0 can report the port it got)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def chat_templates(model, args):
    """(the template of plain chats, the Jinja ChatFormatter or None), as llama-server picks them:
    with Jinja on (its default; off with --no-jinja) the Jinja source is --chat-template(-file) or
    the model's own.  alpaca2's choice for plain chats stays where it applies: Alpaca-2 models
    (--template auto) keep the Alpaca-2 format unless --jinja is given, and use the Jinja template
    only for requests with tools."""
    name = args.chat_template or args.template
    custom = name not in ("auto", "alpaca2", "model", "completion")
    source = name if custom else model.chat_template
    formatter = None
    if args.jinja is not False and source:
        try:
            from alpaca2._common import ChatFormatter
        except ImportError:          # a build without llama.cpp's common library: built-in templates only
            ChatFormatter = None
        if ChatFormatter is not None and custom:
            formatter = ChatFormatter(model, template=source)
        elif ChatFormatter is not None:
            try:
                formatter = ChatFormatter(model, template=source)
            except ValueError as e:       # the model's own template: serve on with the built-in ones
                print(f"alpaca2: WARNING: the model's chat template does not work with Jinja ({e}); "
                      "tools are off", file=sys.stderr)
    if custom:
        return (JinjaTemplate(formatter) if formatter else ModelTemplate(name)), formatter
    template = choose_template(model, name)
    if formatter is not None and (isinstance(template, ModelTemplate) or (args.jinja and name == "auto")):
        template = JinjaTemplate(formatter)
    return template, formatter


def _server_log(verbose: bool):
    """The server's own log (logger alpaca2.server: the prompt cache's steps) on stderr, a line at a
    time: debug lines with --verbose (llama.cpp's server tests read them), else warnings only."""
    logger = logging.getLogger("alpaca2.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("srv  %(funcName)12.12s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def serve(args, model_path: str, model_kwargs: dict | None = None) -> int:
    """Load the model, start the decode thread and serve until SIGINT/SIGTERM; returns the exit code.

    ``args``: the namespace of alpaca2.server.args' parser; ``model_kwargs``: more Model(...)
    arguments (mmap, RPC servers, tensor split)."""
    hosts = [h.strip() for h in args.host.split(",") if h.strip()]       # llama-server: several, comma-separated
    if any(h not in ("127.0.0.1", "localhost", "::1") for h in hosts) and not args.api_keys:
        print(f"alpaca2: WARNING: serving on {args.host} without --api-key: anyone who reaches this port "
              "can use the model", file=sys.stderr)
    cors_proxy = None
    if getattr(args, "ui_mcp_proxy", False):
        try:
            from alpaca2.server.cors_proxy import CorsProxy
            cors_proxy = CorsProxy(max_body=args.max_body, body_timeout=args.timeout)
        except ImportError:
            raise ValueError("--ui-mcp-proxy needs httpx: pip install httpx") from None
        print("alpaca2: WARNING: the MCP CORS proxy is on (--ui-mcp-proxy: /cors-proxy fetches any http(s) URL "
              "from this machine for anyone with the API key); do not use in untrusted environments",
              file=sys.stderr)
    builtin_tools = None
    mcp_configs = getattr(args, "mcp_configs", None) or []
    if args.tools or mcp_configs:       # before the model: a bad --tools-runtime fails fast
        from alpaca2.server.builtin_tools import BuiltinTools
        from alpaca2.server.tool_io import ToolRuntimeError
        mcp = None
        if mcp_configs:
            from alpaca2.server.mcp import McpManager
            mcp = McpManager(mcp_configs)
            mcp.warmup()
            print("alpaca2: WARNING: MCP servers are on (their tools at /tools, for anyone with the API key); "
                  "do not use in untrusted environments", file=sys.stderr)
        try:
            builtin_tools = BuiltinTools(args.tools, args.tools_runtime or "", max_body=args.max_body,
                                         body_timeout=args.timeout, mcp=mcp)
        except ToolRuntimeError as e:
            if mcp is not None:
                mcp.close()
            raise ValueError(f"--tools-runtime: {e}") from None
        if args.tools:
            print("alpaca2: WARNING: built-in tools are on (--tools: files and shell commands on this machine, "
                  "for anyone with the API key); do not use in untrusted environments", file=sys.stderr)
    try:
        return _serve(args, model_path, model_kwargs, builtin_tools, cors_proxy)
    finally:
        if builtin_tools is not None:
            builtin_tools.close()


def _serve(args, model_path, model_kwargs, builtin_tools, cors_proxy=None) -> int:
    import uvicorn
    hosts = [h.strip() for h in args.host.split(",") if h.strip()]
    _server_log(args.verbose)
    model = Model(model_path, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose, **(model_kwargs or {}))
    draft = None
    try:
        if args.model_draft:
            draft = Model(args.model_draft, n_gpu_layers=args.n_gpu_layers_draft, verbose=args.verbose)
        lora = LoraSet(model, args.lora_adapters, apply=not args.lora_init_without_apply)
        engine = Engine(model, n_ctx=args.ctx_size, parallel=args.parallel, n_batch=args.batch_size,
                        n_ubatch=args.ubatch_size, n_threads=args.threads, n_threads_batch=args.threads_batch,
                        queue_size=args.queue, type_k=args.cache_type_k, type_v=args.cache_type_v,
                        flash_attn=args.flash_attn, pooling=args.pooling, draft_model=draft, lookup=args.lookup,
                        n_draft=args.draft_max, n_draft_min=max(1, min(args.draft_min, args.draft_max)),
                        draft_p_min=args.draft_p_min, kv_unified=args.kv_unified, cache_ram=args.cache_ram,
                        cache_idle_slots=args.cache_idle_slots, lora=lora, spec_types=args.spec_type,
                        ctx_checkpoints=args.ctx_checkpoints,
                        spec_options=dict(ngram=ngram_settings(args), synth_len=args.spec_synth_len,
                                          synth_rates=args.spec_synth_rates))
    except BaseException:
        if draft is not None:
            draft.close()
        model.close()
        raise
    try:
        sampling = dict(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repeat_penalty=args.repeat_penalty, penalty_last_n=args.repeat_last_n,
                        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
        template, formatter = chat_templates(model, args)
        aliases = sorted(a.strip() for a in (args.alias or "").split(",") if a.strip())
        model_id = aliases[0] if aliases else os.path.basename(model_path)   # as llama-server: the first, sorted
        srv = Server(model, engine, model_id=model_id, template=template, api_keys=args.api_keys,
                     max_body=args.max_body, max_tokens_limit=args.max_tokens, n_predict=args.n_predict,
                     sampling=sampling, seed=args.seed, shutdown_timeout=args.shutdown_timeout,
                     cors_origins=args.cors_origins, metrics=args.metrics, slots=args.slots, props=args.props,
                     slot_save_path=args.slot_save_path, reranking=args.reranking, body_timeout=args.timeout,
                     aliases=aliases, tags=[t.strip() for t in (args.tags or "").split(",") if t.strip()],
                     formatter=formatter, reasoning_format=args.reasoning_format,
                     chat_template_kwargs=args.template_kwargs, verbose=args.verbose,
                     sleep_idle_seconds=args.sleep_idle_seconds, reasoning_budget=args.reasoning_budget,
                     reasoning_budget_message=args.reasoning_budget_message, builtin_tools=builtin_tools,
                     cors_proxy=cors_proxy)
        port = gcp.port(args.port) if gcp.enabled() else args.port
        socks = [_listen_socket(h, port) for h in hosts]
        host, port = socks[0].getsockname()[:2]
        quiet_accept_errors()
        max_conn, backlog = limits_for(args.max_connections)
        config = uvicorn.Config(srv, log_level="info" if args.verbose else "warning", access_log=args.access_log,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5, lifespan="off",
                                timeout_keep_alive=min(args.timeout, 5), backlog=backlog,
                                http=guarded_protocol(args.header_timeout, max_conn))
        server = _uvicorn_server_class()(config, engine, args.shutdown_timeout,
                                         on_start=srv.sleep_watch.start if srv.sleep_watch else None,
                                         on_stop=builtin_tools.stop if builtin_tools else None)
        shown = f"[{host}]" if ":" in host else host
        print(f"alpaca2: serving {model_id} on http://{shown}:{port}/v1 "
              f"({engine.parallel} slots of {engine.n_ctx_slot} tokens, template {srv.template.name}"
              f"{', API key required' if args.api_keys else ''})", file=sys.stderr, flush=True)
        server.run(sockets=socks)
        print("alpaca2: server stopped", file=sys.stderr, flush=True)
    finally:
        engine.stop()
        if draft is not None:
            draft.close()
        model.close()
    return EXIT_OK


def _uvicorn_server_class():
    import uvicorn

    class UvicornServer(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM ends in a graceful shutdown and exit code 0
        (uvicorn re-raises the signal after shutting down, which would end the process with it).

        On the signal: stop accepting, refuse new requests, let running ones finish for up to
        shutdown_timeout seconds, then end them with an error event (streams end cleanly)."""

        def __init__(self, config, engine, shutdown_timeout, on_start=None, on_stop=None):
            super().__init__(config)
            self.engine = engine
            self.shutdown_timeout = shutdown_timeout
            self.on_start, self.on_stop = on_start, on_stop

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.on_start is not None:
                self.on_start()

        async def shutdown(self, sockets=None):
            self.engine.drain()
            if self.on_stop is not None:        # MCP calls waiting on their servers return now
                self.on_stop()
            timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.engine.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = [signal.SIGINT, signal.SIGTERM]
            original = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in original.items():
                    signal.signal(s, h)
    return UvicornServer
