"""Reporting: which device updates a round accepts, and why the others are dropped (counted by reason).

The codec (`decode_update`) checks an update against the model; the checks that need server
state live here: the round is the open one, the device was selected, the deadline has not
passed, the update id is new and the device has not reported yet, the goal is not reached.
Nothing of an update is kept beyond its id and device id, so memory does not grow with the
model times the number of clients.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from device_runtime.protocol import ModelUpdate, ProtocolError, decode_update, topic_device_id

logger = logging.getLogger(__name__)

DROP_REASONS = {
    "malformed": "the topic or the payload fails the codec's checks (docs/protocol.md)",
    "wrong_model": "trained another model than the round's (model hash)",
    "wrong_sender": "the payload's fleet or device id is not the one of the topic it came on",
    "unknown_device": "from a device that never announced itself and is not selected",
    "not_selected": "from a device not selected for the update's round",
    "wrong_round": "for a round other than the open one or the one just closed",
    "late": "arrived after the deadline of its round",
    "after_goal": "its round had already closed with its goal of reports (over-selection)",
    "duplicate_update": "an update id already counted (a QoS 1 redelivery or a replay)",
    "second_update": "the device already reported in this round",
}
_EXPECTED = frozenset({"late", "after_goal"})  # what over-selection and deadlines produce: logged at INFO


@dataclass
class RoundWindow:
    """One round's reporting window and what it has accepted and dropped so far."""

    round: int
    selected: frozenset[str]
    deadline: float
    goal: int
    manifest: Mapping[str, Any]
    accepted: int = 0
    update_ids: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)
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
            return self._drop(window, "malformed", topic, str(error))
        if not self._is_known(device) and device not in window.selected:
            return self._drop(window, "unknown_device", device, "never announced itself")
        try:
            update = decode_update(payload, window.manifest, fleet=self.fleet, device_id=device)
        except ProtocolError as error:
            return self._drop(window, _decode_reason(error), device, str(error))
        reason = self._reason(window, update, device, received_at)
        if reason is not None:
            return self._drop(window, reason, device, f"update {update.update_id} for round {update.round}")
        window.accepted += 1
        window.update_ids.add(update.update_id)
        window.reported.add(device)
        logger.debug("round %d: accepted update %s from %s", window.round, update.update_id, device)
        return update

    def _reason(self, window: RoundWindow, update: ModelUpdate, device: str, received_at: float) -> str | None:
        """Why the open round drops this decoded update, or None to accept it."""
        previous = self.previous
        if update.round != window.round:
            if previous is None or update.round != previous.round:
                return "wrong_round"
            if update.update_id in previous.update_ids:
                return "duplicate_update"
            return "late" if received_at > previous.deadline or previous.closed_by != "goal" else "after_goal"
        if device not in window.selected:
            return "not_selected"
        if received_at > window.deadline:
            return "late"
        if update.update_id in window.update_ids:
            return "duplicate_update"
        if device in window.reported:
            return "second_update"
        if window.accepted >= window.goal:
            return "after_goal"
        return None

    def _open_window(self) -> RoundWindow:
        """The open round's window (a usage error when none is open)."""
        if self.current is None or self.current.closed_by is not None:
            raise RuntimeError("no round is open")
        return self.current

    @staticmethod
    def _drop(window: RoundWindow, reason: str, sender: str, detail: str) -> None:
        """Count a dropped update in the open round's window and log why."""
        window.dropped[reason] += 1
        level = logging.INFO if reason in _EXPECTED else logging.WARNING
        logger.log(level, "round %d: dropped an update from %s: %s (%s)", window.round, sender, reason, detail)
        return None


def _decode_reason(error: ProtocolError) -> str:
    """The drop reason for a codec error: another model, another sender, or malformed."""
    message = str(error)  # decode_update's mismatch errors read "<field> is <got>, expected <want>"
    if message.startswith("model_hash is "):
        return "wrong_model"
    if message.startswith(("fleet is ", "device_id is ")):
        return "wrong_sender"
    return "malformed"
