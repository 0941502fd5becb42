"""Who a device is, once a credential (certificate, thing token, CIK) was checked: its own module,
because the registry (things.py) and the flows that store what a device sends (messages.py) both
need it and one imports the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceIdentity:
    thing_id: str
    owner_id: str
    # The credential the identity rests on (the certificate id, or a CIK's incarnation): which
    # incarnation of the id this is. Writes made on its behalf are committed only while it is
    # still the thing's enabled credential.
    cert_id: str


class KnownDevices:
    """The registry's identity facts of recently checked things (thing id -> DeviceIdentity), so a
    device that reconnects is checked without a store read (a thread hand-off per CONNECT; issue
    #14). Bounded: the oldest entry goes first. Only enabled identities are kept; every write that
    changes a thing's (delete, disable, re-certify, a new CIK) drops its entry in its own code path
    once it committed, before the thing's sessions are closed (Things._revoke)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: dict[str, DeviceIdentity] = {}

    def get(self, thing_id: str) -> DeviceIdentity | None:
        return self._known.get(thing_id)

    def put(self, device: DeviceIdentity) -> None:
        known = self._known
        if device.thing_id not in known and len(known) >= self.limit:
            del known[next(iter(known))]
        known[device.thing_id] = device

    def drop(self, thing_id: str) -> None:
        self._known.pop(thing_id, None)
