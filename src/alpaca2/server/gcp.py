"""Google Cloud Vertex AI's custom-container contract (AIP_MODE=PREDICTION), as llama-server has it.

With AIP_MODE=PREDICTION in the environment: the port is AIP_HTTP_PORT, AIP_HEALTH_ROUTE answers as
/health, and POST AIP_PREDICT_ROUTE (default /predict) takes {"instances": [...]}: each instance is
a request to one of this server's POST paths, named by "@requestFormat" (a path, or its camelCase
alias: "chatCompletions" for /v1/chat/completions), run concurrently without streaming; the answer
is {"predictions": [each response's JSON, or {"error": ...}]}.
"""
from __future__ import annotations

import asyncio
import os

from alpaca2.server import inprocess
from alpaca2.server.validation import APIError, bad, read_json

MAX_INSTANCES = 128


def enabled() -> bool:
    return os.environ.get("AIP_MODE", "") == "PREDICTION"


def _route(name, default="") -> str:
    v = os.environ.get(name) or default
    return v if not v or v.startswith("/") else "/" + v


def port(default: int) -> int:
    """AIP_HTTP_PORT overrides --port in this mode (as llama-server)."""
    try:
        return int(os.environ.get("AIP_HTTP_PORT", default))
    except ValueError:
        return default


def camel(path: str) -> str:
    """llama-server's path_to_gcp_format: /v1/chat/completions -> chatCompletions."""
    s = path[3:] if path.startswith("/v1") and len(path) > 3 else path
    s = s.lstrip("/")
    out, cap = [], False
    for c in s:
        if c in "{:":
            break
        if c in "/-_":
            cap = True
        else:
            out.append(c.upper() if cap else c)
            cap = False
    return "".join(out)


def routes(server, post_paths: list, health) -> list:
    """The predict route (and the health alias) for Starlette; post_paths: the app's POST paths."""
    from starlette.routing import Route
    aliases = {}
    for p in post_paths:
        aliases.setdefault(camel(p), p)
    predict = _route("AIP_PREDICT_ROUTE", "/predict")
    if predict in post_paths:
        raise SystemExit(f"alpaca2: AIP_PREDICT_ROUTE={predict} conflicts with a route of the server")

    async def handle(request):
        body = await read_json(request, server.max_body, server.body_timeout)
        instances = body.get("instances")
        if not isinstance(instances, list):
            raise bad("request body must include an array field named instances", "instances")
        if len(instances) > MAX_INSTANCES:
            raise bad(f"instances array exceeds maximum size of {MAX_INSTANCES}", "instances")
        headers = inprocess.forwarded(request)
        predictions = await asyncio.gather(*(_one(server, aliases, post_paths, x, headers) for x in instances))
        return server._json({"predictions": list(predictions)})

    out = [Route(predict, handle, methods=["POST"])]
    health_path = _route("AIP_HEALTH_ROUTE")
    if health_path and health_path != "/health":
        out.append(Route(health_path, health, methods=["GET"]))
    return out


def _error(message, status=400):
    return APIError(status, message).body()


async def _one(server, aliases, post_paths, instance, headers):
    if not isinstance(instance, dict):
        return _error("each instance must be a JSON object")
    fmt = instance.get("@requestFormat")
    if not isinstance(fmt, str):
        return _error("each instance must include a string @requestFormat")
    path = aliases.get(fmt) or (fmt if fmt in post_paths else None)
    if path is None:
        return _error(f"no handler registered for @requestFormat: {fmt}")
    payload = {k: v for k, v in instance.items() if k != "@requestFormat"}
    if "stream" in payload:
        payload["stream"] = False            # the predict route does not stream
    _, data = await inprocess.call(server.app, path, payload, headers)
    return data
