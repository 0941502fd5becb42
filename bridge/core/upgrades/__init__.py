"""Software upgrades (Upgrader V2, CATALOG.md 001): the operator's catalog (software, versions,
rollout profiles, accounts grouping devices under a profile), what each device reports (current
versions, upgrade results) and what it is offered (checkForUpgrade, notify). Transport-free: the
HTTP dialect and the MQTT twin (`things/{id}/upgrade/...`, `things/{id}/versions`) call these.

The package: `fields` (what a request may hold, parsed into specs), `catalog` (the catalog in SQL:
lookups, documents, listings), `offers` (checkForUpgrade, notices, what reports change), `hooks`
(where other models follow: firmware targets, the rollout engine) and `service` (Upgrades: one
method per operation, each one store read or write).

Tenancy: every object belongs to the operator (user id) who created it; another operator's object
is NotFound, and a device is resolved only against its own owner's catalog. A device in an account
is a thing of that owner, named by its id or its regId alias.

Offer rule: device -> its account's rollout profile -> the versions of the software targeted at
that profile (every version when the device is in no account) that a staged rollout does not hold
back from it -> the latest by releaseDate. A device is behind when it reports no version of the
software, an unknown one, or one released before the offer."""

from __future__ import annotations

from bridge.core.upgrades.fields import (
    MAX_ITEMS,
    MAX_TEXT,
    PRIORITIES,
    PRIORITY_ALIASES,
    RESULT_STATUSES,
    UPGRADE_TYPES,
    Put,
)
from bridge.core.upgrades.service import Upgrades

__all__ = [
    "MAX_ITEMS",
    "MAX_TEXT",
    "PRIORITIES",
    "PRIORITY_ALIASES",
    "RESULT_STATUSES",
    "UPGRADE_TYPES",
    "Put",
    "Upgrades",
]
