"""The things registry: create (key pair or CSR, certificate from the bridge CA), read, delete
(revoke, disconnect), enable/disable, and the device-facing checks the broker calls on CONNECT."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from bridge import pki
from bridge.core import ids
from bridge.core.accounts import SubscriptionPolicy, User, active_policy
from bridge.core.errors import Conflict, Invalid, QuotaExceeded, Unauthorized
from bridge.core.identity import DeviceIdentity, KnownDevices
from bridge.core.lookup import owned_thing, thing_not_found
from bridge.core.outbox import Outbox, forget_thing
from bridge.core.ports import DeviceLink
from bridge.core.status import DeviceRef, publish_config
from bridge.keyring import Keyring
from bridge.store import IntegrityError, Store

TOKEN_ISSUER_PREFIX = "urn:thing:"
MAX_TOKEN_LIFETIME = 24 * 3600
TOKEN_LEEWAY = 30  # seconds of clock skew allowed on exp/nbf
MAX_REMEMBERED_TOKENS = 100_000
KNOWN_DEVICES = 50_000  # identities kept for CONNECTs: about 18 MiB when full


# The cert_id of a thing whose credential is a provisioning CIK (no certificate yet): this prefix and
# a random part, renewed at each activation.
CIK_INCARNATION = "cik:"
# A certificate revoked again (re-issued, then its thing deleted) keeps one row, the latest reason.
REVOKED_UPSERT = (
    "ON CONFLICT (cert_id) DO UPDATE SET thing_id = excluded.thing_id, revoked_at = excluded.revoked_at,"
    " reason = excluded.reason"
)


@dataclass(frozen=True)
class Thing:
    id: str
    owner_id: str
    name: str
    type: str
    dist: str
    key_type: str
    cert_pem: str
    cert_id: str
    public_key_pem: str
    private_key_pem: str | None
    enabled: bool
    test_status: str
    created: float


@dataclass
class NewThing:
    """A create request, already parsed by an adapter."""

    id: str | None = None
    name: str | None = None
    type: str = "generic"
    dist: str = "mosquitto"
    key_type: str | None = None
    csr: str | None = None


class Things:
    def __init__(
        self,
        store: Store,
        ca: pki.CertificateAuthority,
        keyring: Keyring,
        *,
        cert_days: int,
        default_key_type: str,
        free_plan_things: int,
        outbox: Outbox,
        link: DeviceLink,
        audiences: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.store = store
        self.ca = ca
        self.keyring = keyring
        self.cert_days = cert_days
        self.default_key_type = default_key_type
        self.free_plan_things = free_plan_things
        self.outbox = outbox
        # What a thing token's `aud` may name besides the thing itself (read when checked: the
        # public URLs carry ports that are known only once the listeners are bound).
        self.audiences = audiences
        self.link = link
        # thing id -> owner id, for per-delivery tenancy checks; filled lazily, dropped on delete
        self._owners: dict[str, str] = {}
        # Bumped by every delete and disable, before live sessions are closed: a check that read
        # the registry before the bump re-reads it (see standing) instead of trusting it.
        self.revocations = 0
        self._verifiers: dict[str, tuple[str, str, str, Any]] = {}
        # Identities kept for CONNECTs: made by know_enabled, in the embedded broker's process only.
        self._devices: KnownDevices | None = None
        self._verified_tokens: dict[str, tuple[DeviceIdentity, float]] = {}

    def _row(self, row: sqlite3.Row) -> Thing:
        sealed = row["private_key_sealed"]
        private = self.keyring.open(sealed, row["id"].encode()).decode() if sealed else None
        return Thing(
            row["id"],
            row["owner_id"],
            row["name"],
            row["type"],
            row["dist"],
            row["key_type"],
            row["cert_pem"],
            row["cert_id"],
            row["public_key_pem"],
            private,
            bool(row["enabled"]),
            row["test_status"],
            row["created"],
        )

    async def create(self, owner: User, req: NewThing) -> Thing:
        thing_id = ids.check_thing_id(req.id) if req.id is not None else ids.new_id()
        for value, what in ((req.type, "thingType"), (req.dist, "thingDist")):
            ids.check_name(value, what)
        name = req.name if req.name is not None else thing_id
        if not 1 <= len(name) <= 256:
            raise Invalid("thingName must be 1-256 characters")
        if req.csr is not None:
            if req.key_type is not None:
                raise Invalid("give either keyType or csr, not both")
            try:
                public_key = pki.public_key_from_csr(req.csr)
            except pki.CsrError as exc:
                raise Invalid(str(exc)) from exc
            private_pem = None
        else:
            kind = self.default_key_type if req.key_type is None else req.key_type
            if kind not in ("RSA", "EC"):
                raise Invalid("keyType must be RSA or EC")
            # Refuse over quota before spending ~40 ms of CPU on a key (checked again on insert).
            _check_quota(await self.store.read(active_policy, owner.id, self.free_plan_things))
            key = await asyncio.to_thread(pki.generate_key, kind)
            public_key = key.public_key()
            private_pem = pki.private_pem(key)
        cert = self.ca.issue_client(thing_id, public_key, self.cert_days)
        thing = Thing(
            thing_id,
            owner.id,
            name,
            req.type,
            req.dist,
            pki.key_type_of(public_key),
            pki.cert_pem(cert),
            pki.cert_id(cert),
            pki.public_pem(public_key),
            private_pem,
            True,
            "CREATED",
            ids.now(),
        )
        sealed = self.keyring.seal(private_pem.encode(), thing_id.encode()) if private_pem else None

        await self.store.write(insert_thing, thing, sealed, self.free_plan_things)
        self.outbox.kick()
        return thing

    async def certify(self, identity: DeviceIdentity, csr: str) -> str:
        """A certificate for the key of `csr`, issued to the thing `identity` names (the device
        proved itself another way, with a provisioning CIK): it becomes the thing's certificate of
        record, so the device moves to MQTT/TLS and HTTPS as the same thing; a certificate issued
        before is void from now on. The PEM chain: the thing's certificate, then the CA's."""
        try:
            public_key = pki.public_key_from_csr(csr)
        except pki.CsrError as exc:
            raise Invalid(str(exc)) from exc
        cert = self.ca.issue_client(identity.thing_id, public_key, self.cert_days)

        def replace(conn: sqlite3.Connection) -> int:
            # Only while the credential checked is still the thing's current one (a regenerated CIK
            # or a disabled serial number in between must not get a certificate).
            updated = conn.execute(
                "UPDATE things SET cert_pem = ?, cert_id = ?, public_key_pem = ?, key_type = ?"
                " WHERE id = ? AND cert_id = ? AND enabled = 1",
                (
                    pki.cert_pem(cert),
                    pki.cert_id(cert),
                    pki.public_pem(public_key),
                    pki.key_type_of(public_key),
                    identity.thing_id,
                    identity.cert_id,
                ),
            ).rowcount
            if updated and not identity.cert_id.startswith(CIK_INCARNATION):
                conn.execute(
                    "INSERT INTO revoked_certs (cert_id, thing_id, revoked_at, reason) VALUES (?,?,?,?)"
                    f" {REVOKED_UPSERT}",
                    (identity.cert_id, identity.thing_id, ids.now(), "replaced by a new certificate"),
                )
            return updated

        if not await self.store.write(replace):
            raise Unauthorized("the credential was revoked or replaced meanwhile")
        await self.revoke(identity.thing_id, deleted=False)  # sessions on the replaced certificate
        return pki.cert_pem(cert) + self.ca.ca_pem

    async def list(self, owner: User) -> list[Thing]:
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT * FROM things WHERE owner_id = ? ORDER BY created", (owner.id,)
            ).fetchall()
        )
        return [self._row(r) for r in rows]

    async def get(self, owner: User, thing_id: str) -> Thing:
        return self._row(await self.store.read(owned_thing, thing_id, owner.id))

    async def delete(self, owner: User, thing_id: str) -> None:
        def remove(conn: sqlite3.Connection) -> str:
            row = owned_thing(conn, thing_id, owner.id)
            forget_thing(conn, thing_id)  # its documents not yet published
            # Its messages, presence and device-twin state go with it (ON DELETE CASCADE).
            conn.execute("DELETE FROM things WHERE id = ?", (thing_id,))
            conn.execute(
                f"INSERT INTO revoked_certs (cert_id, thing_id, revoked_at, reason) VALUES (?,?,?,?) {REVOKED_UPSERT}",
                (row["cert_id"], thing_id, ids.now(), "thing deleted"),
            )
            return row["cert_id"]

        await self.store.write(remove)
        await self.revoke(thing_id, deleted=True)

    async def set_enabled(self, owner: User, thing_id: str, enabled: bool) -> Thing:
        def update(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE things SET enabled = ? WHERE id = ? AND owner_id = ?",
                (int(enabled), thing_id, owner.id),
            ).rowcount

        if not await self.store.write(update):
            raise thing_not_found(thing_id)
        if enabled:
            self._revoke(thing_id)  # nothing to close, but cached checks must read the row again
        else:
            await self.revoke(thing_id, deleted=False)
        return await self.get(owner, thing_id)

    async def revoke(self, thing_id: str, *, deleted: bool) -> None:
        """After a committed delete or disable of the thing (or of the credential it rests on, such
        as a provisioning CIK): bump the revocation counter, drop cached credentials and close its
        live sessions (`deleted`: also its persistent sessions and retained messages)."""
        self._revoke(thing_id)
        if deleted:
            async with self.outbox.lock:  # no document read before the delete is published after this
                await self.link.disconnect_thing(thing_id, forget=True)
        else:
            await self.link.disconnect_thing(thing_id, forget=False)

    # ---- device-facing checks (called by the broker) -------------------------------------------
    async def identify_device(self, thing_id: str, presented_cert_id: str) -> DeviceIdentity | None:
        """The thing behind a verified client certificate, if it exists, is enabled, and the
        certificate is the one currently issued to it (so a deleted-and-recreated id does not
        accept the old certificate)."""
        # Identities are kept in memory only beside the embedded broker, whose process makes every
        # change of a thing and drops the entry (_revoke); in external mode other bridge processes
        # change things too, so each check reads the row.
        known = self._devices
        device = known.get(thing_id) if known is not None else None
        if device is None:
            revocations = self.revocations
            device = await self.enabled_device(thing_id)
            if known is not None and device is not None and revocations == self.revocations:
                known.put(device)  # (else the row may be gone already)
        return device if device is not None and device.cert_id == presented_cert_id else None

    async def enabled_device(self, thing_id: str) -> DeviceIdentity | None:
        """The thing's current identity while it exists and is enabled, as the store has it now.
        Alone, for an MQTT engine that checked the certificate itself and names only the thing
        (external mode)."""
        revocations = self.revocations
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT owner_id, cert_id, enabled FROM things WHERE id = ?", (thing_id,)
            ).fetchone()
        )
        if row is None or not row["enabled"]:
            return None
        if revocations == self.revocations:  # else the row may be gone already: do not cache it
            self._owners[thing_id] = row["owner_id"]
        return DeviceIdentity(thing_id, row["owner_id"], row["cert_id"])

    async def know_enabled(self) -> None:
        """Keep identities for CONNECTs from now on (the embedded broker's process, where every
        change of a thing is made), filled with the things most recently online first, before the
        MQTT listeners open: the reconnect storm after a restart is then checked without a store
        read per CONNECT."""
        revocations = self.revocations
        known = self._devices = KnownDevices(KNOWN_DEVICES)
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT t.id, t.owner_id, t.cert_id FROM things t LEFT JOIN presence p ON p.thing_id = t.id"
                " WHERE t.enabled = 1 ORDER BY coalesce(p.ts, 0) DESC LIMIT ?",
                (known.limit,),
            ).fetchall()
        )
        if revocations == self.revocations:
            for row in rows:
                known.put(DeviceIdentity(row["id"], row["owner_id"], row["cert_id"]))

    async def device_by_subject(self, thing_id: str, serial: str | None) -> DeviceIdentity | None:
        """The thing behind a certificate that an external MQTT engine verified and reports by its
        subject alone (CN = thing id, `serial` = its serialNumber attribute, None when it has
        none): while the thing exists, is enabled, and its current certificate has that subject.
        An older certificate of a re-certified thing differs in the serial and is refused."""
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT owner_id, cert_id, cert_pem, enabled FROM things WHERE id = ?", (thing_id,)
            ).fetchone()
        )
        if row is None or not row["enabled"] or not row["cert_pem"]:  # no certificate yet: a CIK only
            return None
        if pki.subject_serial(row["cert_pem"]) != serial:
            return None
        return DeviceIdentity(thing_id, row["owner_id"], row["cert_id"])

    async def standing(self, identity: DeviceIdentity, revocations: int) -> str:
        """Whether an identity established when the counter stood at `revocations` still holds:
        "valid", "disabled", or "gone" (deleted, or its certificate re-issued). The broker asks
        once a session is registered: a delete or disable that committed between the CONNECT's
        check and the registration found no session to close."""
        if revocations == self.revocations:
            return "valid"
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT cert_id, enabled FROM things WHERE id = ?", (identity.thing_id,)
            ).fetchone()
        )
        if row is None or row["cert_id"] != identity.cert_id:
            return "gone"
        return "valid" if row["enabled"] else "disabled"

    async def verify_token(self, token: str, path_thing_id: str) -> DeviceIdentity:
        """A JWT signed with the thing's own private key (RS256 for RSA, ES256 for EC keys): header
        `kid` = thing id and/or claim `iss` = `urn:thing:<id>`; `exp` required, `nbf` honoured,
        lifetime at most 24 h; the thing it names must be the one in the path.

        A device sends the same token until it expires: a token verified once is remembered (until
        its exp, or until its thing is deleted or disabled), so the signature check runs once."""
        remembered = self._verified_tokens.get(token)
        if remembered is not None:
            identity, expires = remembered
            if ids.now() <= expires + TOKEN_LEEWAY:
                if identity.thing_id != path_thing_id:
                    raise Unauthorized("thing token is for another thing")
                return identity
            del self._verified_tokens[token]
        revocations = self.revocations
        identity, expires = await self._verify_token(token, path_thing_id)
        if revocations != self.revocations:
            return identity  # a delete or disable ran meanwhile: use it once, do not remember it
        if len(self._verified_tokens) >= MAX_REMEMBERED_TOKENS:
            self._verified_tokens.pop(next(iter(self._verified_tokens)))  # the oldest
        self._verified_tokens[token] = (identity, expires)
        return identity

    async def _verify_token(self, token: str, path_thing_id: str) -> tuple[DeviceIdentity, float]:
        thing_id, claims = _unverified(token)
        if thing_id != path_thing_id:
            raise Unauthorized("thing token is for another thing")
        # PyJWT takes a numeric string for exp/nbf/iat and then compares strings with numbers.
        for claim in ("exp", "nbf", "iat"):
            value = claims.get(claim)
            if claim in claims and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise Unauthorized(f"thing token claim {claim!r} must be a number (epoch seconds)")
        check_audience(claims.get("aud"), thing_id, self.audiences())
        owner_id, cert_id, algorithm, public_key = await self._verifier(thing_id)
        try:
            verified = jwt.decode(
                token,
                public_key,
                algorithms=[algorithm],
                options={"require": ["exp"], "verify_aud": False},  # checked above, by our rule
                leeway=TOKEN_LEEWAY,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("thing token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"thing token rejected: {exc}") from exc
        start = verified.get("nbf", verified.get("iat", ids.now()))
        if verified["exp"] - min(start, ids.now()) > MAX_TOKEN_LIFETIME:
            raise Unauthorized("thing token lifetime exceeds 24 hours")
        return DeviceIdentity(thing_id, owner_id, cert_id), verified["exp"]

    def _revoke(self, thing_id: str) -> None:
        self.revocations += 1
        self._owners.pop(thing_id, None)
        if self._devices is not None:
            self._devices.drop(thing_id)
        self._verifiers.pop(thing_id, None)
        self._verified_tokens = {
            token: entry for token, entry in self._verified_tokens.items() if entry[0].thing_id != thing_id
        }

    async def _verifier(self, thing_id: str) -> tuple[str, str, str, Any]:
        """(owner, certificate id, JWT algorithm, loaded public key) of an enabled thing, kept in
        memory: parsing the key and reading the row cost more than the signature check. Dropped on
        delete/disable."""
        cached = self._verifiers.get(thing_id)
        if cached is not None:
            return cached
        revocations = self.revocations
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT owner_id, cert_id, key_type, public_key_pem, enabled FROM things WHERE id = ?",
                (thing_id,),
            ).fetchone()
        )
        if row is None:
            raise thing_not_found(thing_id)
        if not row["enabled"]:
            raise Unauthorized("thing is disabled")
        if row["public_key_pem"] is None:  # enrolled by serial number: its credential is a CIK
            raise Unauthorized("thing has no key pair to sign tokens with; use its CIK")
        algorithm = "ES256" if row["key_type"] == "EC" else "RS256"
        cached = (
            row["owner_id"],
            row["cert_id"],
            algorithm,
            serialization.load_pem_public_key(row["public_key_pem"].encode()),
        )
        if revocations == self.revocations:
            self._verifiers[thing_id] = cached
        return cached

    async def type_of(self, thing_id: str) -> str:
        return (await self.store.read(owned_thing, thing_id, None))["type"]

    def cached_owner(self, thing_id: str) -> str | None:
        return self._owners.get(thing_id)

    async def owner_of(self, thing_id: str) -> str | None:
        owner = self._owners.get(thing_id)
        if owner is None:
            revocations = self.revocations
            row = await self.store.read(
                lambda c: c.execute("SELECT owner_id FROM things WHERE id = ?", (thing_id,)).fetchone()
            )
            if row is None:
                return None
            owner = row["owner_id"]
            if revocations == self.revocations:
                self._owners[thing_id] = owner
        return owner


def insert_thing(
    conn: sqlite3.Connection, thing: Thing, sealed_key: bytes | None, free_plan_things: int
) -> None:
    """Add a thing to the registry inside the caller's transaction: the owner's quota, the id
    free (also as another thing's regId alias), its config document published."""
    _check_quota(active_policy(conn, thing.owner_id, free_plan_things))
    if conn.execute("SELECT 1 FROM thing_state WHERE reg_id = ?", (thing.id,)).fetchone():
        raise Conflict(_unavailable(thing.id))
    try:
        conn.execute(
            "INSERT INTO things (id, owner_id, name, type, dist, key_type, cert_pem, cert_id,"
            " public_key_pem, private_key_sealed, enabled, test_status, created)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                thing.id,
                thing.owner_id,
                thing.name,
                thing.type,
                thing.dist,
                thing.key_type,
                thing.cert_pem,
                thing.cert_id,
                thing.public_key_pem,
                sealed_key,
                int(thing.enabled),
                thing.test_status,
                thing.created,
            ),
        )
    except IntegrityError as exc:
        raise Conflict(_unavailable(thing.id)) from exc
    publish_config(conn, DeviceRef(thing.id, thing.owner_id, thing.type))


