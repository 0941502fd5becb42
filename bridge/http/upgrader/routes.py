"""The operator's operations of the Upgrader V2 document: rollout profiles, their accounts and
devices, software and versions, notify. Each is one call of bridge/core/upgrades/ with the
caller's user id as the owner (another operator's objects answer 404)."""

from __future__ import annotations

from typing import Any

import msgspec

from bridge.core.accounts import User
from bridge.core.listing import ListQuery
from bridge.http.common.auth import USER
from bridge.http.common.operation import Answered, Call, Operations
from bridge.http.upgrader import models
from bridge.http.upgrader.models import (
    AccountDevicePath,
    AccountPath,
    ListParams,
    PageParams,
    ProfilePath,
    SoftwarePath,
    VersionPath,
    body,
)

api = Operations()
TAG = "upgrader"
ACCEPTED = models.Accepted("Accepted")


def list_query(params: PageParams) -> ListQuery:
    """The core's list query; filter and fields are parsed there (malformed JSON: 400)."""
    return ListQuery.parse(
        limit=params.limit,
        page=params.page,
        offset=params.offset,
        **(
            {"filter": params.filter, "fields": params.fields, "sort": params.sort}
            if isinstance(params, ListParams)
            else {}
        ),
    )


def listing(model: type, field: str, found: tuple[int, list[dict[str, Any]]]) -> Any:
    total, records = found
    return msgspec.convert({"totalRecords": total, field: records}, model)


def put_response(put: Any) -> models.PutResponse:
    return models.PutResponse(put.matched, put.modified)


# ---- rollout profiles --------------------------------------------------------------------------
@api.post(
    "/rolloutProfile",
    "Create a rollout profile",
    tag=TAG,
    auth=USER,
    body=models.RolloutProfile,
    body_required=True,
    answer=models.Created,
    status=201,
    errors=(400, 401, 409, 413),
    description="`id` given or generated; `softwareVersions` sets which versions target the profile.",
)
async def create_rollout_profile(call: Call[User, None, None, models.RolloutProfile]) -> models.Created:
    return models.Created(await call.core.upgrades.create_profile(call.principal.id, body(call.body)))


@api.get(
    "/rolloutProfile",
    "The rollout profiles",
    tag=TAG,
    auth=USER,
    query=ListParams,
    answer=models.RolloutProfileList,
    errors=(400, 401),
)
async def list_rollout_profiles(call: Call[User, None, ListParams, None]) -> Any:
    found = await call.core.upgrades.list_profiles(call.principal.id, list_query(call.query))
    return listing(models.RolloutProfileList, "rolloutProfileList", found)


@api.get(
    "/rolloutProfile/{rolloutProfileId}",
    "One rollout profile",
    tag=TAG,
    auth=USER,
    path_model=ProfilePath,
    answer=models.StoredProfile,
    errors=(400, 401, 404),
)
async def get_rollout_profile(call: Call[User, ProfilePath, None, None]) -> models.StoredProfile:
    profile = await call.core.upgrades.get_profile(call.principal.id, call.path.rolloutProfileId)
    return msgspec.convert(profile, models.StoredProfile)


@api.put(
    "/rolloutProfile/{rolloutProfileId}",
    "Update a rollout profile",
    tag=TAG,
    auth=USER,
    path_model=ProfilePath,
    body=models.RolloutProfile,
    body_required=True,
    answer=models.PutResponse,
    errors=(400, 401, 404, 413),
    description="The path names the profile (a body id must be the same).",
)
async def update_rollout_profile(
    call: Call[User, ProfilePath, None, models.RolloutProfile],
) -> models.PutResponse:
    put = await call.core.upgrades.update_profile(
        call.principal.id, call.path.rolloutProfileId, body(call.body)
    )
    return put_response(put)


