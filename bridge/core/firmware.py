"""Firmware activation (CATALOG.md 004, our design): a product binds an upgrader software to a
provisioning model of the same owner, so that it adds no version model and no content store of its
own. Its template versions are the software's versions (the upgrader's catalog, profiles and
staged rollouts); the firmware of version V is the model's content entity `fw-V` (its blob in the
provisioning content store); its serial numbers are the model's (enrolled, listed, disabled and
logged as provisioning's), and an activated one is the provisioning thing of the vendor's owner.

Activation differs from provisioning's in one rule (CATALOG 004 decision): every activation of an
enrolled serial number of an enabled product issues a new API key and voids the previous one at
once; no make-client step and no enable period. The API key is the serial number's CIK (40 hex,
stored only as a hash), so it is also the device's credential where the other dialects take a
CIK. A disabled product or serial number is refused (Forbidden).

The device's current version is the one it last confirmed (the upgrader's reported version of the
software); its target is what checkForUpgrade resolves for it (account, profile, rollouts). A
confirmation is a SUCCESS upgrade result, recorded by the upgrader's own report, so the device's
history and the staged rollouts it is in move exactly as after an upgradeResult. The target
document is retained on `things/{id}/firmware/target`, re-sent in the transaction of whatever may
change it here (activation, confirmation, the product's firmware) and wherever the upgrader
reports a change of the thing's offers (upgrades.hooks.offers_changed: notify, a released rollout wave,
an account move, a new rollout holding it back) or of its software's versions
(upgrades.hooks.versions_changed: through the upgrader's routes as through ours)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from bridge.core import ids, topics
from bridge.core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    QuotaExceeded,
    Unauthorized,
)
from bridge.core.identity import DeviceIdentity
from bridge.core.listing import Record
from bridge.core.outbox import Outbox, enqueue, restoring
from bridge.core.provisioning import Provisioning
from bridge.core.provisioning.common import Vendor, key, secret_hash
from bridge.core.provisioning.content import Download
from bridge.core.provisioning.content import blob_hooks as content_blob_hooks
from bridge.core.provisioning.serials import log_attempt
from bridge.core.provisioning.vendors import new_cik
from bridge.core.things import CIK_INCARNATION, Things
from bridge.core.upgrades import Upgrades, catalog, fields, hooks, offers
from bridge.store import IntegrityError, Store

CHUNK_MAX = 32 * 1024  # bytes one MQTT chunk carries at most (a device with a few KiB of RAM asks for less)
MAX_VERSION = 120  # so that `fw-<version>` is a content id (at most 128 characters)
CONTENT_PREFIX = "fw-"
THING_ID = "{thingId}"  # in a template version's downloadUrl: the device asking
PRODUCT_FIELDS = ("softwareName", "vendor", "model", "enabled")
VERSION_FIELDS = ("releaseDate", "status", "priority", "releaseNote", "rolloutProfiles")


@dataclass(frozen=True)
class Activation:
    api_key: str  # returned this once; only its hash is kept
    thing_id: str


def version_key(value: Any) -> str:
    """A version number as a path segment and a content id: 1-120 characters, no '/' or control."""
    if not isinstance(value, str) or len(value) > MAX_VERSION:
        raise Invalid(f"version must be a string of 1-{MAX_VERSION} characters")
    return key(value, "version")


def _product_id(value: str) -> str:
    return ids.check_name(value, "productId")


# ---- reads inside a transaction ------------------------------------------------------------------
_PRODUCT = (
    "SELECT p.pk, p.id, p.owner_id, p.enabled, p.software_pk, p.model_pk, s.name AS software_name,"
    " m.name AS model_name, v.pk AS vendor_pk, v.name AS vendor_name, v.owner_id AS vendor_owner"
    " FROM fw_products p JOIN software s ON s.pk = p.software_pk JOIN prov_models m ON m.pk = p.model_pk"
    " JOIN vendors v ON v.pk = m.vendor_pk"
)


def _owned(conn: sqlite3.Connection, owner_id: str, product_id: str) -> sqlite3.Row:
    row = conn.execute(f"{_PRODUCT} WHERE p.id = ? AND p.owner_id = ?", (product_id, owner_id)).fetchone()
    if row is None:
        raise NotFound(f"product {product_id!r:.100} not found")
    return row


def _of_thing(conn: sqlite3.Connection, thing_id: str) -> sqlite3.Row | None:
    """The product of the thing's serial number, if its model is one's."""
    return conn.execute(
        f"{_PRODUCT} JOIN serial_numbers sn ON sn.model_pk = p.model_pk"
        " JOIN sn_clients c ON c.sn_pk = sn.pk WHERE c.thing_id = ?",
        (thing_id,),
    ).fetchone()


def _device_product(conn: sqlite3.Connection, thing_id: str) -> sqlite3.Row:
    product = _of_thing(conn, thing_id)
    if product is None:
        raise Forbidden("this thing's serial number belongs to no firmware product")
    return product


def _image(conn: sqlite3.Connection, software_pk: int, version: str | None) -> sqlite3.Row | None:
    """The firmware of a version (its content entity), once uploaded."""
    if version is None:
        return None
    return conn.execute(
        "SELECT c.*, v.download_url FROM software_versions v JOIN fw_images i ON i.version_pk = v.pk"
        " JOIN prov_content c ON c.pk = i.content_pk"
        " WHERE v.software_pk = ? AND v.version_number = ? AND c.sha256 IS NOT NULL",
        (software_pk, version),
    ).fetchone()


def _things(conn: sqlite3.Connection, model_pk: int) -> list[str]:
    return [
        r["thing_id"]
        for r in conn.execute(
            "SELECT c.thing_id FROM sn_clients c JOIN serial_numbers s ON s.pk = c.sn_pk"
            " WHERE s.model_pk = ? AND c.thing_id IS NOT NULL ORDER BY c.thing_id",
            (model_pk,),
        )
    ]


def firmware_path(mount: str, thing_id: str, version: str) -> str:
    """The device path of a version's firmware (the version percent-encoded: any character but '/'
    may be in it)."""
    return f"{mount}/things/{thing_id}/versions/{quote(version, safe='')}/firmware"


def target_doc(conn: sqlite3.Connection, thing_id: str) -> Record | None:
    """GET .../target: the version the device confirmed last and the one checkForUpgrade offers
    it (its current one when none is newer), with that version's firmware, if uploaded; its URL is
    the version's downloadUrl for this thing (None: the thing is of no product)."""
    product = _of_thing(conn, thing_id)
    owner = conn.execute("SELECT owner_id FROM things WHERE id = ?", (thing_id,)).fetchone()
    if product is None or owner is None:
        return None
    running = conn.execute(
        "SELECT version_number FROM device_versions WHERE thing_id = ? AND software_name = ?",
        (thing_id, product["software_name"]),
    ).fetchone()
    current = running["version_number"] if running is not None else None
    offer = offers.check(conn, thing_id, owner["owner_id"], product["software_name"], current or "")
    target = offer["version"] or None
    image = _image(conn, product["software_pk"], target)
    return {
        "thingId": thing_id,
        "currentVersion": current,
        "targetVersion": target,
        "size": image["size"] if image is not None else None,
        "sha256": image["sha256"] if image is not None else None,
        "firmwareUrl": image["download_url"].replace(THING_ID, thing_id) if image is not None else None,
    }


