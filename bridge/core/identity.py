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
