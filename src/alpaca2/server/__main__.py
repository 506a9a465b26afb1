"""python -m alpaca2.server: the server alone, with llama-server's flags."""
import sys

from alpaca2.server.args import main

sys.exit(main(prog="alpaca2-server"))
