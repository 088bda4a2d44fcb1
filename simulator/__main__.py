"""`python -m simulator SCENARIO|JOB.toml --broker URL`: only the emulated fleet, against a broker and a server started
elsewhere (`fedge simulate` runs a whole job: broker, server and this fleet)."""

import sys

from simulator.cli import main

sys.exit(main(prog="python -m simulator"))