def publish_target(conn: sqlite3.Connection, thing_id: str) -> None:
    """The retained target document, queued in the caller's transaction (a thing of no product: none)."""
    doc = target_doc(conn, thing_id)
    if doc is not None:
        enqueue(conn, topics.topic(thing_id, topics.FIRMWARE_TARGET), orjson.dumps(doc), retain=True)


def _publish_product(conn: sqlite3.Connection, model_pk: int) -> None:
    for thing_id in _things(conn, model_pk):
        publish_target(conn, thing_id)


def _clear_targets(conn: sqlite3.Connection, model_pk: int) -> None:
    """The model's things are of no product any more: their retained targets go."""
    for thing_id in _things(conn, model_pk):
        enqueue(conn, topics.topic(thing_id, topics.FIRMWARE_TARGET), b"", retain=True)


def _publish_software(conn: sqlite3.Connection, software_pk: int, *, deleting: bool = False) -> None:
    product = conn.execute(
        "SELECT model_pk FROM fw_products WHERE software_pk = ?", (software_pk,)
    ).fetchone()
    if product is not None:
        (_clear_targets if deleting else _publish_product)(conn, product["model_pk"])


def _publish_firmware(conn: sqlite3.Connection, model_pk: int, content_id: str) -> None:
    """A firmware's blob replaced or deleted through provisioning's content routes: the size and
    SHA-256 a device checks its download against follow."""
    if (
        content_id.startswith(CONTENT_PREFIX)
        and conn.execute("SELECT 1 FROM fw_products WHERE model_pk = ?", (model_pk,)).fetchone()
    ):
        _publish_product(conn, model_pk)


