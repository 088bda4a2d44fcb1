"""Reporting: which device updates a round accepts, and why the others are dropped (counted by reason).

The codec (`decode_update`) checks an update against the model; the checks that need server
state live here: the round is the open one, the device was selected, the deadline has not
passed, the update id is new and the device has not reported yet, the goal is not reached.
Nothing of an update is kept beyond its id and device id, so memory does not grow with the
model times the number of clients.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from device_runtime.protocol import Fault, ModelUpdate, ProtocolError, decode_update, topic_device_id
from device_runtime.manifest import Manifest

logger = logging.getLogger(__name__)

class DropReason(str, enum.Enum):
    """Why a round dropped an update; the value is the key in the round's `dropped` counts (metrics log);
    docs/server.md says what each means."""

    MALFORMED = "malformed"
    WRONG_JOB = "wrong_job"
    WRONG_MODEL = "wrong_model"
    WRONG_SENDER = "wrong_sender"
    UNKNOWN_DEVICE = "unknown_device"
    NOT_SELECTED = "not_selected"
    WRONG_ROUND = "wrong_round"
    LATE = "late"
    AFTER_GOAL = "after_goal"
    DUPLICATE_UPDATE = "duplicate_update"
    SECOND_UPDATE = "second_update"

    @property
    def expected(self) -> bool:
        """Whether over-selection and deadlines produce it in a healthy fleet (logged at INFO, not WARNING)."""
        return self in (DropReason.LATE, DropReason.AFTER_GOAL)


def surplus_and_refused(dropped: Mapping[str, int]) -> tuple[int, int]:
    """A round's `dropped` counts split into the surplus a healthy fleet produces (after the goal or the deadline)
    and the updates its checks refused (everything else): what a user should and should not worry about."""
    expected = {reason.value for reason in DropReason if reason.expected}  # an unknown name (an older log): refused
    surplus = sum(count for reason, count in dropped.items() if reason in expected)
    return surplus, sum(dropped.values()) - surplus


_DECODE_REASONS = {Fault.MALFORMED: DropReason.MALFORMED, Fault.WRONG_MODEL: DropReason.WRONG_MODEL,
                   Fault.WRONG_SENDER: DropReason.WRONG_SENDER}


@dataclass
class RoundWindow:
    """One round's reporting window (the round of job `run_id`) and what it has accepted and dropped so far."""

    run_id: str
    round: int
    selected: frozenset[str]
    deadline: float
    goal: int
    manifest: Manifest
    accepted: int = 0
    update_ids: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    dropped: Counter[DropReason] = field(default_factory=Counter)
    closed_by: str | None = None


class ReportGate:
    """Accepts or drops each update of a fleet for the open round; drops are counted in that round's window."""

    def __init__(self, fleet: str, is_known: Callable[[str], bool]) -> None:
        """`is_known(device_id)` says whether a device has announced itself (check-in)."""
        self.fleet = fleet
        self._is_known = is_known
        self.current: RoundWindow | None = None
        self.previous: RoundWindow | None = None

    def open(self, window: RoundWindow) -> None:
        """Start accepting updates for `window`'s round; the round before stays known, to name late reports."""
        if self.current is not None:
            self.previous = self.current
        self.current = window

    def close(self, closed_by: str) -> RoundWindow:
        """Stop accepting for the open round ('goal', 'deadline' or 'interrupted'); returns its window."""
        window = self._open_window()
        window.closed_by = closed_by
        return window

    def check(self, topic: str, payload: bytes, received_at: float) -> ModelUpdate | None:
        """The decoded update if the open round accepts it, else None after counting and logging the reason."""
        window = self._open_window()
        try:
            device = topic_device_id(topic, self.fleet)
        except ProtocolError as error:
            return self._drop(window, DropReason.MALFORMED, topic, str(error))
        if not self._is_known(device) and device not in window.selected:
            return self._drop(window, DropReason.UNKNOWN_DEVICE, device, "never announced itself")
        try:
            update = decode_update(payload, window.manifest, fleet=self.fleet, device_id=device)
        except ProtocolError as error:
            return self._drop(window, _DECODE_REASONS[error.fault], device, str(error))
        reason = self._reason(window, update, device, received_at)
        if reason is not None:
            return self._drop(window, reason, device, f"update {update.update_id} for round {update.round}")
        window.accepted += 1
        window.update_ids.add(update.update_id)
        window.reported.add(device)
        logger.debug("round %d: accepted update %s from %s", window.round, update.update_id, device)
        return update

    def _reason(self, window: RoundWindow, update: ModelUpdate, device: str,
                received_at: float) -> DropReason | None:
        """Why the open round drops this decoded update, or None to accept it."""
        previous = self.previous
        if update.run_id != window.run_id:
            return DropReason.WRONG_JOB
        if update.round != window.round:
            if previous is None and update.round == window.round - 1:
                return DropReason.LATE  # the round before a resumed one closed in the earlier run
            if previous is None or update.round != previous.round:
                return DropReason.WRONG_ROUND
            if update.update_id in previous.update_ids:
                return DropReason.DUPLICATE_UPDATE
            late = received_at > previous.deadline or previous.closed_by != "goal"
            return DropReason.LATE if late else DropReason.AFTER_GOAL
        if device not in window.selected:
            return DropReason.NOT_SELECTED
        if received_at > window.deadline:
            return DropReason.LATE
        if update.update_id in window.update_ids:
            return DropReason.DUPLICATE_UPDATE
        if device in window.reported:
            return DropReason.SECOND_UPDATE
        if window.accepted >= window.goal:
            return DropReason.AFTER_GOAL
        return None

    def _open_window(self) -> RoundWindow:
        """The open round's window (a usage error when none is open)."""
        if self.current is None or self.current.closed_by is not None:
            raise RuntimeError("no round is open")
        return self.current

    @staticmethod
    def _drop(window: RoundWindow, reason: DropReason, sender: str, detail: str) -> None:
        """Count a dropped update in the open round's window and log why."""
        window.dropped[reason] += 1
        level = logging.INFO if reason.expected else logging.WARNING
        logger.log(level, "round %d: dropped an update from %s: %s (%s)", window.round, sender, reason.value, detail)
        return None
