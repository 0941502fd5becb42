"""The HTTP dialects this bridge serves, by the name broker.yaml's http.mounts gives them (the
defaults are in bridge/config.py). Adding a dialect: a package under bridge/http/ exporting a
`DIALECT` (see README, "Adding a dialect"), a line here, a default mount in the config."""

from __future__ import annotations

from collections.abc import Mapping

from bridge.config import mount_paths
from bridge.http import docs, firmware, portal, provisioning, things_gateway, upgrader
from bridge.http.common.dialect import Dialect, Mounted

DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        things_gateway.DIALECT,
        portal.DIALECT,
        upgrader.DIALECT,
        provisioning.DIALECT,
        firmware.DIALECT,
    )
}


def mount(mounts: Mapping[str, str | list[str]]) -> list[Mounted]:
    """Every dialect where `mounts` puts it (a dialect at several mounts: its operation ids carry
    the mount from the second on, as OpenAPI wants them unique), and the API's own description at
    the root; the deepest mount first, so that it claims its paths before a mount above it does."""
    placed = [
        Mounted(DIALECTS[name], where, alias=index > 0)
        for name, places in mounts.items()
        for index, where in enumerate(mount_paths(places))
    ]
    placed.append(Mounted(docs.META, ""))
    return sorted(placed, key=lambda m: -len(m.mount))
