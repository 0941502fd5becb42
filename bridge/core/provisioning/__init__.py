"""Provisioning by serial number (Exosite HTTP Provisioning v1.1, CATALOG.md 002), transport-free:
vendors and their credentials (`vendors`), models, serial numbers, their clients and activation
(`serials`), content entities and their blobs on disk (`content`, `blobs`), groups with typed and
nested members (`groups`), shares of a model with other vendors (`shares`). The HTTP dialect calls
these; `Serials.identify_cik` is the device credential the other dialects accept."""

from __future__ import annotations

from collections.abc import Callable

from bridge.config import ProvisioningConfig
from bridge.core import ids
from bridge.core.outbox import Outbox
from bridge.core.provisioning.blobs import Blobs
from bridge.core.provisioning.content import Content
from bridge.core.provisioning.groups import Groups
from bridge.core.provisioning.serials import Serials
from bridge.core.provisioning.shares import Shares
from bridge.core.provisioning.vendors import Vendors
from bridge.core.things import Things
from bridge.store import Store


class Provisioning:
    def __init__(
        self,
        store: Store,
        things: Things,
        outbox: Outbox,
        cfg: ProvisioningConfig,
        *,
        free_plan_things: int,
        clock: Callable[[], float] = ids.now,
    ) -> None:
        self.vendors = Vendors(store)
        # Blobs live beside the database, under the data directory (`<data_dir>/content/`).
        self.blobs = Blobs(store.path.parent / "content", store, cfg.max_content_size)
        self.serials = Serials(
            store,
            things,
            outbox,
            self.blobs,
            enable_expiry=cfg.enable_expiry,
            free_plan_things=free_plan_things,
            clock=clock,
        )
        self.shares = Shares(store)
        self.content = Content(store, self.blobs, self.serials, clock)
        self.groups = Groups(store, clock)