@api.delete(
    "/rolloutProfile/{rolloutProfileId}",
    "Delete a rollout profile",
    tag=TAG,
    auth=USER,
    path_model=ProfilePath,
    answer=models.DeleteResponse,
    errors=(400, 401, 404),
    description="Its accounts and rollouts go with it; versions stop targeting it.",
)
async def delete_rollout_profile(call: Call[User, ProfilePath, None, None]) -> models.DeleteResponse:
    return models.DeleteResponse(
        await call.core.upgrades.delete_profile(call.principal.id, call.path.rolloutProfileId)
    )


# ---- accounts ----------------------------------------------------------------------------------
@api.get(
    "/rolloutProfile/{rolloutProfileId}/accounts",
    "The accounts of a rollout profile",
    tag=TAG,
    auth=USER,
    path_model=ProfilePath,
    query=PageParams,
    answer=models.AccountList,
    errors=(400, 401, 404),
)
async def list_accounts(call: Call[User, ProfilePath, PageParams, None]) -> Any:
    found = await call.core.upgrades.list_accounts(
        call.principal.id, call.path.rolloutProfileId, list_query(call.query)
    )
    return listing(models.AccountList, "accountList", found)


@api.get(
    "/rolloutProfile/{rolloutProfileId}/accounts/{accountId}",
    "One account",
    tag=TAG,
    auth=USER,
    path_model=AccountPath,
    answer=models.StoredAccount,
    errors=(400, 401, 404),
)
async def get_account(call: Call[User, AccountPath, None, None]) -> models.StoredAccount:
    account = await call.core.upgrades.get_account(
        call.principal.id, call.path.rolloutProfileId, call.path.accountId
    )
    return msgspec.convert(account, models.StoredAccount)


@api.put(
    "/rolloutProfile/{rolloutProfileId}/accounts/{accountId}",
    "Create or update an account",
    tag=TAG,
    auth=USER,
    path_model=AccountPath,
    body=models.Account,
    body_required=True,
    answer=models.PutResponse,
    alternatives={201: models.Created},
    errors=(400, 401, 404, 413),
    description="200 PutResponse when it existed, 201 {id} when created; `devices` (thing ids or "
    "regIds of the caller's things) replace the account's; a device is in one account at most.",
)
async def put_account(call: Call[User, AccountPath, None, models.Account]) -> Any:
    put = await call.core.upgrades.put_account(
        call.principal.id, call.path.rolloutProfileId, call.path.accountId, body(call.body)
    )
    return Answered(201, models.Created(call.path.accountId)) if put.created else put_response(put)


@api.delete(
    "/rolloutProfile/{rolloutProfileId}/accounts/{accountId}",
    "Delete an account",
    tag=TAG,
    auth=USER,
    path_model=AccountPath,
    answer=models.DeleteResponse,
    errors=(400, 401, 404),
)
async def delete_account(call: Call[User, AccountPath, None, None]) -> models.DeleteResponse:
    deleted = await call.core.upgrades.delete_account(
        call.principal.id, call.path.rolloutProfileId, call.path.accountId
    )
    return models.DeleteResponse(deleted)


@api.put(
    "/rolloutProfile/{rolloutProfileId}/accounts/{accountId}/devices/add",
    "Add devices to an account",
    tag=TAG,
    auth=USER,
    path_model=AccountPath,
    body=models.DeviceList,
    body_required=True,
    answer=models.DevicesAdded,
    errors=(400, 401, 404, 413),
    description="The account is created when missing (then `_id` is its id); 404 for a missing profile "
    "or device.",
)
async def add_devices(call: Call[User, AccountPath, None, models.DeviceList]) -> models.DevicesAdded:
    put, created = await call.core.upgrades.add_devices(
        call.principal.id, call.path.rolloutProfileId, call.path.accountId, body(call.body)
    )
    return models.DevicesAdded(put.matched, put.modified, created if created is not None else msgspec.UNSET)


