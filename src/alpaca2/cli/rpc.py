"""``alpaca2 rpc-server``: hold and compute layers for a model on another machine (llama.cpp's RPC)."""
from __future__ import annotations

import sys

from alpaca2.cli import args as A


def add_parser(sub) -> None:
    r = sub.add_parser("rpc-server", help="hold and compute layers for a model on another machine (llama.cpp's RPC)",
                       description="Run llama.cpp's RPC server: clients (alpaca2 ... --rpc HOST:PORT, or "
                       "llama.cpp's --rpc) put layers here. No authentication: private networks only.")
    r.add_argument("-H", "--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    r.add_argument("-p", "--port", type=A.port, default=50052, help="port (default 50052)")
    r.add_argument("-t", "--threads", type=A.threads_type, default=None,
                   help="CPU threads (default / -1: half the cores)")
    r.add_argument("-d", "--device", default=None,
                   help="devices to serve, comma-separated names from 'alpaca2 info' (default: the GPUs, else CPU)")
    r.add_argument("-c", "--cache", action="store_true",
                   help="cache received weights in ~/.cache/llama.cpp/rpc: a reload sends hashes, not weights")
    r.set_defaults(func=cmd_rpc_server)


def cmd_rpc_server(args) -> int:
    import signal
    from alpaca2 import rpc
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"alpaca2: WARNING: serving on {args.host}: llama.cpp's RPC protocol has no authentication and "
              "no encryption; anyone who reaches this port can use this machine's memory and compute. "
              "Private networks only.", file=sys.stderr)
    # llama.cpp's server loop never returns to Python: Ctrl+C and SIGTERM end the process at once
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devices = [d for d in (args.device or "").split(",") if d]
    rpc.serve(args.host, args.port, n_threads=A.threads(args), devices=devices, cache=args.cache)
    return A.EXIT_ERROR
