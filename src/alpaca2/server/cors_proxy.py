"""llama-server's CORS proxy for its web UI's MCP client (--ui-mcp-proxy, experimental there too):
GET or POST /cors-proxy?url=<http(s) URL> makes the same request from this machine and streams the
answer back, so a browser page can reach MCP servers that do not send CORS headers.

What is forwarded, as llama-server: only the request headers named x-llama-server-proxy-header-<name>,
as <name> (never the client's own Authorization, X-Api-Key, Cookie or Proxy-Authorization), less
Accept-Encoding (the answer is passed through as it comes: identity is asked for), Content-Length and
Transfer-Encoding (recomputed) and Host (the target's); a POST's body as it came (within --max-body).
Redirects are followed (at most 20; a credential header is dropped when a redirect leaves the host);
each read or write may wait 600 s.  The answer keeps its status and headers, less Server,
Content-Length, Transfer-Encoding, Keep-Alive, Connection and Access-Control-* (the server's CORS
applies), and its body is streamed through without a size limit, as llama-server streams it.

The security surface is llama-server's: the API key applies to /cors-proxy like to every endpoint,
and any http or https host is reachable, including this machine and private networks; anyone who may
call the API may make this machine fetch those URLs.  Not beyond it: no other scheme, no credentials
in the URL, no proxy or .netrc from the environment, no cookie jar kept between requests.  Stricter
than llama-server: a bad URL is a 400 (there a 500), an unreachable target a 502 in OpenAI's error
shape (there a 500 with a text body), and Set-Cookie is not passed on (a remote site could set cookies
for this server's origin otherwise).  Off by default (403), and with it on, CORS defaults to this
machine's origins (args.py).
"""
from __future__ import annotations

import sys
import urllib.parse

from alpaca2.server.validation import APIError, bad, read_body

HEADER_PREFIX = "x-llama-server-proxy-header-"
TIMEOUT = 600.0                     # seconds, each of connect, read and write (llama-server's)
MAX_REDIRECTS = 20
_DROP_REQUEST = {"accept-encoding", "content-length", "transfer-encoding", "host"}
_DROP_RESPONSE = {"server", "date", "content-length", "transfer-encoding", "keep-alive", "connection", "set-cookie"}


def target_url(raw: str | None) -> str:
    """The ?url= parameter, checked: http or https, a host, no user or password; 400 otherwise."""
    if not raw:
        raise bad("missing 'url' query parameter: /cors-proxy?url=<http(s) URL>", "url")
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port                  # noqa: B018 (a port that is not a number raises here)
    except ValueError as e:
        raise bad(f"invalid target URL: {e}", "url") from None
    if parts.scheme not in ("http", "https"):
        raise bad(f"unsupported URL scheme in target URL: {parts.scheme or '(none)'}", "url")
    if not parts.hostname:
        raise bad("invalid target URL: missing host", "url")
    if "@" in parts.netloc:
        raise bad("authentication in target URL is not supported", "url")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))


def forwarded_headers(headers) -> dict:
    """The x-llama-server-proxy-header-* headers, renamed; everything else stays here."""
    out = {"accept-encoding": "identity"}
    for key, value in headers.items():
        key = key.lower()
        if key.startswith(HEADER_PREFIX):
            name = key[len(HEADER_PREFIX):]
            if name and name not in _DROP_REQUEST:
                out[name] = value
    return out


def answer_headers(raw: list) -> list:
    """The target's answer headers to pass on, as (lowercase name, value) bytes; repeated ones stay."""
    out = []
    for key, value in raw:
        key = key.lower()
        name = key.decode("latin-1")
        if name not in _DROP_RESPONSE and not name.startswith("access-control-"):
            out.append((key, value))
    return out


class CorsProxy:
    """The /cors-proxy endpoint of a server started with --ui-mcp-proxy."""

    def __init__(self, max_body: int = 1 << 20, body_timeout: float | None = None):
        __import__("httpx")     # at start-up: serve() reports it missing
        self.max_body, self.body_timeout = max_body, body_timeout

    async def handle(self, request):
        import httpx
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse
        url = target_url(request.query_params.get("url"))
        body = b""
        if request.method == "POST":
            body = await read_body(request, self.max_body, self.body_timeout)
        # a client per request: no cookies or connections shared between callers; trust_env off:
        # no HTTP(S)_PROXY, no .netrc credentials from this machine's environment
        client = httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS, trust_env=False,
                                   timeout=httpx.Timeout(TIMEOUT))
        try:
            upstream = await client.send(client.build_request(request.method, url, headers=forwarded_headers(
                request.headers), content=body if request.method == "POST" else None), stream=True)
        except (httpx.HTTPError, OSError, ValueError) as e:
            await client.aclose()
            print(f"alpaca2: cors-proxy: {request.method} {url}: {type(e).__name__}: {e}", file=sys.stderr)
            raise APIError(502, f"proxy error: {type(e).__name__}: {e or 'no answer'}", type="server_error",
                           code="proxy_error") from None

        async def close():
            await upstream.aclose()
            await client.aclose()

        async def chunks():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:        # the target broke off: the answer ends here
                print(f"alpaca2: cors-proxy: {url}: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                await close()                   # also when the client leaves mid-answer

        response = StreamingResponse(chunks(), status_code=upstream.status_code, background=BackgroundTask(close))
        response.raw_headers = answer_headers(upstream.headers.raw)
        return response
