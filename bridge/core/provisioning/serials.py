"""Models and their serial numbers: enrolment (one, many, or a CSV import of any size in one
transaction), the client lifecycle (CATALOG 002 #12: make client -> `enabled` until it expires ->
activate -> `activated`; regenerate CIK or remap -> `enabled` again; disable -> `disabled`), the
activation log, and the CIK as a device credential.

One registry: the first activation of a serial number makes it a thing of the vendor's owner,
counted in the owner's plan. Its id is `sn-<model>-<serial number>` when that is a valid thing id
(at most 64 characters of letters, digits, '.', '_', '-') that is free, else `sn-` and 40 random
hex digits; it keeps that id for life (also when remapped to another serial number). The thing
has no certificate: its credential is the CIK, and `cert_id` is `cik:<random>`, renewed at each
activation, so that an identity established with an older CIK fails `Things.standing` and the
device's writes are refused in their own transaction. With its CIK the device may get a
certificate for a key of its own (Things.certify) and connect over MQTT/TLS as the same thing; a
new activation voids that certificate too. Whatever takes the CIK away (regenerate,
remap, disable, delete) disables or deletes the thing and closes its live sessions through
`Things.revoke`, as deleting or disabling a thing does."""

from __future__ import annotations

import contextlib
import re
import secrets
import sqlite3
import tempfile
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import orjson

from bridge.core import ids
from bridge.core.accounts import active_policy
from bridge.core.credentials import FailureLimiter
from bridge.core.errors import Conflict, DomainError, Invalid, NotFound, QuotaExceeded, Unauthorized
from bridge.core.identity import DeviceIdentity
from bridge.core.outbox import Outbox, forget_thing
from bridge.core.provisioning.blobs import Blobs
from bridge.core.provisioning.common import (
    Access,
    Page,
    Vendor,
    csv_batches,
    key,
    model_access,
    model_not_found,
    secret_hash,
    text,
)
from bridge.core.provisioning.vendors import new_cik
from bridge.core.things import CIK_INCARNATION, Thing, Things, insert_thing
from bridge.store import IntegrityError, Store

ACTIVATION = "activation"  # the failure limiter's realm

OPTIONS = ("noaliases", "nocomments", "nohistorical")
LOG_KEPT = 100  # activation log entries kept per serial number (a device retrying cannot grow it)
_CIK = re.compile(r"[0-9a-f]{40}")
_THING_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Model:
    name: str
    rid: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class SerialNumber:
    """A row of the serial-number list (SNLIST): `rid` empty before a client is made; `extra`
    empty when read through a share."""

    sn: str
    rid: str
    extra: str


@dataclass(frozen=True)
class SerialInfo:
    """SNINFO: status `enabled` (waiting for activation), `expired`, `activated` or `disabled`."""

    status: str
    rid: str
    extra: str


@dataclass(frozen=True)
class LogEntry:
    ts: float
    remote: str
    agent: str
    entry: str


@dataclass(frozen=True)
class Client:
    """The thing and the serial number a device CIK stands for."""

    identity: DeviceIdentity
    model_pk: int
    sn_pk: int


def _options(options: Iterable[str]) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(options))
    unknown = [o for o in values if o not in OPTIONS]
    if unknown:
        raise Invalid(f"options[] may be {', '.join(OPTIONS)}, not {unknown[0]!r:.60}")
    return values


def _serial(conn: sqlite3.Connection, access: Access, sn: str) -> sqlite3.Row:
    """The serial number with its client (if any). Through a share only those the caller enabled
    exist; another vendor's enabled one and a missing one are the same NotFound."""
    row = conn.execute(
        "SELECT s.pk, s.sn, s.extra, c.rid, c.status, c.enable_expires, c.enabled_by, c.thing_id"
        " FROM serial_numbers s LEFT JOIN sn_clients c ON c.sn_pk = s.pk WHERE s.model_pk = ? AND s.sn = ?",
        (access.model_pk, sn),
    ).fetchone()
    if row is None or (access.shared and row["enabled_by"] not in (None, access.vendor.pk)):
        raise NotFound(f"serial number {sn!r:.140} not found")
    return row


def _client(conn: sqlite3.Connection, access: Access, sn: str) -> sqlite3.Row:
    row = _serial(conn, access, sn)
    if row["rid"] is None:
        raise Conflict(f"serial number {sn!r:.140} has no client yet: make one (enable=true&owner=...)")
    if access.shared and row["enabled_by"] != access.vendor.pk:
        raise NotFound(f"serial number {sn!r:.140} not found")
    return row


