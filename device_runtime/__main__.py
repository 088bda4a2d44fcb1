"""`python -m device_runtime`: the fedge-device command."""

import sys

from device_runtime.cli import main

sys.exit(main())
