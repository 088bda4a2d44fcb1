"""Check-in: which devices of a fleet are available, from their retained status messages.

Devices announce themselves on `fedge/<fleet>/status/<id>` (retained, `online` / `training` /
`offline`, the last will saying `offline`). A device is available for selection when its last
status is `online`, or when the server has just accepted its update (it is done training,
its `online` status may still be on its way).
"""

from __future__ import annotations

import logging
import threading
import time

from device_runtime.protocol import ProtocolError, decode_status

logger = logging.getLogger(__name__)


class DeviceRegistry:
    """The last known state of every device that has announced itself; thread-safe."""

    def __init__(self) -> None:
        """No device known yet."""
        self._states: dict[str, str] = {}
        self._changed = threading.Condition()
        self._changed_at = time.monotonic()  # when a device's state last changed

    def on_status(self, device_id: str, payload: bytes) -> None:
        """Record a status message; an empty payload (a cleared retained status) forgets the device."""
        if not payload:
            state = None
        else:
            try:
                state = decode_status(payload)["state"]
            except ProtocolError as error:
                logger.warning("ignoring a malformed status from %s: %s", device_id, error)
                return
        with self._changed:
            if state is None:
                self._states.pop(device_id, None)
            else:
                self._states[device_id] = state
            self._changed_at = time.monotonic()
            self._changed.notify_all()
        logger.debug("device %s: %s", device_id, state or "forgotten")

    def mark_idle(self, device_id: str) -> None:
        """The server accepted this device's update: it has finished training."""
        with self._changed:
            if self._states.get(device_id) == "training":
                self._states[device_id] = "online"
                self._changed_at = time.monotonic()
                self._changed.notify_all()

    def known(self, device_id: str) -> bool:
        """Whether the device has ever announced itself (and not been forgotten)."""
        with self._changed:
            return device_id in self._states

    def available(self) -> list[str]:
        """The ids of the devices that are online and idle, sorted."""
        with self._changed:
            return sorted(device for device, state in self._states.items() if state == "online")

    def wait_for(self, count: int, timeout: float, stop: threading.Event, *, enough: int | None = None,
                 settle: float = 0.0) -> list[str]:
        """The available devices once there are `count` of them; or once there are `enough` while the whole fleet,
        busy devices included, is smaller than `count` and no device has changed state for `settle` seconds (it
        will not grow); or whatever is available after `timeout` or a stop."""
        end = time.monotonic() + timeout
        with self._changed:
            while not stop.is_set():
                available = sorted(d for d, state in self._states.items() if state == "online")
                reachable = sum(state in ("online", "training") for state in self._states.values())
                now = time.monotonic()
                settled = (enough is not None and enough <= len(available) and reachable < count
                           and now - self._changed_at >= settle)
                if len(available) >= count or settled or now >= end:
                    return available
                self._changed.wait(min(end - now, 0.2))
        return self.available()
