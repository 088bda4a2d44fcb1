"""`python -m simulator SCENARIO --broker URL`: the same as `fedge simulate`."""

import sys

from simulator.cli import main

sys.exit(main(prog="python -m simulator"))
