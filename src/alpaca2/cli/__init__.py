"""The ``alpaca2`` command (also ``python -m alpaca2``).

    alpaca2 chat -m MODEL ["背一下静夜思"]         interactive multi-turn chat (replaces chat.sh)
    alpaca2 chat --demo                            the same on the demo model (Gemma 3 270M)
    alpaca2 generate -m MODEL -p "床前明月光，"      continue text (base models), streamed
    alpaca2 info [-m MODEL]                        build, devices, and the model's metadata (JSON)
    alpaca2 tokenize -m MODEL TEXT                 token ids and pieces
    alpaca2 bench -m MODEL [-o json]               tokens/sec, llama-bench's tests and keys
    alpaca2 rpc-server [--host H] [--port P]       serve layers to other machines (llama.cpp's RPC)
    alpaca2 serve -m MODEL [--port 8080]           OpenAI-compatible HTTP server (alpaca2.server)

Flags have llama-cli's names and meanings (-c, -n, -t, -b, -ub, -fa, -ctk, -ctv, -r, -f,
--rope-*, --yarn-*, --grammar, --lora ...).  Sampling defaults are chat.sh's: -c 4096 --temp 0.5
--top-k 40 --top-p 0.9 --repeat-penalty 1.1.  A bad flag value is one line on stderr and exit
code 2.  With stdin not a terminal, chat reads one instruction per line and prints one answer per
line (newlines inside an answer become spaces).

One module per command (chat.py, generate.py, info.py, bench.py, rpc.py); the shared flag
groups are in args.py.  ``serve`` hands its arguments to alpaca2.server, which parses them.
"""
from __future__ import annotations

import os
import sys

from alpaca2.cli.args import (  # noqa: F401  (the names scripts and benchmarks import from alpaca2.cli)
    DEMO_N_PREDICT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Parser, demo_model_path,
    rpc_kwargs as _rpc_kwargs)


def build_parser() -> Parser:
    """The parser of every command but serve's own flags (alpaca2.server parses those)."""
    from alpaca2.cli import bench, chat, generate, info, rpc
    p = Parser(prog="alpaca2", description="Chinese-LLaMA-2 / Chinese-Alpaca-2 on llama.cpp")
    sub = p.add_subparsers(dest="command", required=True)
    chat.add_parser(sub)
    generate.add_parser(sub)
    info.add_parsers(sub)
    bench.add_parser(sub)
    rpc.add_parser(sub)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server; many clients share the model "
                   "(alpaca2 serve --help)", add_help=False)
    return p


def _serve(argv) -> int:
    """``alpaca2 serve ARGS``: alpaca2.server parses ARGS (llama-server's flags) and runs."""
    from alpaca2 import server     # imported here: the server needs its extra (Starlette, uvicorn)
    return server.main(argv)


def main(argv=None) -> int:
    """Run the command line ``argv`` (default sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    if hasattr(args, "default_n_predict") and args.n_predict is None:
        args.n_predict = DEMO_N_PREDICT if args.demo else args.default_n_predict
    return _run(args.func, args)


def _run(func, args) -> int:
    import logging
    import alpaca2
    from alpaca2.errors import Alpaca2Error
    if not getattr(args, "verbose", False):
        alpaca2.set_log_level(logging.ERROR)    # llama.cpp's warnings about the file are not for users
    try:
        model = getattr(args, "model", None)
        if model and not os.path.exists(model) and (
                model.endswith(".gguf") and model.count("/") != 2
                or model.startswith((".", "/", "~")) or os.path.isdir(model.split("/", 1)[0])):
            print(f"alpaca2: model file not found: {model}", file=sys.stderr)
            return EXIT_ERROR
        return func(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("alpaca2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except (Alpaca2Error, ValueError, OSError) as e:
        print(f"alpaca2: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