# Where the upgrader changes a thing's offers, or a software's versions (through its own routes as
# through ours), or provisioning a firmware's blob, the target follows in the same transaction. A
# deleted software takes its product with it (ON DELETE CASCADE): its things are of no product any
# more, and their retained targets are cleared as when the product is deleted.
hooks.offer_hooks.append(publish_target)
hooks.versions_hooks.append(_publish_software)
hooks.deleting_hooks.append(functools.partial(_publish_software, deleting=True))
content_blob_hooks.append(_publish_firmware)


def _version_doc(conn: sqlite3.Connection, product: sqlite3.Row, row: sqlite3.Row) -> Record:
    image = _image(conn, product["software_pk"], row["version_number"])
    profiles = [
        r["id"]
        for r in conn.execute(
            "SELECT p.id FROM version_profiles vp JOIN rollout_profiles p ON p.pk = vp.profile_pk"
            " WHERE vp.version_pk = ? ORDER BY p.id",
            (row["pk"],),
        )
    ]
    return {
        "version": row["version_number"],
        "releaseDate": row["release_date"],
        "status": row["status"],
        "rolloutProfiles": profiles,
        "size": image["size"] if image is not None else None,
        "sha256": image["sha256"] if image is not None else None,
        "contentType": image["content_type"] if image is not None else None,
    }


def _product_doc(row: sqlite3.Row) -> Record:
    return {
        "id": row["id"],
        "softwareName": row["software_name"],
        "vendor": row["vendor_name"],
        "model": row["model_name"],
        "enabled": bool(row["enabled"]),
    }


def _version_row(conn: sqlite3.Connection, product: sqlite3.Row, version: str) -> sqlite3.Row:
    return catalog.version_row(conn, product["software_pk"], version, f"product {product['id']!r}")


def _vendor(product: sqlite3.Row) -> Vendor:
    return Vendor(product["vendor_pk"], product["vendor_name"], product["vendor_owner"])