def _take_cik(
    conn: sqlite3.Connection, sn_pk: int, thing_id: str | None, status: str, expires: float
) -> None:
    """The client's CIK stops working in this transaction and its thing is disabled until the
    next activation; the caller closes the thing's sessions once it committed."""
    conn.execute(
        "UPDATE sn_clients SET status = ?, enable_expires = ?, cik_hash = NULL WHERE sn_pk = ?",
        (status, expires, sn_pk),
    )
    if thing_id is not None:
        conn.execute("UPDATE things SET enabled = 0 WHERE id = ?", (thing_id,))


def _delete_things(conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> list[str]:
    """Delete the things of the serial numbers selected by `where` (on serial_numbers s), in the
    caller's transaction; their ids, for Things.revoke once committed."""
    things = [
        r["thing_id"]
        for r in conn.execute(
            "SELECT c.thing_id FROM sn_clients c JOIN serial_numbers s ON s.pk = c.sn_pk"
            f" WHERE c.thing_id IS NOT NULL AND {where}",
            args,
        ).fetchall()
    ]
    for thing_id in things:
        forget_thing(conn, thing_id)
        conn.execute("DELETE FROM things WHERE id = ?", (thing_id,))
    return things


def _thing_id(conn: sqlite3.Connection, model: str, sn: str) -> str:
    readable = f"sn-{model}-{sn}"
    if (
        _THING_ID.fullmatch(readable)
        and not conn.execute(
            "SELECT 1 FROM things WHERE id = ? UNION SELECT 1 FROM thing_state WHERE reg_id = ?",
            (readable, readable),
        ).fetchone()
    ):
        return readable
    return f"sn-{secrets.token_hex(20)}"


class Serials:
    """Models, serial numbers and their clients. `clock`: epoch seconds (tests inject theirs)."""

    def __init__(
        self,
        store: Store,
        things: Things,
        outbox: Outbox,
        blobs: Blobs,
        *,
        enable_expiry: int,
        free_plan_things: int,
        clock: Callable[[], float] = ids.now,
    ) -> None:
        self.store = store
        self.things = things
        self.outbox = outbox
        self.blobs = blobs
        self.enable_expiry = enable_expiry
        self.free_plan_things = free_plan_things
        self.clock = clock
        # Failed activations (unknown serial numbers) per address and claim: guessing them is slowed down.
        self.limiter = FailureLimiter(what="activations")

    async def _revoke(self, thing_ids: Iterable[str], *, deleted: bool) -> None:
        for thing_id in thing_ids:
            await self.things.revoke(thing_id, deleted=deleted)

    # ---- models ---------------------------------------------------------------------------------
    async def list_models(self, vendor: Vendor) -> list[str]:
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT name FROM prov_models WHERE vendor_pk = ? ORDER BY name", (vendor.pk,)
            ).fetchall()
        )
        return [r["name"] for r in rows]

    async def list_shared_models(self, vendor: Vendor) -> list[tuple[str, str]]:
        """(vendor name, model) of the models other vendors shared with this one."""
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT v.name AS vendor, m.name AS model FROM prov_shares s"
                " JOIN prov_models m ON m.pk = s.model_pk JOIN vendors v ON v.pk = m.vendor_pk"
                " WHERE s.vendor_pk = ? AND v.revoked IS NULL ORDER BY v.name, m.name",
                (vendor.pk,),
            ).fetchall()
        )
        return [(r["vendor"], r["model"]) for r in rows]

    async def create_model(self, vendor: Vendor, name: str, rid: str, options: Iterable[str] = ()) -> Model:
        model = Model(key(name, "model"), key(rid, "rid"), _options(options))

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO prov_models (vendor_pk, name, rid, options, created) VALUES (?,?,?,?,?)",
                    (vendor.pk, model.name, model.rid, orjson.dumps(model.options).decode(), self.clock()),
                )
            except IntegrityError as exc:
                raise Conflict(f"model {name!r:.140} already exists") from exc

        await self.store.write(insert)
        return model

    async def model(self, vendor: Vendor, name: str) -> Model:
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT * FROM prov_models WHERE vendor_pk = ? AND name = ?", (vendor.pk, name)
            ).fetchone()
        )
        if row is None:
            raise model_not_found(name)
        return Model(row["name"], row["rid"], tuple(orjson.loads(row["options"])))

    async def update_model(self, vendor: Vendor, name: str, rid: str, options: Iterable[str] = ()) -> Model:
        model = Model(name, key(rid, "rid"), _options(options))

        def update(conn: sqlite3.Connection) -> None:
            access = model_access(conn, vendor, name)
            conn.execute(
                "UPDATE prov_models SET rid = ?, options = ? WHERE pk = ?",
                (model.rid, orjson.dumps(model.options).decode(), access.model_pk),
            )

        await self.store.write(update)
        return model

    async def delete_model(self, vendor: Vendor, name: str) -> None:
        """With its serial numbers (and the things they became), content (and blobs), groups and shares.
        Deleting a missing model is done already (CATALOG 002 #13)."""

        def delete(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            try:
                access = model_access(conn, vendor, name)
            except NotFound:
                return [], []
            things = _delete_things(conn, "s.model_pk = ?", (access.model_pk,))
            blobs = [
                r["sha256"]
                for r in conn.execute(
                    "SELECT DISTINCT sha256 FROM prov_content WHERE model_pk = ? AND sha256 IS NOT NULL",
                    (access.model_pk,),
                )
            ]
            conn.execute("DELETE FROM prov_models WHERE pk = ?", (access.model_pk,))
            return things, blobs

        things, blobs = await self.store.write(delete)
        await self.blobs.release(blobs)  # those another model's content does not share
        await self._revoke(things, deleted=True)

    # ---- serial numbers -------------------------------------------------------------------------
    async def list_serials(
        self,
        vendor: Vendor,
        model: str,
        page: Page,
        *,
        as_vendor: str | None = None,
        enabled_by: str | None = None,
    ) -> list[SerialNumber]:
        """SNLIST in enrolment order. Through a share: only those the caller enabled, `extra`
        empty. `enabled_by` (the `shared=<vendor>` filter): only those that vendor enabled."""

        def read(conn: sqlite3.Connection) -> list[SerialNumber]:
            access = model_access(conn, vendor, model, as_vendor)
            where, args = "s.model_pk = ?", [access.model_pk]
            if access.shared:
                where += " AND c.enabled_by = ?"
                args.append(vendor.pk)
            if enabled_by is not None:
                where += " AND c.enabled_by = (SELECT pk FROM vendors WHERE name = ?)"
                args.append(enabled_by)
            rows = conn.execute(
                "SELECT s.sn, s.extra, c.rid FROM serial_numbers s LEFT JOIN sn_clients c ON c.sn_pk = s.pk"
                f" WHERE {where} ORDER BY s.pk{page.sql}",
                args,
            ).fetchall()
            return [SerialNumber(r["sn"], r["rid"] or "", "" if access.shared else r["extra"]) for r in rows]

        return await self.store.read(read)

    async def add_serials(self, vendor: Vendor, model: str, serials: Iterable[tuple[str, str]]) -> int:
        """Form bodies (`sn` + `extra`, or `sn[]`): (serial number, extra) pairs, all or none;
        Conflict naming the first that exists (or repeats)."""
        rows = [(key(sn, "sn"), text(extra, "extra")) for sn, extra in serials]
        return await self.store.write(self._insert, vendor, model, [rows])

    async def import_csv(self, vendor: Vendor, model: str, body: AsyncIterable[bytes]) -> int:
        """A `text/csv` body of `<sn>,<extra>` lines, of any size, in one transaction: all or none.
        The body is parsed and checked as it arrives and spooled to a temporary file, a batch at a
        time (memory stays bounded), then inserted batch by batch by one write, so the writer is held
        for the inserts only, never while a slow client uploads. A batch is spooled as one JSON line
        (JSON escapes line breaks): read back several times faster than CSV, on the writer thread."""
        with tempfile.TemporaryFile("w+b") as spool:
            async for batch in csv_batches(body, (1, 2)):
                rows = [(key(r[0], "sn"), text(r[1] if len(r) > 1 else "", "extra")) for r in batch]
                spool.write(orjson.dumps(rows))
                spool.write(b"\n")
            spool.seek(0)
            return await self.store.write(self._insert, vendor, model, map(orjson.loads, spool))

    def _insert(
        self, conn: sqlite3.Connection, vendor: Vendor, model: str, chunks: Iterable[Sequence[Sequence[str]]]
    ) -> int:
        access = model_access(conn, vendor, model)
        added = 0
        for chunk in chunks:
            before = conn.total_changes
            try:
                conn.executemany(
                    "INSERT INTO serial_numbers (model_pk, sn, extra) VALUES (?,?,?)",
                    [(access.model_pk, sn, extra) for sn, extra in chunk],
                )
            except IntegrityError as exc:
                # executemany stopped at the first row it could not insert, after the others
                duplicate = chunk[conn.total_changes - before][0]
                raise Conflict(f"serial number {duplicate!r:.140} already exists") from exc
            added += len(chunk)
        return added

    async def remove_serials(self, vendor: Vendor, model: str, serials: Iterable[str]) -> None:
        """Their clients go with them: a CIK stops working and the thing it became is deleted, its
        sessions closed. Missing ones are gone already."""
        names = list(dict.fromkeys(key(sn, "sn") for sn in serials))

        def delete(conn: sqlite3.Connection) -> list[str]:
            access = model_access(conn, vendor, model)
            things: list[str] = []
            for start in range(0, len(names), 500):  # bound the number of SQL parameters
                part = names[start : start + 500]
                marks = ",".join("?" * len(part))
                where = f"s.model_pk = ? AND s.sn IN ({marks})"
                things += _delete_things(conn, where, (access.model_pk, *part))
                conn.execute(f"DELETE FROM serial_numbers AS s WHERE {where}", (access.model_pk, *part))
            return things

        await self._revoke(await self.store.write(delete), deleted=True)

    async def remove_csv(self, vendor: Vendor, model: str, body: AsyncIterable[bytes]) -> None:
        """A `text/csv` body of `<sn>` lines (DELETE .../model/{model}/, CATALOG 002 #1)."""
        names = [record[0] async for batch in csv_batches(body, (1, 1)) for record in batch]
        await self.remove_serials(vendor, model, names)

    async def info(
        self, vendor: Vendor, model: str, sn: str, *, as_vendor: str | None = None
    ) -> SerialInfo | None:
        """SNINFO; None when the serial number is unused (no client: the document's 204)."""

        def read(conn: sqlite3.Connection) -> SerialInfo | None:
            access = model_access(conn, vendor, model, as_vendor)
            row = _serial(conn, access, sn)
            if row["rid"] is None:
                return None
            status = row["status"]
            if status == "enabled" and row["enable_expires"] <= self.clock():
                status = "expired"
            return SerialInfo(status, row["rid"], "" if access.shared else row["extra"])

        return await self.store.read(read)

    async def log(
        self, vendor: Vendor, model: str, sn: str, *, as_vendor: str | None = None
    ) -> list[LogEntry]:
        def read(conn: sqlite3.Connection) -> list[LogEntry]:
            row = _serial(conn, model_access(conn, vendor, model, as_vendor), sn)
            return [
                LogEntry(r["ts"], r["remote"], r["agent"], r["entry"])
                for r in conn.execute("SELECT * FROM sn_log WHERE sn_pk = ? ORDER BY seq", (row["pk"],))
            ]

        return await self.store.read(read)

    # ---- the client lifecycle -------------------------------------------------------------------
    async def make_client(
        self, vendor: Vendor, model: str, sn: str, owner: str, *, as_vendor: str | None = None
    ) -> str:
        """enable=true&owner=<rid>: the serial number gets a client (its rid is returned) and is
        enabled for activation until `enable_expiry` from now. The things it will become belong to
        the model vendor's owner: `owner` is checked as a rid and otherwise not used. Conflict
        when it has a client already, or when the owner's plan has no room for another thing."""
        key(owner, "owner")
        rid = new_cik()

        def make(conn: sqlite3.Connection) -> str:
            access = model_access(conn, vendor, model, as_vendor)
            row = _serial(conn, access, sn)
            if row["rid"] is not None:
                raise Conflict(f"serial number {sn!r:.140} has a client already; enable=true re-enables it")
            owner_id = conn.execute(
                "SELECT v.owner_id FROM prov_models m JOIN vendors v ON v.pk = m.vendor_pk WHERE m.pk = ?",
                (access.model_pk,),
            ).fetchone()["owner_id"]
            _room(conn, owner_id, self.free_plan_things)
            conn.execute(
                "INSERT INTO sn_clients (sn_pk, rid, status, enable_expires, enabled_by) VALUES (?,?,?,?,?)",
                (row["pk"], rid, "enabled", self.clock() + self.enable_expiry, vendor.pk),
            )
            return rid

        return await self.store.write(make)

    async def regenerate(self, vendor: Vendor, model: str, sn: str, *, as_vendor: str | None = None) -> None:
        """enable=true: the current CIK stops working now; enabled again until `enable_expiry`, and
        the next activation returns a new one (also re-enables a disabled serial number)."""

        def enable(conn: sqlite3.Connection) -> str | None:
            row = _client(conn, model_access(conn, vendor, model, as_vendor), sn)
            _take_cik(conn, row["pk"], row["thing_id"], "enabled", self.clock() + self.enable_expiry)
            conn.execute("UPDATE sn_clients SET enabled_by = ? WHERE sn_pk = ?", (vendor.pk, row["pk"]))
            return row["thing_id"]

        await self._revoke(filter(None, [await self.store.write(enable)]), deleted=False)

    async def disable(self, vendor: Vendor, model: str, sn: str, *, as_vendor: str | None = None) -> None:
        """disable=true: the CIK stops working and the thing is disabled (sessions closed) until the
        serial number is enabled and activated again."""

        def disable(conn: sqlite3.Connection) -> str | None:
            row = _client(conn, model_access(conn, vendor, model, as_vendor), sn)
            _take_cik(conn, row["pk"], row["thing_id"], "disabled", row["enable_expires"])
            return row["thing_id"]

        await self._revoke(filter(None, [await self.store.write(disable)]), deleted=False)

    async def remap(
        self, vendor: Vendor, model: str, sn: str, old_sn: str, *, as_vendor: str | None = None
    ) -> None:
        """enable=true&oldsn=: the client of `old_sn` (its rid, and its thing with its history) moves
        to `sn`, which must have none; the old CIK stops working and `sn` is enabled for activation;
        `old_sn` is left unused."""

        def move(conn: sqlite3.Connection) -> str | None:
            access = model_access(conn, vendor, model, as_vendor)
            old = _client(conn, access, old_sn)
            new = _serial(conn, access, sn)
            if new["rid"] is not None:
                raise Conflict(f"serial number {sn!r:.140} has a client already")
            conn.execute(
                "UPDATE sn_clients SET sn_pk = ?, enabled_by = ? WHERE sn_pk = ?",
                (new["pk"], vendor.pk, old["pk"]),
            )
            _take_cik(conn, new["pk"], old["thing_id"], "enabled", self.clock() + self.enable_expiry)
            return old["thing_id"]

        await self._revoke(filter(None, [await self.store.write(move)]), deleted=False)

    # ---- the device side ------------------------------------------------------------------------
    @contextlib.contextmanager
    def attempt(self, remote: str, claim: str) -> Iterator[None]:
        """One activation from address `remote` on `claim` (a model, a firmware product). NotFound
        counts as a failed guess: after 5 for the address and claim, 50 for the address or 200 for
        the claim, TooManyRequests with an exponential back-off (credentials.FailureLimiter), so
        serial numbers cannot be enumerated quickly; a success clears its address and claim."""
        self.limiter.admit(remote, ACTIVATION, claim)
        outcome: bool | None = None
        try:
            yield
            outcome = True
        except NotFound:
            outcome = False
            raise
        finally:
            self.limiter.settle(remote, ACTIVATION, claim, outcome)

    async def activate(self, vendor: str, model: str, sn: str, *, remote: str, agent: str) -> str:
        """POST /provision/activate -> the CIK, returned this once (only its hash is kept). NotFound
        for an unknown vendor, model or serial number; Conflict when it is not enabled for
        activation (no client, expired, activated already, disabled) or the owner's plan is full;
        TooManyRequests after too many unknown ones from this address (`attempt`). Every attempt on
        a known serial number is logged with the caller's address and agent."""
        cik = new_cik()
        incarnation = f"{CIK_INCARNATION}{secrets.token_hex(16)}"

        def activate(conn: sqlite3.Connection) -> DomainError | None:
            row = conn.execute(
                "SELECT s.pk, s.sn, m.name AS model, v.owner_id, c.rid, c.status, c.enable_expires, c.thing_id"
                " FROM vendors v JOIN prov_models m ON m.vendor_pk = v.pk"
                " JOIN serial_numbers s ON s.model_pk = m.pk LEFT JOIN sn_clients c ON c.sn_pk = s.pk"
                " WHERE v.name = ? AND v.revoked IS NULL AND m.name = ? AND s.sn = ?",
                (vendor, model, sn),
            ).fetchone()
            if row is None:
                raise NotFound(f"client {vendor!r:.60},{model!r:.60},{sn!r:.60} not found")
            refused = _refusal(row, self.clock())
            if refused is None:
                try:
                    self.activate_client(conn, row, secret_hash(cik), incarnation)
                except QuotaExceeded as exc:
                    refused = f"the vendor's owner has no room for another thing ({exc})"
            log_attempt(conn, row["pk"], self.clock(), remote, agent, refused or "activated")
            return (
                Conflict(f"serial number {sn!r:.140} is not enabled for activation: {refused}")
                if refused
                else None
            )

        with self.attempt(remote, f"{vendor}/{model}"):
            refusal = await self.store.write(activate)
        if refusal is not None:
            raise refusal
        self.outbox.kick()  # a new thing's config document
        return cik

    def activate_client(
        self, conn: sqlite3.Connection, row: sqlite3.Row, cik_hash: str, incarnation: str
    ) -> None:
        """In the caller's transaction (provisioning's activation, and the firmware dialect's): the
        serial number's client (`row`: its pk, sn, model, owner_id, thing_id) is activated with this
        CIK; its thing is made at the first activation, else enabled again on `incarnation`."""
        thing_id = row["thing_id"]
        if thing_id is None:
            thing_id = _thing_id(conn, row["model"], row["sn"])
            thing_type = row["model"] if _THING_ID.fullmatch(row["model"]) else "provisioned"
            thing = Thing(
                thing_id, row["owner_id"], row["sn"], thing_type, "cik", "CIK", "", incarnation, "", None, True,
                "CREATED", self.clock(),
            )  # fmt: skip
            insert_thing(conn, thing, None, self.free_plan_things)
        else:
            # A certificate got with the previous CIK (POST /provision/certificate) goes with it.
            conn.execute(
                "UPDATE things SET enabled = 1, cert_id = ?, cert_pem = '', public_key_pem = '', key_type = 'CIK'"
                " WHERE id = ?",
                (incarnation, thing_id),
            )
        conn.execute(
            "UPDATE sn_clients SET status = 'activated', cik_hash = ?, thing_id = ? WHERE sn_pk = ?",
            (cik_hash, thing_id, row["pk"]),
        )

    async def identify_cik(self, cik: str) -> DeviceIdentity:
        """The thing behind a device CIK (X-Exosite-CIK): Unauthorized unless it is the current CIK
        of an activated serial number whose thing is enabled."""
        return (await self.client(cik)).identity

    async def client(self, cik: str) -> Client:
        if not isinstance(cik, str) or not _CIK.fullmatch(cik):
            raise Unauthorized("a CIK is 40 hex characters")
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT c.thing_id, c.sn_pk, s.model_pk, t.owner_id, t.cert_id FROM sn_clients c"
                " JOIN things t ON t.id = c.thing_id JOIN serial_numbers s ON s.pk = c.sn_pk"
                " WHERE c.cik_hash = ? AND c.status = 'activated' AND t.enabled = 1",
                (secret_hash(cik),),
            ).fetchone()
        )
        if row is None:
            raise Unauthorized("unknown or revoked CIK")
        return Client(
            DeviceIdentity(row["thing_id"], row["owner_id"], row["cert_id"]), row["model_pk"], row["sn_pk"]
        )


