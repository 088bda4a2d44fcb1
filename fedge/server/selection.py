"""Selection with over-selection (Bonawitz et al., 2019): pick more devices than the round needs, seeded.

Some selected devices drop out or straggle; selecting ceil(over_selection * goal) of the
available devices and closing the round at `goal` reports keeps rounds short without waiting
for the slowest. The draw depends only on the round seed and the sorted available ids, so a
rerun with the same seed and the same check-ins selects the same devices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable


def over_selected(goal: int, over_selection: float) -> int:
    """How many devices to select for `goal` reports: ceil(over_selection * goal)."""
    return math.ceil(round(over_selection * goal, 9))  # 1.3 * 10 is 13.000000000000002 in floating point


def select_devices(available: Iterable[str], goal: int, over_selection: float, seed: int) -> list[str]:
    """A seeded sample of ceil(over_selection * goal) available devices (all of them when fewer), sorted."""
    candidates = sorted(set(available))
    count = min(len(candidates), over_selected(goal, over_selection))
    return sorted(random.Random(seed).sample(candidates, count))
