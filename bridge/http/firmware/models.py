"""The firmware dialect's JSON shapes (our design, CATALOG 004): short field names, small
documents a microcontroller can parse. Requests are decoded by these models (wrong types and
unknown fields: 400); the core checks values again."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, UnsetType

from bridge.core import firmware, upgrades
from bridge.http.common.models import Model
from bridge.http.upgrader.models import Priority, VersionStatus

Key = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^/\x00-\x1f\x7f]+$")]
Version = Annotated[str, Meta(min_length=1, max_length=firmware.MAX_VERSION, pattern=r"^[^/\x00-\x1f\x7f]+$")]
Sha256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$", description="SHA-256 of the firmware, hex")]
Size = Annotated[int, Meta(ge=0, description="bytes")]
ProductId = Annotated[str, Meta(pattern="^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


# ---- paths ---------------------------------------------------------------------------------------
class ThingPath(Model):
    thingId: Key


class FirmwarePath(Model):
    thingId: Key
    version: Version


class ProductPath(Model):
    productId: ProductId


class VersionPath(Model):
    productId: ProductId
    version: Version


class SerialPath(Model):
    productId: ProductId
    serialNumber: Key


# ---- the device ----------------------------------------------------------------------------------
class ActivateRequest(Model):
    serialNumber: Annotated[Key, Meta(description="the device's serial number (or MAC address, ...)")]
    product: Annotated[
        ProductId | UnsetType,
        Meta(description="only when the serial number is in several products (400 otherwise)"),
    ] = UNSET


class Activation(Model):
    apiKey: Annotated[
        str, Meta(description="40 hex; returned this once, void at the next activation: send it as X-ApiKey")
    ]
    thingId: str


class Target(Model):
    thingId: str
    currentVersion: Annotated[str | None, Meta(description="the version the device confirmed last")]
    targetVersion: Annotated[
        str | None,
        Meta(description="what checkForUpgrade offers it (rollouts included), else its current one"),
    ]
    size: Size | None
    sha256: Sha256 | None
    firmwareUrl: Annotated[str | None, Meta(description="where to GET the target's firmware (Range)")]


class SwitchRequest(Model):
    version: Version


class Switched(Model):
    thingId: str
    currentVersion: str


# ---- the vendor's owner (operator token) ---------------------------------------------------------
class ProductBody(Model):
    softwareName: Annotated[
        str, Meta(min_length=1, max_length=256, description="an upgrader software of yours")
    ]
    vendor: Annotated[str, Meta(min_length=1, max_length=256, description="a provisioning vendor of yours")]
    model: Annotated[str, Meta(min_length=1, max_length=256, description="a model of that vendor")]
    enabled: bool = True


class Product(Model):
    id: str
    softwareName: str
    vendor: str
    model: str
    enabled: bool


class VersionBody(Model):
    releaseDate: Annotated[str, Meta(description="RFC 3339; the latest release is offered")]
    status: VersionStatus = "OK"
    priority: Priority | UnsetType = UNSET
    releaseNote: Annotated[str, Meta(max_length=upgrades.MAX_TEXT)] | UnsetType = UNSET
    rolloutProfiles: (
        Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=1000)] | UnsetType
    ) = UNSET


class VersionDoc(Model):
    version: str
    releaseDate: str
    status: str
    rolloutProfiles: list[str]
    size: Size | None
    sha256: Sha256 | None
    contentType: str | None


class Imported(Model):
    added: Annotated[int, Meta(ge=0, description="serial numbers enrolled")]


class Serial(Model):
    serialNumber: str
    status: Literal["unused", "enabled", "expired", "activated", "disabled"]
    thingId: str | None


class SerialBody(Model):
    enabled: Annotated[
        bool,
        Meta(description="false: its API key stops working and activations are refused; true: enabled again"),
    ]