def _check_quota(policy: SubscriptionPolicy) -> None:
    statement = policy.statements[0]
    if statement.effect == "Deny":
        raise QuotaExceeded(
            f"subscription allows {statement.allowed} things and {statement.actual} exist", policy
        )


def _unavailable(thing_id: str) -> str:
    # The same answer whoever holds the id (you, another user, a regId alias): ids are global
    # (certificate CN, topic level), and a 409 that said whose it is would confirm it exists.
    return f"thing id {thing_id!r} is not available; choose another, or omit flthingspk for a generated one"


def token_subject(token: str) -> str:
    """The thing a thing token names, before its signature is checked: which key to check it
    with (for a route whose path names no device)."""
    return _unverified(token)[0]


def _unverified(token: str) -> tuple[str, dict[str, Any]]:
    """The thing a token names (header kid and/or claim iss = urn:thing:<id>, which must agree)
    and its claims, unverified."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise Unauthorized("thing token is not a valid JWT") from exc
    iss = claims.get("iss")
    from_iss = (
        iss[len(TOKEN_ISSUER_PREFIX) :]
        if isinstance(iss, str) and iss.startswith(TOKEN_ISSUER_PREFIX)
        else None
    )
    kid = header.get("kid")
    named = {n for n in (kid if isinstance(kid, str) else None, from_iss) if n}
    if len(named) != 1 or (kid is not None and not isinstance(kid, str)):
        raise Unauthorized("thing token must name one thing in kid and/or iss (urn:thing:<id>)")
    return named.pop(), claims


def check_audience(aud: Any, thing_id: str, accepted: Iterable[str]) -> None:
    """The audience is not part of the document's contract, but device SDKs send one. Accepted:
    none; `urn:<namespace>:<this thing's id>` (any namespace); one of `accepted` (default: the
    bridge's public HTTP URLs). A URN naming another thing, or any other audience, is refused;
    with a list, every entry must be acceptable."""
    if aud is None:
        return
    entries = aud if isinstance(aud, list) else [aud]
    if not entries or not all(isinstance(a, str) for a in entries):
        raise Unauthorized("thing token claim 'aud' must be a string or a list of strings")
    allowed = {a.rstrip("/") for a in accepted}
    for entry in entries:
        if entry.startswith("urn:") and entry.count(":") >= 2:
            if entry.rsplit(":", 1)[1] != thing_id:
                raise Unauthorized("thing token audience names another thing")
        elif entry.rstrip("/") not in allowed:
            raise Unauthorized(f"thing token audience {entry[:200]!r} is not accepted here")
