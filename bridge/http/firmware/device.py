"""The four device operations (CATALOG 004: Activate, Get Target Version, Get Version Firmware,
Switch To A New Version), each one core call; the MQTT twin (things/{id}/firmware/...) makes the
same calls."""

from __future__ import annotations

import msgspec
from aiohttp import web

from bridge.core.identity import DeviceIdentity
from bridge.http.common.operation import Call, ErrorDoc, Operations
from bridge.http.firmware import models
from bridge.http.firmware.auth import DEVICE
from bridge.http.provisioning.answers import BlobResponse
from bridge.http.provisioning.routes import DOWNLOAD, PARTIAL, UNSATISFIABLE

api = Operations()
TAG = "firmware"


@api.post(
    "/activate",
    "Activate a device by its serial number: a new API key and its thing id",
    tag=TAG,
    body=models.ActivateRequest,
    body_required=True,
    answer=models.Activation,
    errors=(
        400,
        ErrorDoc(403, "The product or the serial number is disabled, or the owner's plan has no room."),
        ErrorDoc(404, "No enabled product has this serial number."),
        413,
        ErrorDoc(429, "Too many unknown serial numbers from this address: an exponential back-off."),
    ),
    description="No credential: the serial number is the device's claim. Every activation issues a new "
    "API key (only its hash is kept) and voids the previous one at once, with its sessions; the thing and "
    "its history stay. 400 when the serial number is in several products and `product` does not say which.",
)
async def activate(call: Call[None, None, None, models.ActivateRequest]) -> models.Activation:
    body, request = call.body, call.request
    product = body.product if isinstance(body.product, str) else None
    done = await call.core.firmware.activate(
        body.serialNumber, product, remote=request.remote or "", agent=request.headers.get("User-Agent", "")
    )
    return models.Activation(done.api_key, done.thing_id)


@api.get(
    "/things/{thingId}/target",
    "The version the device should run, and the one it confirmed",
    tag=TAG,
    auth=DEVICE,
    path_model=models.ThingPath,
    answer=models.Target,
    errors=(400, 401, 403),
    description="targetVersion is what the upgrader's checkForUpgrade offers the thing (its account's rollout "
    "profile, staged rollouts), else its current version; size, sha256 and firmwareUrl are those of the "
    "target's firmware (null until uploaded).",
)
async def target(call: Call[DeviceIdentity, models.ThingPath, None, None]) -> models.Target:
    return msgspec.convert(await call.core.firmware.target(call.principal), models.Target)


@api.get(
    "/things/{thingId}/versions/{version}/firmware",
    "Download a version's firmware (Range, If-Range, ETag)",
    tag=TAG,
    auth=DEVICE,
    path_model=models.FirmwarePath,
    answer=DOWNLOAD,
    alternatives={206: PARTIAL},
    errors=(400, 401, 403, 404, UNSATISFIABLE),
    description="Any version of the thing's product with firmware uploaded (404 otherwise). Resume with "
    "Range: bytes=<offset>- and If-Range: <the ETag> (a changed firmware answers 200 with all of it).",
)
async def firmware(call: Call[DeviceIdentity, models.FirmwarePath, None, None]) -> web.StreamResponse:
    return BlobResponse(await call.core.firmware.image(call.principal, call.path.version))


@api.put(
    "/things/{thingId}/version",
    "Confirm the version the device runs now",
    tag=TAG,
    auth=DEVICE,
    path_model=models.ThingPath,
    body=models.SwitchRequest,
    body_required=True,
    answer=models.Switched,
    errors=(400, 401, 403, ErrorDoc(404, "The version is not one of the thing's product."), 413),
    description="Recorded as a SUCCESS upgrade result in the upgrader's history (GET /v2/devices/{id}/"
    "upgradeResults), so staged rollouts the thing is in move on; the target is re-computed.",
)
async def switch(call: Call[DeviceIdentity, models.ThingPath, None, models.SwitchRequest]) -> models.Switched:
    done = await call.core.firmware.switch(call.principal, call.body.version, transport="http")
    return msgspec.convert(done, models.Switched)
