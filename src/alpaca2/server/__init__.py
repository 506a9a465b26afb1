"""``alpaca2 serve``: an OpenAI- and llama-server-compatible HTTP server over one model, many clients.

    alpaca2 serve -m MODEL [--host 127.0.0.1] [--port 8080] [-np 4] [--api-key KEY]

The flags are llama-server's (``alpaca2.server.args``), so one can replace the other.

- ``engine``       the scheduler and the decode thread: slots in one KV cache, one batch
                   per step, prefix reuse, cancellation;
- ``openai_api``   /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models;
- ``llama_api``    llama-server's own paths (/health, /metrics ...);
- ``validation``   the OpenAI error shape and request checks;
- ``app``          routes, CORS, the API key, metrics; load, listen, drain on SIGINT/SIGTERM;
- ``args``         the command line, :func:`main`.

**Limits.**  ``-c`` is the KV cache of all slots together (as llama-server's): each request may
use n_ctx / parallel tokens, prompt and answer.  Requests over that, over ``--max-tokens``, or
over ``--max-body`` bytes get 400 in the OpenAI error shape.  A request that finds every slot busy
waits in a bounded queue (``--queue``); past the bound it gets 503 with Retry-After.

Starlette and uvicorn are imported only when the server starts: ``import alpaca2.server`` needs
neither.
"""
from alpaca2.server.args import build_parser, main
from alpaca2.server.validation import APIError

__all__ = ["main", "build_parser", "APIError"]
