"""python -m alpaca2: the same as the alpaca2 command."""
import sys

from alpaca2.cli import main

sys.exit(main())
