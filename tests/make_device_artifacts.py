"""Convert every device-test artifact into DIR: `python tests/make_device_artifacts.py DIR` (needs TensorFlow)."""

from __future__ import annotations

import sys

from device_artifacts import ARTIFACTS, convert


def main(argv: list[str]) -> int:
    """Convert all artifacts into argv[0]; print each path."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for name in ARTIFACTS:
        print(convert(name, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