def _refusal(row: sqlite3.Row, now: float) -> str | None:
    if row["rid"] is None:
        return "it has no client (make one with enable=true&owner=...)"
    if row["status"] == "activated":
        return "activated already (enable=true issues a new CIK)"
    if row["status"] == "disabled":
        return "disabled"
    if row["enable_expires"] <= now:
        return "the enable period expired"
    return None


def _room(conn: sqlite3.Connection, owner_id: str, free_plan_things: int) -> None:
    """The owner's plan must have room for one more thing (the document's 409 for make client)."""
    statement = active_policy(conn, owner_id, free_plan_things).statements[0]
    if statement.effect == "Deny":
        raise Conflict(
            f"the owner's resources are not sufficient for another client: its plan allows "
            f"{statement.allowed} things and {statement.actual} exist"
        )


def log_attempt(conn: sqlite3.Connection, sn_pk: int, ts: float, remote: str, agent: str, entry: str) -> None:
    conn.execute(
        "INSERT INTO sn_log (sn_pk, ts, remote, agent, entry) VALUES (?,?,?,?,?)",
        (sn_pk, ts, remote[:256], agent[:256], entry),
    )
    conn.execute(
        "DELETE FROM sn_log WHERE sn_pk = ? AND seq <= (SELECT seq FROM sn_log WHERE sn_pk = ?"
        " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
        (sn_pk, sn_pk, LOG_KEPT),
    )
