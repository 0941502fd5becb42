"""The upgrader's operations as the dialects call them: one method per operation, each one store
read or write."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson

from bridge.core import ids, topics
from bridge.core.errors import Conflict, Invalid, NotFound
from bridge.core.identity import DeviceIdentity
from bridge.core.listing import ListQuery, Record
from bridge.core.messages import VERSIONS, Messages, insert_message
from bridge.core.outbox import Outbox
from bridge.core.ports import DeviceLink, commit_and_route
from bridge.core.upgrades.catalog import (
    account_doc,
    account_row,
    list_owned,
    owned_device,
    profile_doc,
    profile_pks,
    profile_row,
    resolved_dependencies,
    software_doc,
    software_row,
    software_version,
    version_doc,
)
from bridge.core.upgrades.fields import (
    ACCOUNT_FIELDS,
    MAX_TEXT,
    PROFILE_FIELDS,
    RESULT_STATUSES,
    SOFTWARE_FIELDS,
    Put,
    SoftwareSpec,
    VersionSpec,
    as_object,
    choice_field,
    key_field,
    list_field,
    reference_field,
    same_as_path,
    strings_field,
    text_field,
    to_json,
)
from bridge.core.upgrades.hooks import ResultsHook, deleting_hooks, offers_changed, versions_changed
from bridge.core.upgrades.offers import (
    check,
    clear_satisfied,
    forget_rollouts,
    notify_device,
    profile_members,
    publish_notices,
    record_running,
    things_told_of,
)
from bridge.store import IntegrityError, Store


# ---- the service -------------------------------------------------------------------------------
class Upgrades:
    def __init__(
        self, store: Store, outbox: Outbox, link: DeviceLink, messages: Messages, on_results: ResultsHook
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.link = link
        self.messages = messages
        self.on_results = on_results
        # Awaited after a version's delete committed, (owner id, software name, version): the
        # firmware model drops the version's image (its content entity and blob) there.
        self.version_deleted: list[Callable[[str, str, str], Awaitable[None]]] = []

    # ---- rollout profiles ----------------------------------------------------------------------
    async def create_profile(self, owner_id: str, body: Any) -> str:
        """POST /v2/rolloutProfile -> the id (given, or generated)."""
        body = as_object(body, PROFILE_FIELDS, "rollout profile")
        profile_id = text_field(body, "id") or ids.new_id()

        def create(conn: sqlite3.Connection) -> str:
            try:
                conn.execute(
                    "INSERT INTO rollout_profiles (owner_id, id, name, description, created) VALUES (?,?,?,?,?)",
                    (
                        owner_id,
                        profile_id,
                        text_field(body, "name"),
                        text_field(body, "description", limit=MAX_TEXT),
                        ids.now(),
                    ),
                )
            except IntegrityError as exc:
                raise Conflict(f"rollout profile {profile_id!r:.100} exists") from exc
            self._link_versions(conn, owner_id, profile_row(conn, owner_id, profile_id), body)
            return profile_id

        return await self.store.write(create)

    @staticmethod
    def _link_versions(
        conn: sqlite3.Connection, owner_id: str, profile: sqlite3.Row, body: Mapping[str, Any]
    ) -> None:
        """`softwareVersions` given: exactly these versions target the profile (Version.rolloutProfiles
        is the stored truth, CATALOG 001 #10)."""
        if body.get("softwareVersions") is None:
            return
        pks = []
        for ref in list_field(body, "softwareVersions"):
            ref = reference_field(ref, "softwareVersions")
            try:
                software = software_row(conn, owner_id, ref["softwareName"])
                pks.append(software_version(conn, software, ref["versionNumber"])["pk"])
            except NotFound as exc:
                raise Invalid(f"softwareVersions: {exc}") from exc
        linked = "SELECT DISTINCT v.software_pk FROM version_profiles vp JOIN software_versions v ON v.pk = vp.version_pk WHERE vp.profile_pk = ?"
        softwares = {r[0] for r in conn.execute(linked, (profile["pk"],))}
        conn.execute("DELETE FROM version_profiles WHERE profile_pk = ?", (profile["pk"],))
        conn.executemany(
            "INSERT INTO version_profiles (version_pk, profile_pk) VALUES (?,?) ON CONFLICT DO NOTHING",
            [(pk, profile["pk"]) for pk in pks],
        )
        for software_pk in sorted(softwares | {r[0] for r in conn.execute(linked, (profile["pk"],))}):
            versions_changed(conn, software_pk)

    async def list_profiles(self, owner_id: str, query: ListQuery) -> tuple[int, list[Record]]:
        sql = "SELECT * FROM rollout_profiles WHERE owner_id = ? ORDER BY created, pk"
        return await list_owned(self.store, query, PROFILE_FIELDS, sql, owner_id, profile_doc)

    async def get_profile(self, owner_id: str, profile_id: str) -> Record:
        return await self.store.read(lambda c: profile_doc(c, profile_row(c, owner_id, profile_id)))

    async def update_profile(self, owner_id: str, profile_id: str, body: Any) -> Put:
        body = as_object(body, PROFILE_FIELDS, "rollout profile")
        same_as_path(body, "id", profile_id)

        def update(conn: sqlite3.Connection) -> Put:
            profile = profile_row(conn, owner_id, profile_id)
            before = profile_doc(conn, profile)
            for key, column, limit in (("name", "name", 256), ("description", "description", MAX_TEXT)):
                if key in body:
                    conn.execute(
                        f"UPDATE rollout_profiles SET {column} = ? WHERE pk = ?",
                        (text_field(body, key, limit=limit), profile["pk"]),
                    )
            self._link_versions(conn, owner_id, profile, body)
            # the row as it is now: `profile` still holds the values read before the update
            after = conn.execute("SELECT * FROM rollout_profiles WHERE pk = ?", (profile["pk"],)).fetchone()
            return Put(1, int(profile_doc(conn, after) != before))

        return await self.store.write(update)

    async def delete_profile(self, owner_id: str, profile_id: str) -> int:
        """Its accounts and rollouts go with it; versions stop targeting it."""

        def delete(conn: sqlite3.Connection) -> int:
            profile = profile_row(conn, owner_id, profile_id)
            forget_rollouts(conn, "profile_pk = ?", (profile["pk"],))
            members = profile_members(conn, [profile["pk"]])
            deleted = conn.execute("DELETE FROM rollout_profiles WHERE pk = ?", (profile["pk"],)).rowcount
            for thing_id in members:  # in no account now
                offers_changed(conn, thing_id)
            return deleted

        return await self.outbox.write(delete)

    # ---- accounts ------------------------------------------------------------------------------
    async def list_accounts(
        self, owner_id: str, profile_id: str, query: ListQuery
    ) -> tuple[int, list[Record]]:
        def read(conn: sqlite3.Connection) -> list[Record]:
            profile = profile_row(conn, owner_id, profile_id)
            rows = conn.execute(
                "SELECT * FROM upgrade_accounts WHERE profile_pk = ? ORDER BY id", (profile["pk"],)
            )
            return [account_doc(conn, r, profile_id) for r in rows.fetchall()]

        return query.apply(await self.store.read(read), ACCOUNT_FIELDS)

    async def get_account(self, owner_id: str, profile_id: str, account_id: str) -> Record:
        def read(conn: sqlite3.Connection) -> Record:
            return account_doc(
                conn, account_row(conn, profile_row(conn, owner_id, profile_id), account_id), profile_id
            )

        return await self.store.read(read)

    async def put_account(self, owner_id: str, profile_id: str, account_id: str, body: Any) -> Put:
        """Upsert (CATALOG 001 #13): created, or its devices replaced by the body's. An account of the
        operator's under another profile moves to this one."""
        body = as_object(body, ACCOUNT_FIELDS, "account")
        same_as_path(body, "id", key_field(account_id, "accountId"))
        same_as_path(body, "rolloutProfileId", profile_id)
        devices = self._devices(list_field(body, "devices"))

        def put(conn: sqlite3.Connection) -> Put:
            profile = profile_row(conn, owner_id, profile_id)
            row = conn.execute(
                "SELECT * FROM upgrade_accounts WHERE owner_id = ? AND id = ?", (owner_id, account_id)
            ).fetchone()
            created = row is None
            if created:
                conn.execute(
                    "INSERT INTO upgrade_accounts (owner_id, id, profile_pk) VALUES (?,?,?)",
                    (owner_id, account_id, profile["pk"]),
                )
                before: Record | None = None
            else:
                before = account_doc(conn, row, profile_id) if row["profile_pk"] == profile["pk"] else None
                conn.execute(
                    "UPDATE upgrade_accounts SET profile_pk = ? WHERE pk = ?", (profile["pk"], row["pk"])
                )
            account = account_row(conn, profile, account_id)
            if "devices" in body:
                gone = conn.execute(
                    "DELETE FROM account_devices WHERE account_pk = ? RETURNING thing_id", (account["pk"],)
                ).fetchall()
                self._add(conn, owner_id, account, devices)
                for row in gone:
                    if not conn.execute(
                        "SELECT 1 FROM account_devices WHERE thing_id = ?", (row[0],)
                    ).fetchone():
                        offers_changed(conn, row[0])
            return Put(
                int(not created),
                int(not created and account_doc(conn, account, profile_id) != before),
                created,
            )

        return await self.outbox.write(put)

    async def delete_account(self, owner_id: str, profile_id: str, account_id: str) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            account = account_row(conn, profile_row(conn, owner_id, profile_id), account_id)
            members = conn.execute(
                "SELECT thing_id FROM account_devices WHERE account_pk = ? ORDER BY thing_id",
                (account["pk"],),
            ).fetchall()
            deleted = conn.execute("DELETE FROM upgrade_accounts WHERE pk = ?", (account["pk"],)).rowcount
            for row in members:
                offers_changed(conn, row[0])
            return deleted

        return await self.outbox.write(delete)

    @staticmethod
    def _devices(items: list[Any]) -> list[tuple[str, str]]:
        out = []
        for item in items:
            device = as_object(item, ("id", "type"), "device")
            out.append(
                (
                    text_field(device, "id", required=True) or "",
                    text_field(device, "type", required=True) or "",
                )
            )
        return out

    @staticmethod
    def _add(
        conn: sqlite3.Connection, owner_id: str, account: sqlite3.Row, devices: list[tuple[str, str]]
    ) -> int:
        """Put devices in the account (a device is in one account at most: it moves); how many
        changed."""
        changed = 0
        for device_id, kind in devices:
            thing_id = owned_device(conn, owner_id, device_id)
            same = conn.execute(
                "SELECT 1 FROM account_devices WHERE thing_id = ? AND account_pk = ? AND device_id = ? AND type = ?",
                (thing_id, account["pk"], device_id, kind),
            ).fetchone()
            if same is None:
                conn.execute(
                    "INSERT INTO account_devices (thing_id, account_pk, device_id, type) VALUES (?,?,?,?)"
                    " ON CONFLICT (thing_id) DO UPDATE SET account_pk = excluded.account_pk,"
                    " device_id = excluded.device_id, type = excluded.type",
                    (thing_id, account["pk"], device_id, kind),
                )
                offers_changed(conn, thing_id)
                changed += 1
        return changed

    async def add_devices(
        self, owner_id: str, profile_id: str, account_id: str, body: Any
    ) -> tuple[Put, str | None]:
        """PUT .../devices/add {deviceList}: the account is created when missing (then `_id` = its
        id, the second value)."""
        body = as_object(body, ("deviceList",), "body")
        devices = self._devices(list_field(body, "deviceList", required=True))
        key_field(account_id, "accountId")

        def add(conn: sqlite3.Connection) -> tuple[Put, str | None]:
            profile = profile_row(conn, owner_id, profile_id)
            created = conn.execute(
                "INSERT INTO upgrade_accounts (owner_id, id, profile_pk) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                (owner_id, account_id, profile["pk"]),
            ).rowcount
            changed = self._add(conn, owner_id, account_row(conn, profile, account_id), devices)
            return Put(int(not created), int(not created and changed > 0)), account_id if created else None

        return await self.outbox.write(add)

    async def remove_devices(self, owner_id: str, profile_id: str, account_id: str, body: Any) -> Put:
        """PUT .../devices/remove {deviceIdList}: ids or regIds; absent ones are no change."""
        body = as_object(body, ("deviceIdList",), "body")
        device_ids = strings_field(body, "deviceIdList") if body.get("deviceIdList") is not None else None
        if device_ids is None:
            raise Invalid("deviceIdList is required (an array of device ids)")
        return await self._remove(owner_id, profile_id, account_id, device_ids)

    async def add_device(
        self, owner_id: str, profile_id: str, account_id: str, device_id: str, body: Any
    ) -> Put:
        """PUT .../devices/{deviceId}/add {id, type}: the path names the device."""
        body = as_object(body, ("id", "type"), "device")
        same_as_path(body, "id", device_id)
        ((_, kind),) = self._devices([{**body, "id": device_id}])

        def add(conn: sqlite3.Connection) -> Put:
            account = account_row(conn, profile_row(conn, owner_id, profile_id), account_id)
            return Put(1, int(self._add(conn, owner_id, account, [(device_id, kind)]) > 0))

        return await self.outbox.write(add)

    async def remove_device(
        self, owner_id: str, profile_id: str, account_id: str, device_id: str, body: Any = None
    ) -> Put:
        """PUT .../devices/{deviceId}/remove: the body ({id, type}) is optional (CATALOG 001 #14)."""
        if body is not None:
            same_as_path(as_object(body, ("id", "type"), "device"), "id", device_id)
        return await self._remove(owner_id, profile_id, account_id, (device_id,))

    async def _remove(
        self, owner_id: str, profile_id: str, account_id: str, device_ids: Iterable[str]
    ) -> Put:
        def remove(conn: sqlite3.Connection) -> Put:
            account = account_row(conn, profile_row(conn, owner_id, profile_id), account_id)
            removed = [
                row[0]
                for d in device_ids
                for row in conn.execute(
                    "DELETE FROM account_devices WHERE account_pk = ? AND (device_id = ? OR thing_id = ?)"
                    " RETURNING thing_id",
                    (account["pk"], d, d),
                ).fetchall()
            ]
            for thing_id in removed:
                offers_changed(conn, thing_id)
            return Put(1, int(bool(removed)))

        return await self.outbox.write(remove)

    # ---- software and versions -----------------------------------------------------------------
    async def list_software(self, owner_id: str, query: ListQuery) -> tuple[int, list[Record]]:
        sql = "SELECT * FROM software WHERE owner_id = ? ORDER BY created, pk"
        return await list_owned(self.store, query, SOFTWARE_FIELDS, sql, owner_id, software_doc)

    async def create_software(self, owner_id: str, body: Any) -> str:
        """POST /v2/software -> its id (given or generated); name and id are unique per operator."""
        spec = SoftwareSpec.parse(body)
        software_id = spec.id or ids.new_id()

        def create(conn: sqlite3.Connection) -> str:
            taken = conn.execute(
                "SELECT 1 FROM software WHERE owner_id = ? AND (id = ? OR name = ?)",
                (owner_id, software_id, spec.name),
            ).fetchone()
            if taken:
                raise Conflict(f"software with id {software_id!r:.100} or name {spec.name!r:.100} exists")
            conn.execute(
                "INSERT INTO software (owner_id, id, name, description, device_types, upgrade_type, created)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    owner_id,
                    software_id,
                    spec.name,
                    spec.description,
                    to_json(spec.device_types),
                    spec.upgrade_type,
                    ids.now(),
                ),
            )
            software = software_row(conn, owner_id, spec.name)
            for version in spec.versions or ():
                _upsert_version(conn, owner_id, software, version)
            return software_id

        return await self.store.write(create)

    async def get_software(self, owner_id: str, name: str) -> Record:
        return await self.store.read(lambda c: software_doc(c, software_row(c, owner_id, name)))

    async def update_software(self, owner_id: str, name: str, body: Any) -> Put:
        """PUT /v2/software/{softwareName}: the whole document; with `versions`, exactly those
        versions remain (the document's only way to add several at once)."""
        spec = SoftwareSpec.parse(body)

        def update(conn: sqlite3.Connection) -> Put:
            software = software_row(conn, owner_id, name)
            if spec.id is not None and spec.id != software["id"]:
                raise Invalid(
                    f"id in the body ({spec.id!r:.100}) differs from the software's ({software['id']!r})"
                )
            before = software_doc(conn, software)
            try:
                conn.execute(
                    "UPDATE software SET name = ?, description = ?, device_types = ?, upgrade_type = ? WHERE pk = ?",
                    (
                        spec.name,
                        spec.description,
                        to_json(spec.device_types),
                        spec.upgrade_type,
                        software["pk"],
                    ),
                )
            except IntegrityError as exc:
                raise Conflict(f"another software is named {spec.name!r:.100}") from exc
            if spec.versions is not None:
                keep = [v.version_number for v in spec.versions]
                gone = conn.execute(
                    "SELECT pk FROM software_versions WHERE software_pk = ? AND version_number NOT IN"
                    f" ({','.join('?' * len(keep)) or 'NULL'})",
                    (software["pk"], *keep),
                ).fetchall()
                for row in gone:
                    _delete_version(conn, owner_id, row["pk"])
                for version in spec.versions:
                    _upsert_version(conn, owner_id, software, version)
            after = conn.execute("SELECT * FROM software WHERE pk = ?", (software["pk"],)).fetchone()
            return Put(1, int(software_doc(conn, after) != before))

        return await self.outbox.write(update)

    async def delete_software(self, owner_id: str, name: str) -> int:
        """Its versions go with it, and so leave every profile; pending notices and rollouts too."""

        def delete(conn: sqlite3.Connection) -> int:
            software = software_row(conn, owner_id, name)
            for hook in deleting_hooks:
                hook(conn, software["pk"])
            told = things_told_of(conn, "software_pk = ?", (software["pk"],))
            forget_rollouts(
                conn,
                "version_pk IN (SELECT pk FROM software_versions WHERE software_pk = ?)",
                (software["pk"],),
            )
            deleted = conn.execute("DELETE FROM software WHERE pk = ?", (software["pk"],)).rowcount
            for thing_id in told:
                publish_notices(conn, thing_id, owner_id)
            return deleted

        return await self.outbox.write(delete)

    async def get_version(self, owner_id: str, name: str, number: str) -> Record:
        return await self.store.read(
            lambda c: version_doc(c, software_version(c, software_row(c, owner_id, name), number))
        )

    async def put_version(self, owner_id: str, name: str, number: str, body: Any) -> Put:
        """Upsert (CATALOG 001 #15): NotFound only when the software is missing."""
        spec = VersionSpec.parse(body, key_field(number, "versionNumber"))
        return await self.outbox.write(
            lambda c: _upsert_version(c, owner_id, software_row(c, owner_id, name), spec)
        )

    async def delete_version(self, owner_id: str, name: str, number: str) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            return _delete_version(
                conn, owner_id, software_version(conn, software_row(conn, owner_id, name), number)["pk"]
            )

        deleted = await self.outbox.write(delete)
        for then in self.version_deleted:
            await then(owner_id, name, number)
        return deleted

    async def dependencies(self, owner_id: str, name: str, number: str) -> list[Record]:
        def read(conn: sqlite3.Connection) -> list[Record]:
            return resolved_dependencies(
                conn, owner_id, software_version(conn, software_row(conn, owner_id, name), number)
            )

        return await self.store.read(read)

    async def notify_version(self, owner_id: str, name: str, number: str) -> list[str]:
        """POST .../versions/{v}/notify: every device of a profile the version targets that is
        behind its offer of this software is told (once per offer). Returns the things told."""

        def notify(conn: sqlite3.Connection) -> list[str]:
            software = software_row(conn, owner_id, name)
            version = software_version(conn, software, number)
            profiles = [
                r["profile_pk"]
                for r in conn.execute(
                    "SELECT profile_pk FROM version_profiles WHERE version_pk = ?", (version["pk"],)
                )
            ]
            return [t for t in profile_members(conn, profiles) if notify_device(conn, t, owner_id, software)]

        return self._told(await self.outbox.write(notify))

    async def notify_pending(self, owner_id: str) -> list[str]:
        """POST /v2/devices/software/pendingUpdate/notify: every device in the operator's accounts
        is told of each software it is behind on."""

        def notify(conn: sqlite3.Connection) -> list[str]:
            everything = conn.execute(
                "SELECT * FROM software WHERE owner_id = ? ORDER BY name", (owner_id,)
            ).fetchall()
            members = [
                r["thing_id"]
                for r in conn.execute(
                    "SELECT d.thing_id FROM account_devices d JOIN upgrade_accounts a ON a.pk = d.account_pk"
                    " WHERE a.owner_id = ? ORDER BY d.thing_id",
                    (owner_id,),
                )
            ]
            told = [t for t in members for s in everything if notify_device(conn, t, owner_id, s)]
            return list(dict.fromkeys(told))

        return self._told(await self.outbox.write(notify))

    def _told(self, things: list[str]) -> list[str]:
        self.messages.wake(things)
        return things

    # ---- device side ---------------------------------------------------------------------------
    async def check(self, device: DeviceIdentity, body: Any) -> Record:
        """checkForUpgrade {name, version} -> {name, status, version, downloadUrl, dependencies}."""
        body = as_object(body, ("name", "version"), "body")
        name = text_field(body, "name", required=True) or ""
        number = text_field(body, "version", required=True) or ""
        return await self.store.read(check, device.thing_id, device.owner_id, name, number)

    async def report_versions(
        self, device: DeviceIdentity, body: Any, *, transport: str, client_token: str | None = None
    ) -> None:
        """currentVersionNumbers {currentVersionNumbers: [{softwareName, currentVersionNumber}]}:
        recorded (with a `versions` message, only while the device's identity holds), notices it
        satisfies cleared, then published on things/{id}/versions for the owner's applications."""
        body = as_object(body, ("currentVersionNumbers",), "body")
        reports = []
        for item in list_field(body, "currentVersionNumbers", required=True):
            item = as_object(item, ("softwareName", "currentVersionNumber"), "currentVersionNumbers[]")
            reports.append(
                (
                    text_field(item, "softwareName", required=True) or "",
                    text_field(item, "currentVersionNumber", required=True) or "",
                )
            )
        payload = orjson.dumps(body)

        def record(conn: sqlite3.Connection) -> None:
            insert_message(
                conn, device.thing_id, device.owner_id, VERSIONS, payload, "json", transport, device.cert_id
            )
            for name, number in reports:
                record_running(conn, device.thing_id, name, number, transport, client_token)
            clear_satisfied(conn, device.thing_id, device.owner_id)

        await commit_and_route(
            self.outbox.write, self.link, topics.topic(device.thing_id, topics.VERSIONS), payload, record
        )

    async def report_results(
        self, device: DeviceIdentity, body: Any, *, transport: str, client_token: str | None = None
    ) -> None:
        """upgradeResult {currentVersionsUpgradeResult: [{softwareName, versionNumber, status,
        errorCode, message}]}: appended to the device's history; SUCCESS also records the version as
        running; staged rollouts of the device move on. Then published on things/{id}/upgrade/result."""
        body = as_object(body, ("currentVersionsUpgradeResult",), "body")
        results = []
        for item in list_field(body, "currentVersionsUpgradeResult", required=True):
            item = as_object(
                item, ("softwareName", "versionNumber", "status", "errorCode", "message"), "result"
            )
            results.append(
                (
                    text_field(item, "softwareName", required=True) or "",
                    text_field(item, "versionNumber", required=True) or "",
                    choice_field(item, "status", RESULT_STATUSES, required=True) or "",
                    text_field(item, "errorCode"),
                    text_field(item, "message", limit=MAX_TEXT),
                )
            )
        payload = orjson.dumps(body)

        def record(conn: sqlite3.Connection) -> list[str]:
            insert_message(
                conn, device.thing_id, device.owner_id, VERSIONS, payload, "json", transport, device.cert_id
            )
            now = ids.now()
            for name, number, status, code, message in results:
                conn.execute(
                    "INSERT INTO upgrade_results (thing_id, software_name, version_number, status, error_code,"
                    " message, client_token, ts, transport) VALUES (?,?,?,?,?,?,?,?,?)",
                    (device.thing_id, name, number, status, code, message, client_token, now, transport),
                )
                if status == "SUCCESS":
                    record_running(conn, device.thing_id, name, number, transport, client_token)
            clear_satisfied(conn, device.thing_id, device.owner_id)
            return self.on_results(conn, device.thing_id)

        told = await commit_and_route(
            self.outbox.write,
            self.link,
            topics.topic(device.thing_id, topics.UPGRADE_RESULT),
            payload,
            record,
        )
        self._told(told)

    # ---- operator reads of device state --------------------------------------------------------
    async def results(self, owner_id: str, device_id: str) -> list[Record]:
        """The device's upgrade results, oldest first (GET /v2/devices/{deviceId}/upgradeResults)."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            thing_id = owned_device(conn, owner_id, device_id)
            rows = conn.execute("SELECT * FROM upgrade_results WHERE thing_id = ? ORDER BY seq", (thing_id,))
            return [
                {
                    "softwareName": r["software_name"],
                    "versionNumber": r["version_number"],
                    "status": r["status"],
                    **({"errorCode": r["error_code"]} if r["error_code"] is not None else {}),
                    **({"message": r["message"]} if r["message"] is not None else {}),
                    **({"clientToken": r["client_token"]} if r["client_token"] is not None else {}),
                    "timestamp": ids.iso(r["ts"]),
                    "transport": r["transport"],
                }
                for r in rows.fetchall()
            ]

        return await self.store.read(read)

    async def reported_versions(self, owner_id: str, device_id: str) -> list[Record]:
        """What the device last reported running, per software (for GET /dev/v1/things/{id}/state)."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            thing_id = owned_device(conn, owner_id, device_id)
            rows = conn.execute(
                "SELECT * FROM device_versions WHERE thing_id = ? ORDER BY software_name", (thing_id,)
            )
            return [
                {
                    "softwareName": r["software_name"],
                    "currentVersionNumber": r["version_number"],
                    "timestamp": ids.iso(r["ts"]),
                }
                for r in rows.fetchall()
            ]

        return await self.store.read(read)


