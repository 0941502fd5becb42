"""The device's operations of the Upgrader V2 document (checkForUpgrade, currentVersionNumbers,
upgradeResult), on the device's own credential (auth.py); the same core calls as the MQTT twin
(things/{id}/upgrade/check, things/{id}/versions, things/{id}/upgrade/result), so a device gets
the same answer over both. And the operator's read of a device's results (extension)."""

from __future__ import annotations

import msgspec

from bridge.core.accounts import User
from bridge.http.common.auth import USER
from bridge.http.common.operation import Call, Operations
from bridge.http.upgrader import models
from bridge.http.upgrader.auth import DEVICE, DeviceCaller
from bridge.http.upgrader.models import DevicePath, body
from bridge.http.upgrader.routes import ACCEPTED, TAG

api = Operations()


@api.post(
    "/checkForUpgrade",
    "Whether a newer version of a software is offered to the calling device",
    tag=TAG,
    auth=DEVICE,
    body=models.CheckRequest,
    body_required=True,
    answer=models.CheckResponse,
    errors=(400, 401, 413),
    description="device -> its account -> rollout profile -> the latest version (by releaseDate) "
    "targeting that profile that no staged rollout holds back from it. Unknown software: 400.",
)
async def check_for_upgrade(
    call: Call[DeviceCaller, None, None, models.CheckRequest],
) -> models.CheckResponse:
    offer = await call.core.upgrades.check(call.principal.identity, body(call.body))
    return msgspec.convert(offer, models.CheckResponse)


@api.put(
    "/devices/{deviceId}/currentVersionNumbers",
    "Report the versions the device runs",
    tag=TAG,
    auth=DEVICE,
    path_model=DevicePath,
    body=models.CurrentVersionNumbers,
    body_required=True,
    answer=models.Accepted,
    status=202,
    errors=(400, 401, 403, 413),
    description="Shown in GET /dev/v1/things/{id}/state; clears the notices the versions satisfy.",
)
async def current_version_numbers(
    call: Call[DeviceCaller, DevicePath, None, models.CurrentVersionNumbers],
) -> models.Accepted:
    caller = call.principal
    await call.core.upgrades.report_versions(
        caller.identity, body(call.body), transport="http", client_token=caller.client_token
    )
    return ACCEPTED


@api.put(
    "/devices/{deviceId}/currentVersionNumbers/upgradeResult",
    "Report the result of an upgrade",
    tag=TAG,
    auth=DEVICE,
    path_model=DevicePath,
    body=models.UpgradeResults,
    body_required=True,
    answer=models.Accepted,
    status=202,
    errors=(400, 401, 403, 413),
    description="Appended to the device's history; SUCCESS records the version as running; staged "
    "rollouts the device is in move on.",
)
async def upgrade_result(
    call: Call[DeviceCaller, DevicePath, None, models.UpgradeResults],
) -> models.Accepted:
    caller = call.principal
    await call.core.upgrades.report_results(
        caller.identity, body(call.body), transport="http", client_token=caller.client_token
    )
    return ACCEPTED


@api.get(
    "/devices/{deviceId}/upgradeResults",
    "A device's upgrade results, oldest first (extension)",
    tag=TAG,
    auth=USER,
    path_model=DevicePath,
    answer=models.ResultList,
    errors=(400, 401, 404),
)
async def upgrade_results(call: Call[User, DevicePath, None, None]) -> models.ResultList:
    found = await call.core.upgrades.results(call.principal.id, call.path.deviceId)
    return msgspec.convert({"totalRecords": len(found), "upgradeResultList": found}, models.ResultList)
