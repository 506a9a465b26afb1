"""python -m alpaca2.server: the server alone, with llama-server's flags."""
import sys

from alpaca2.server.args import main

argv = sys.argv[1:]
prog = "alpaca2-server"
if argv[:1] == ["--prog"] and len(argv) > 1:     # the name it was started as (after a re-exec)
    prog, argv = argv[1], argv[2:]
sys.exit(main(argv, prog=prog))