def _upsert_version(conn: sqlite3.Connection, owner_id: str, software: sqlite3.Row, spec: VersionSpec) -> Put:
    profiles = profile_pks(conn, owner_id, spec.rollout_profiles)
    existing = conn.execute(
        "SELECT * FROM software_versions WHERE software_pk = ? AND version_number = ?",
        (software["pk"], spec.version_number),
    ).fetchone()
    before = version_doc(conn, existing) if existing is not None else None
    values = (
        spec.release_date,
        spec.released,
        spec.status,
        spec.priority,
        spec.release_note,
        spec.eula,
        spec.download_url,
        to_json(spec.dependencies),
    )
    if existing is None:
        conn.execute(
            "INSERT INTO software_versions (software_pk, version_number, release_date, released, status, priority,"
            " release_note, eula, download_url, dependencies) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (software["pk"], spec.version_number, *values),
        )
    else:
        conn.execute(
            "UPDATE software_versions SET release_date = ?, released = ?, status = ?, priority = ?, release_note = ?,"
            " eula = ?, download_url = ?, dependencies = ? WHERE pk = ?",
            (*values, existing["pk"]),
        )
    version = software_version(conn, software, spec.version_number)
    conn.execute("DELETE FROM version_profiles WHERE version_pk = ?", (version["pk"],))
    conn.executemany(
        "INSERT INTO version_profiles (version_pk, profile_pk) VALUES (?,?)",
        [(version["pk"], p) for p in profiles],
    )
    versions_changed(conn, software["pk"])
    if existing is None:
        return Put(0, 0, created=True)
    return Put(1, int(version_doc(conn, version) != before))


def _delete_version(conn: sqlite3.Connection, owner_id: str, version_pk: int) -> int:
    told = things_told_of(conn, "version_pk = ?", (version_pk,))
    forget_rollouts(conn, "version_pk = ?", (version_pk,))
    row = conn.execute(
        "DELETE FROM software_versions WHERE pk = ? RETURNING software_pk", (version_pk,)
    ).fetchone()
    for thing_id in told:
        publish_notices(conn, thing_id, owner_id)
    if row is not None:
        versions_changed(conn, row[0])
    return int(row is not None)