@api.put(
    "/rolloutProfile/{rolloutProfileId}/accounts/{accountId}/devices/remove",
    "Remove devices from an account",
    tag=TAG,
    auth=USER,
    path_model=AccountPath,
    body=models.DeviceIdList,
    body_required=True,
    answer=models.PutResponse,
    errors=(400, 401, 404, 413),
)
async def remove_devices(call: Call[User, AccountPath, None, models.DeviceIdList]) -> models.PutResponse:
    put = await call.core.upgrades.remove_devices(
        call.principal.id, call.path.rolloutProfileId, call.path.accountId, body(call.body)
    )
    return put_response(put)


@api.put(
    "/rolloutProfile/{rolloutProfileId}/accounts/{accountId}/devices/{deviceId}/add",
    "Add one device to an account",
    tag=TAG,
    auth=USER,
    path_model=AccountDevicePath,
    body=models.Device,
    body_required=True,
    answer=models.PutResponse,
    errors=(400, 401, 404, 413),
    description="The path names the device (a body id must be the same).",
)
async def add_device(call: Call[User, AccountDevicePath, None, models.Device]) -> models.PutResponse:
    path = call.path
    put = await call.core.upgrades.add_device(
        call.principal.id, path.rolloutProfileId, path.accountId, path.deviceId, body(call.body)
    )
    return put_response(put)


@api.put(
    "/rolloutProfile/{rolloutProfileId}/accounts/{accountId}/devices/{deviceId}/remove",
    "Remove one device from an account",
    tag=TAG,
    auth=USER,
    path_model=AccountDevicePath,
    body=models.DeviceRef,
    answer=models.PutResponse,
    errors=(400, 401, 404, 413),
    description="The body ({id, type}) is optional; the path names the device.",
)
async def remove_device(call: Call[User, AccountDevicePath, None, models.DeviceRef]) -> models.PutResponse:
    path = call.path
    put = await call.core.upgrades.remove_device(
        call.principal.id, path.rolloutProfileId, path.accountId, path.deviceId, body(call.body)
    )
    return put_response(put)


# ---- software and versions ---------------------------------------------------------------------
@api.get(
    "/software",
    "The software",
    tag=TAG,
    auth=USER,
    query=ListParams,
    answer=models.SoftwareList,
    errors=(400, 401),
)
async def list_software(call: Call[User, None, ListParams, None]) -> Any:
    found = await call.core.upgrades.list_software(call.principal.id, list_query(call.query))
    return listing(models.SoftwareList, "softwareList", found)


@api.post(
    "/software",
    "Create a software",
    tag=TAG,
    auth=USER,
    body=models.Software,
    body_required=True,
    answer=models.Created,
    status=201,
    errors=(400, 401, 409, 413),
    description="`id` given or generated; name and id are unique per operator (409).",
)
async def create_software(call: Call[User, None, None, models.Software]) -> models.Created:
    return models.Created(await call.core.upgrades.create_software(call.principal.id, body(call.body)))


@api.get(
    "/software/{softwareName}",
    "One software with its versions",
    tag=TAG,
    auth=USER,
    path_model=SoftwarePath,
    answer=models.StoredSoftware,
    errors=(400, 401, 404),
    description="Named by its name, else its id.",
)
async def get_software(call: Call[User, SoftwarePath, None, None]) -> models.StoredSoftware:
    software = await call.core.upgrades.get_software(call.principal.id, call.path.softwareName)
    return msgspec.convert(software, models.StoredSoftware)


@api.put(
    "/software/{softwareName}",
    "Update a software",
    tag=TAG,
    auth=USER,
    path_model=SoftwarePath,
    body=models.Software,
    body_required=True,
    answer=models.PutResponse,
    errors=(400, 401, 404, 409, 413),
    description="The whole document; with `versions`, exactly those versions remain.",
)
async def update_software(call: Call[User, SoftwarePath, None, models.Software]) -> models.PutResponse:
    put = await call.core.upgrades.update_software(call.principal.id, call.path.softwareName, body(call.body))
    return put_response(put)