class Firmware:
    """`mount`: where the firmware dialect's device operations are served (the firmware URLs)."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        things: Things,
        upgrades_: Upgrades,
        provisioning: Provisioning,
        mount: str,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.things = things
        self.upgrades = upgrades_
        self.provisioning = provisioning
        self.mount = mount
        upgrades_.version_deleted.append(self._drop_image)

    async def republish(self) -> None:
        """At start-up the broker holds no retained messages: every product thing's target again."""

        def queue_all(conn: sqlite3.Connection) -> None:
            for row in conn.execute("SELECT model_pk FROM fw_products ORDER BY pk").fetchall():
                _publish_product(conn, row["model_pk"])

        await self.outbox.write(restoring(queue_all))

    # ---- products (the vendor's owner, an operator) ----------------------------------------------
    async def put_product(self, owner_id: str, product_id: str, body: dict[str, Any]) -> tuple[Record, bool]:
        """Create or rebind a product: `softwareName` (the owner's upgrader software), `vendor` and
        `model` (a model of one of the owner's vendors), `enabled` (default true). Each software
        and each model is in one product at most. Returns (the product, created)."""
        _product_id(product_id)
        body = fields.as_object(body, PRODUCT_FIELDS, "product")
        name = fields.text_field(body, "softwareName", required=True) or ""
        vendor = fields.text_field(body, "vendor", required=True) or ""
        model = fields.text_field(body, "model", required=True) or ""
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            raise Invalid("enabled must be true or false")

        def put(conn: sqlite3.Connection) -> tuple[Record, bool]:
            try:
                software = catalog.software_row(conn, owner_id, name)
            except NotFound as exc:
                raise Invalid(f"softwareName: {exc}") from exc
            found = conn.execute(
                "SELECT m.pk FROM prov_models m JOIN vendors v ON v.pk = m.vendor_pk"
                " WHERE v.name = ? AND v.owner_id = ? AND v.revoked IS NULL AND m.name = ?",
                (vendor, owner_id, model),
            ).fetchone()
            if found is None:
                raise Invalid(f"no model {model!r:.100} of a vendor {vendor!r:.100} of yours")
            existing = conn.execute("SELECT * FROM fw_products WHERE id = ?", (product_id,)).fetchone()
            if existing is not None and existing["owner_id"] != owner_id:
                raise Conflict(f"product id {product_id!r} is not available")
            try:
                if existing is None:
                    conn.execute(
                        "INSERT INTO fw_products (id, owner_id, software_pk, model_pk, enabled, created)"
                        " VALUES (?,?,?,?,?,?)",
                        (product_id, owner_id, software["pk"], found["pk"], int(enabled), ids.now()),
                    )
                else:
                    conn.execute(
                        "UPDATE fw_products SET software_pk = ?, model_pk = ?, enabled = ? WHERE pk = ?",
                        (software["pk"], found["pk"], int(enabled), existing["pk"]),
                    )
            except IntegrityError as exc:
                raise Conflict("that software or model is bound to another product") from exc
            if existing is not None and existing["model_pk"] != found["pk"]:
                _clear_targets(conn, existing["model_pk"])
            product = _owned(conn, owner_id, product_id)
            _publish_product(conn, product["model_pk"])
            return _product_doc(product), existing is None

        return await self.outbox.write(put)

    async def products(self, owner_id: str) -> list[Record]:
        rows = await self.store.read(
            lambda c: c.execute(f"{_PRODUCT} WHERE p.owner_id = ? ORDER BY p.id", (owner_id,)).fetchall()
        )
        return [_product_doc(r) for r in rows]

    async def product(self, owner_id: str, product_id: str) -> Record:
        return _product_doc(await self.store.read(_owned, owner_id, product_id))

    async def delete_product(self, owner_id: str, product_id: str) -> None:
        """The binding only: the software, its versions, the model, its serial numbers, content and
        things stay the upgrader's and provisioning's. The things' retained targets are cleared."""

        def delete(conn: sqlite3.Connection) -> None:
            product = _owned(conn, owner_id, product_id)
            conn.execute("DELETE FROM fw_products WHERE pk = ?", (product["pk"],))
            _clear_targets(conn, product["model_pk"])

        await self.outbox.write(delete)

    # ---- template versions and their firmware ----------------------------------------------------
    async def versions(self, owner_id: str, product_id: str) -> list[Record]:
        def read(conn: sqlite3.Connection) -> list[Record]:
            product = _owned(conn, owner_id, product_id)
            rows = conn.execute(
                "SELECT * FROM software_versions WHERE software_pk = ? ORDER BY released, pk",
                (product["software_pk"],),
            ).fetchall()
            return [_version_doc(conn, product, r) for r in rows]

        return await self.store.read(read)

    async def version(self, owner_id: str, product_id: str, version: str) -> Record:
        def read(conn: sqlite3.Connection) -> Record:
            product = _owned(conn, owner_id, product_id)
            return _version_doc(conn, product, _version_row(conn, product, version))

        return await self.store.read(read)

    async def put_version(
        self, owner_id: str, product_id: str, version: str, body: dict[str, Any]
    ) -> tuple[Record, bool]:
        """Upsert a template version: the upgrader's version of the product's software (status
        default OK, its download URL the firmware path, `{thingId}` standing for the device)."""
        version = version_key(version)
        body = fields.as_object(body, VERSION_FIELDS, "version")
        product = await self.store.read(_owned, owner_id, product_id)
        spec = {
            "status": "OK",
            **{k: v for k, v in body.items() if v is not None},
            "versionNumber": version,
            "downloadUrl": firmware_path(self.mount, THING_ID, version),
        }
        put = await self.upgrades.put_version(owner_id, product["software_name"], version, spec)
        return await self.version(owner_id, product_id, version), put.created

    async def upload(
        self, owner_id: str, product_id: str, version: str, content_type: str, chunks: AsyncIterable[bytes]
    ) -> Record:
        """The version's firmware: the model's content entity `fw-<version>` (created when missing,
        unprotected: every serial number of the model may have it) gets the bytes, through the
        provisioning content store (size bound, content-addressed blob)."""
        version = version_key(version)

        def read(conn: sqlite3.Connection) -> sqlite3.Row:
            product = _owned(conn, owner_id, product_id)
            _version_row(conn, product, version)
            return product

        product = await self.store.read(read)
        body = await _not_empty(chunks)  # before anything is created or replaced
        content, vendor, model = self.provisioning.content, _vendor(product), product["model_name"]
        content_id = CONTENT_PREFIX + version
        with contextlib.suppress(Conflict):  # uploaded before: the blob is replaced
            await content.create(vendor, model, content_id, f"firmware {version} of product {product_id}")
        await content.upload(vendor, model, content_id, content_type, body)

        def link(conn: sqlite3.Connection) -> Record:
            current = _owned(conn, owner_id, product_id)
            row = _version_row(conn, current, version)
            entity = conn.execute(
                "SELECT pk FROM prov_content WHERE model_pk = ? AND id = ?", (current["model_pk"], content_id)
            ).fetchone()
            if entity is None:
                raise NotFound(f"the firmware of version {version!r:.100} was deleted meanwhile")
            conn.execute(
                "INSERT INTO fw_images (version_pk, content_pk) VALUES (?,?)"
                " ON CONFLICT (version_pk) DO UPDATE SET content_pk = excluded.content_pk",
                (row["pk"], entity["pk"]),
            )
            _publish_product(conn, current["model_pk"])
            return _version_doc(conn, current, row)

        return await self.outbox.write(link)

    async def delete_version(self, owner_id: str, product_id: str, version: str) -> None:
        """The upgrader's version (with its profiles, notices and rollouts) and its firmware entity
        (`_drop_image`, as when the upgrader's own route deletes it)."""
        product = await self.store.read(_owned, owner_id, product_id)
        await self.upgrades.delete_version(owner_id, product["software_name"], version)

    async def _drop_image(self, owner_id: str, software: str, version: str) -> None:
        """After the software's version was deleted: the image of each product bound to it."""
        products = await self.store.read(
            lambda c: c.execute(
                f"{_PRODUCT} WHERE p.owner_id = ? AND s.name = ?", (owner_id, software)
            ).fetchall()
        )
        for product in products:
            await self.provisioning.content.delete(
                _vendor(product), product["model_name"], CONTENT_PREFIX + version
            )

    # ---- serial numbers (provisioning's, through the product) ------------------------------------
    async def _model(self, owner_id: str | None, product_id: str) -> tuple[Vendor, str]:
        def read(conn: sqlite3.Connection) -> sqlite3.Row:
            if owner_id is not None:
                return _owned(conn, owner_id, product_id)
            row = conn.execute(f"{_PRODUCT} WHERE p.id = ?", (product_id,)).fetchone()
            if row is None:
                raise NotFound(f"product {product_id!r:.100} not found")
            return row

        product = await self.store.read(read)
        return _vendor(product), product["model_name"]

    async def import_serials(self, owner_id: str | None, product_id: str, body: AsyncIterable[bytes]) -> int:
        """`<sn>[,<extra>]` CSV lines into the product's model, in one transaction (provisioning's
        import). `owner_id` None: the command line, for any owner's product."""
        vendor, model = await self._model(owner_id, product_id)
        return await self.provisioning.serials.import_csv(vendor, model, body)

    async def serial(self, owner_id: str, product_id: str, sn: str) -> Record:
        """{serialNumber, status (unused, enabled, expired, activated, disabled), thingId}."""
        vendor, model = await self._model(owner_id, product_id)
        info = await self.provisioning.serials.info(vendor, model, sn)

        def thing(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT c.thing_id FROM sn_clients c JOIN serial_numbers s ON s.pk = c.sn_pk"
                " JOIN prov_models m ON m.pk = s.model_pk WHERE m.vendor_pk = ? AND m.name = ? AND s.sn = ?",
                (vendor.pk, model, sn),
            ).fetchone()
            return row["thing_id"] if row is not None else None

        status = info.status if info is not None else "unused"
        return {"serialNumber": sn, "status": status, "thingId": await self.store.read(thing)}

    async def set_serial(self, owner_id: str, product_id: str, sn: str, enabled: bool) -> Record:
        """Disable (the API key stops working, the thing is disabled, activations refused) or enable
        again (provisioning's re-enable: the next activation issues a key). A serial number never
        activated has no client in provisioning's terms (whose disable=true is 409 then): disabling
        it gives it a disabled one, so that its activations are refused until it is enabled;
        enabling an unused one changes nothing (firmware activation needs no enable step)."""
        vendor, model = await self._model(owner_id, product_id)
        serials = self.provisioning.serials
        if not enabled:

            def block(conn: sqlite3.Connection) -> None:
                row = conn.execute(
                    "SELECT s.pk FROM serial_numbers s JOIN prov_models m ON m.pk = s.model_pk"
                    " WHERE m.vendor_pk = ? AND m.name = ? AND s.sn = ?"
                    " AND NOT EXISTS (SELECT 1 FROM sn_clients c WHERE c.sn_pk = s.pk)",
                    (vendor.pk, model, sn),
                ).fetchone()
                if row is not None:
                    _new_client(conn, row["pk"], vendor.pk, "disabled")

            await self.store.write(block)
            await serials.disable(vendor, model, sn)
        elif (await self.serial(owner_id, product_id, sn))["status"] != "unused":
            await serials.regenerate(vendor, model, sn)
        return await self.serial(owner_id, product_id, sn)

    # ---- the device -----------------------------------------------------------------------------
    async def activate(self, sn: str, product_id: str | None, *, remote: str, agent: str) -> Activation:
        """POST /fw/v1/activate. NotFound: no enabled vendor's product has the serial number;
        Invalid: several have and `product` does not say which; Forbidden: the product or the
        serial number is disabled, or the owner's plan is full. Each attempt is in the serial
        number's activation log. TooManyRequests: too many unknown serial numbers from this address
        (Serials.attempt)."""
        api_key = new_cik()
        incarnation = f"{CIK_INCARNATION}{secrets.token_hex(16)}"
        serials = self.provisioning.serials

        def activate(conn: sqlite3.Connection) -> tuple[str | None, str | None, DomainError | None]:
            rows = conn.execute(
                "SELECT s.pk, s.sn, m.name AS model, v.owner_id, v.pk AS vendor_pk, p.enabled, c.rid, c.status,"
                " c.thing_id FROM serial_numbers s JOIN fw_products p ON p.model_pk = s.model_pk"
                " JOIN prov_models m ON m.pk = s.model_pk JOIN vendors v ON v.pk = m.vendor_pk"
                " LEFT JOIN sn_clients c ON c.sn_pk = s.pk"
                " WHERE s.sn = ? AND v.revoked IS NULL AND (? IS NULL OR p.id = ?)",
                (sn, product_id, product_id),
            ).fetchall()
            if not rows:
                raise NotFound(f"serial number {sn!r:.100} is not one of a product")
            if len(rows) > 1:
                raise Invalid(f"serial number {sn!r:.100} is in several products: name the product")
            row = rows[0]
            refused: DomainError | None = None
            if not row["enabled"]:
                refused = Forbidden("the product is disabled")
            elif row["status"] == "disabled":
                refused = Forbidden(f"serial number {sn!r:.100} is disabled")
            else:
                if row["rid"] is None:  # never made a client: firmware activation needs no enable step
                    _new_client(conn, row["pk"], row["vendor_pk"], "enabled")
                try:
                    serials.activate_client(conn, row, secret_hash(api_key), incarnation)
                except QuotaExceeded as exc:
                    refused = Forbidden(f"the vendor's owner has no room for another thing ({exc})")
            log_attempt(
                conn, row["pk"], ids.now(), remote, agent, str(refused) if refused else "activated (firmware)"
            )
            if refused is not None:
                return None, None, refused
            thing_id = conn.execute(
                "SELECT thing_id FROM sn_clients WHERE sn_pk = ?", (row["pk"],)
            ).fetchone()[0]
            publish_target(conn, thing_id)
            return thing_id, row["thing_id"], None

        with serials.attempt(remote, f"firmware:{product_id or '*'}"):
            thing_id, previous, refused = await self.outbox.write(activate)
        if refused is not None:
            raise refused
        if previous is not None:  # sessions and cached checks of the previous key go
            await self.things.revoke(previous, deleted=False)
        assert thing_id is not None
        return Activation(api_key, thing_id)

    async def identify(self, api_key: str) -> DeviceIdentity:
        """The thing behind an API key: Unauthorized unless it is the current key of an activated
        serial number whose thing is enabled."""
        try:
            return await self.provisioning.serials.identify_cik(api_key)
        except Unauthorized:
            raise Unauthorized("unknown, revoked or replaced API key") from None

    async def target(self, device: DeviceIdentity) -> Record:
        def read(conn: sqlite3.Connection) -> Record:
            _device_product(conn, device.thing_id)
            doc = target_doc(conn, device.thing_id)
            assert doc is not None
            return doc

        return await self.store.read(read)

    async def image(self, device: DeviceIdentity, version: str) -> Download:
        """A version of the thing's product, with its firmware uploaded: NotFound otherwise."""
        version = version_key(version)

        def read(conn: sqlite3.Connection) -> Download:
            product = _device_product(conn, device.thing_id)
            _version_row(conn, product, version)
            row = _image(conn, product["software_pk"], version)
            if row is None:
                raise NotFound(f"version {version!r:.100} has no firmware uploaded")
            return Download(
                self.provisioning.blobs.path(row["sha256"]),
                row["content_type"],
                row["size"],
                row["sha256"],
                int(row["updated"]),
            )

        return await self.store.read(read)

    async def chunk(self, device: DeviceIdentity, body: Any) -> tuple[int, bytes]:
        """things/{id}/firmware/get {version, offset, length}: (offset, the bytes from there),
        at most CHUNK_MAX of them. An offset at or past the end is Invalid."""
        body = fields.as_object(body, ("version", "offset", "length"), "body")
        offset, length = body.get("offset"), body.get("length", CHUNK_MAX)
        for name, value, low in (("offset", offset, 0), ("length", length, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise Invalid(f"{name} must be an integer of at least {low}")
        download = await self.image(device, body.get("version"))
        if offset >= download.size:
            raise Invalid(f"offset {offset} is at or past the end of the firmware ({download.size} bytes)")
        return offset, await asyncio.to_thread(_read, download, offset, min(length, CHUNK_MAX))

    async def switched(self, device: DeviceIdentity, body: Any) -> Record:
        """things/{id}/firmware/switched {version}."""
        return await self.switch(
            device, fields.as_object(body, ("version",), "body").get("version"), transport="mqtt"
        )

    async def switch(self, device: DeviceIdentity, version: Any, *, transport: str) -> Record:
        """PUT .../version, things/{id}/firmware/switched: the device runs `version` of its product
        now. Recorded as the upgrader's SUCCESS result (history, rollouts), then the target."""
        version = version_key(version)

        def read(conn: sqlite3.Connection) -> str:
            product = _device_product(conn, device.thing_id)
            _version_row(conn, product, version)
            return product["software_name"]

        name = await self.store.read(read)
        result = {"softwareName": name, "versionNumber": version, "status": "SUCCESS"}
        await self.upgrades.report_results(
            device, {"currentVersionsUpgradeResult": [result]}, transport=transport
        )
        await self.outbox.write(publish_target, device.thing_id)
        return {"thingId": device.thing_id, "currentVersion": version}


def _new_client(conn: sqlite3.Connection, sn_pk: int, vendor_pk: int, status: str) -> None:
    """Provisioning's client of a serial number that had none (no enable period: the firmware
    dialect's activation needs none)."""
    conn.execute(
        "INSERT INTO sn_clients (sn_pk, rid, status, enable_expires, enabled_by) VALUES (?,?,?,?,?)",
        (sn_pk, new_cik(), status, ids.now(), vendor_pk),
    )


async def _not_empty(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The body again, once its first byte has come: Invalid for an empty one (every firmware/get
    of an empty image would be past its end, and a device cannot tell it from a lost upload)."""
    rest = aiter(chunks)
    async for first in rest:
        if first:
            break
    else:
        raise Invalid("the firmware is empty: send the image's bytes")

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in rest:
            yield chunk

    return body()


def _read(download: Download, offset: int, length: int) -> bytes:
    try:
        with download.path.open("rb") as f:
            f.seek(offset)
            return f.read(length)
    except FileNotFoundError as exc:  # replaced by an upload meanwhile
        raise NotFound("the firmware was replaced meanwhile: read the target again") from exc
