"""The partner-portal dialect's JSON shapes. Requests are open: fields the document does not name
are ignored, as device firmware may send more than we read."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta

from bridge.core.status import API_VERSION, REPORTED_VERSION_KEYS
from bridge.http.common.models import (
    AppParam,
    Model,
    OpenModel,
    PackageData,
    PackageUrl,
    PackageVersion,
    UpdateRate,
)

_REPORTED_VERSION = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+$"}],
    "description": "the package version the device runs, as an integer or a string of digits (other "
    "values are ignored); the first of " + ", ".join(REPORTED_VERSION_KEYS) + " that is one counts",
}


def _device_info(description: str) -> Any:
    """DeviceInfo / info: free-form objects, but a reported version in them is read."""
    return Annotated[
        dict[str, Any],
        Meta(
            description=description,
            extra_json_schema={"properties": dict.fromkeys(REPORTED_VERSION_KEYS, _REPORTED_VERSION)},
        ),
    ]


class RegIdQuery(OpenModel, kw_only=True):
    regId: (
        Annotated[
            str,
            Meta(
                description="the device's registration id (or its thing id); required unless the request "
                "carries the device's credential"
            ),
        ]
        | None
    ) = None


class SetStatusQuery(RegIdQuery):
    status: Annotated[str, Meta(min_length=1, max_length=256, examples=["Alive"])]


class GetURLRequest(RegIdQuery):
    DeviceInfo: _device_info("Device info as [name]: [value].") | None = None


class SetStatusRequest(SetStatusQuery):
    info: _device_info("Any other parameters about the status; stored as reported.") | None = None


class GetConfigRequest(RegIdQuery):
    DeviceInfo: _device_info("Device info as [name]: [value]; not used.") | None = None


_ENDPOINT = Meta(
    pattern="^(GET|POST) https?://", description='"<METHOD> <absolute URL>": the variant the device used'
)


class GetURLResponse(Model):
    packageUrl: PackageUrl
    version: PackageVersion
    data: PackageData
    setStatusUrl: Annotated[str, _ENDPOINT]
    getConfigUrl: Annotated[str, _ENDPOINT]
    apiVersion: Annotated[int, Meta(extra_json_schema={"enum": [API_VERSION]})]


class SetStatusResponse(Model):
    config: Annotated[
        Literal["reboot", "new", "sync"],
        Meta(
            description="reboot: a newer package is desired than the device runs; new: the configuration "
            "changed since it last called GetConfig; sync: nothing to do"
        ),
    ]


class GetConfigResponse(Model):
    UpdateRate: UpdateRate
    AppParam: AppParam