@api.delete(
    "/software/{softwareName}",
    "Delete a software",
    tag=TAG,
    auth=USER,
    path_model=SoftwarePath,
    answer=models.DeleteResponse,
    errors=(400, 401, 404),
    description="Its versions leave every profile; pending notices and rollouts go too.",
)
async def delete_software(call: Call[User, SoftwarePath, None, None]) -> models.DeleteResponse:
    return models.DeleteResponse(
        await call.core.upgrades.delete_software(call.principal.id, call.path.softwareName)
    )


@api.get(
    "/software/{softwareName}/versions/{versionNumber}",
    "One version",
    tag=TAG,
    auth=USER,
    path_model=VersionPath,
    answer=models.StoredVersion,
    errors=(400, 401, 404),
)
async def get_version(call: Call[User, VersionPath, None, None]) -> models.StoredVersion:
    path = call.path
    version = await call.core.upgrades.get_version(call.principal.id, path.softwareName, path.versionNumber)
    return msgspec.convert(version, models.StoredVersion)


@api.put(
    "/software/{softwareName}/versions/{versionNumber}",
    "Create or update a version",
    tag=TAG,
    auth=USER,
    path_model=VersionPath,
    body=models.VersionUpdate,
    body_required=True,
    answer=models.PutResponse,
    errors=(400, 401, 404, 413),
    description="An upsert (the document has no other way to add one version): 404 only when the "
    "software is missing. The path names the version.",
)
async def put_version(call: Call[User, VersionPath, None, models.VersionUpdate]) -> models.PutResponse:
    path = call.path
    put = await call.core.upgrades.put_version(
        call.principal.id, path.softwareName, path.versionNumber, body(call.body)
    )
    return put_response(put)


@api.delete(
    "/software/{softwareName}/versions/{versionNumber}",
    "Delete a version",
    tag=TAG,
    auth=USER,
    path_model=VersionPath,
    answer=models.DeleteResponse,
    errors=(400, 401, 404),
)
async def delete_version(call: Call[User, VersionPath, None, None]) -> models.DeleteResponse:
    path = call.path
    deleted = await call.core.upgrades.delete_version(
        call.principal.id, path.softwareName, path.versionNumber
    )
    return models.DeleteResponse(deleted)


@api.get(
    "/software/{softwareName}/versions/{versionNumber}/dependency",
    "A version's dependencies",
    tag=TAG,
    auth=USER,
    path_model=VersionPath,
    answer=models.DependencyList,
    errors=(400, 401, 404),
)
async def version_dependencies(call: Call[User, VersionPath, None, None]) -> models.DependencyList:
    path = call.path
    found = await call.core.upgrades.dependencies(call.principal.id, path.softwareName, path.versionNumber)
    return msgspec.convert({"totalRecords": len(found), "dependencyList": found}, models.DependencyList)


@api.post(
    "/software/{softwareName}/versions/{versionNumber}/notify",
    "Notify the devices a version targets",
    tag=TAG,
    auth=USER,
    path_model=VersionPath,
    answer=models.Accepted,
    status=202,
    errors=(400, 401, 404),
    description="Every device of a profile the version targets that is behind its offer is told: "
    "retained on MQTT things/{id}/upgrade/notify and as an `upgrade` message in its egress.",
)
async def notify_version(call: Call[User, VersionPath, None, None]) -> models.Accepted:
    path = call.path
    await call.core.upgrades.notify_version(call.principal.id, path.softwareName, path.versionNumber)
    return ACCEPTED


@api.post(
    "/devices/software/pendingUpdate/notify",
    "Notify every device of its pending updates",
    tag=TAG,
    auth=USER,
    answer=models.Accepted,
    status=202,
    errors=(401,),
    description="Every device in the caller's accounts is told of each software it is behind on.",
)
async def notify_pending(call: Call[User, None, None, None]) -> models.Accepted:
    await call.core.upgrades.notify_pending(call.principal.id)
    return ACCEPTED
