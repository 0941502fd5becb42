"""Users, their access tokens, subscription plans (thing quotas) and application principals."""

from __future__ import annotations

import dataclasses
import secrets
import sqlite3
from dataclasses import dataclass

import jwt

from bridge.core import ids
from bridge.core.credentials import Passwords
from bridge.core.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from bridge.store import IntegrityError, Store

TOKEN_ISSUER = "thingbridge"
APP_CN_PREFIX = "app:"  # an application's certificate CN and client-id prefix
CREATE_THING_ACTION = "flashex:createThing"  # sic: the document's spelling, which clients match on


@dataclass(frozen=True)
class User:
    id: str
    username: str
    role: str
    email_verified: bool
    created: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Subscription:
    id: str
    user_id: str
    common_name: str
    plan_id: str
    plan_name: str
    product_id: str
    status: str
    thing_quota: int
    startts: int
    endts: int | None
    created: float


@dataclass(frozen=True)
class PolicyStatement:
    action: str
    effect: str
    resource: str
    allowed: int
    actual: int


@dataclass(frozen=True)
class SubscriptionPolicy:
    subscription: Subscription
    statements: list[PolicyStatement]


@dataclass(frozen=True)
class App:
    name: str
    owner_id: str
    fleet_wide: bool
    cert_id: str | None = None


def _user(row: sqlite3.Row) -> User:
    return User(row["id"], row["username"], row["role"], bool(row["email_verified"]), row["created"])


def _app(row: sqlite3.Row) -> App:
    return App(row["name"], row["owner_id"], bool(row["fleet_wide"]), row["cert_id"])


def _subscription(row: sqlite3.Row) -> Subscription:
    return Subscription(**{k: row[k] for k in row.keys()})  # noqa: SIM118 (sqlite3.Row)


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def new_subscription(user_id: str, quota: int, plan_name: str = "Free") -> Subscription:
    """An active subscription starting now (the free plan unless named)."""
    ts = ids.now()
    return Subscription(
        ids.new_id(),
        user_id,
        plan_name.upper(),
        f"plan_{plan_name.lower()}",
        plan_name,
        "thingbridge",
        "active",
        quota,
        int(ts),
        None,
        ts,
    )


def _insert_subscription(conn: sqlite3.Connection, sub: Subscription) -> None:
    columns = [f.name for f in dataclasses.fields(Subscription)]
    conn.execute(
        f"INSERT INTO subscriptions ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        dataclasses.astuple(sub),
    )


class Accounts:
    def __init__(self, store: Store, token_key: bytes, token_ttl: int, free_plan_things: int) -> None:
        self.store = store
        self._token_key = token_key
        self.token_ttl = token_ttl
        self.free_plan_things = free_plan_things
        self.passwords = Passwords()

    # ---- users -------------------------------------------------------------------------------
    async def create_user(self, username: str, password: str, role: str = "user") -> User:
        ids.check_username(username)
        if len(password) < 8:
            raise Invalid("password must be at least 8 characters")
        pw_hash = await self.passwords.hash(password)
        user = User(ids.new_id(), username, role, False, ids.now())

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO users (id, username, password_hash, role, email_verified, created)"
                    " VALUES (?,?,?,?,?,?)",
                    (user.id, username, pw_hash, role, 0, user.created),
                )
            except IntegrityError as exc:
                raise Conflict(f"user {username!r} already exists") from exc
            _insert_subscription(conn, new_subscription(user.id, self.free_plan_things))

        await self.store.write(insert)
        return user

    async def user_by_name(self, username: str) -> User:
        row = await self.store.read(
            lambda c: c.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        )
        if row is None:
            raise NotFound(f"user {username!r} not found")
        return _user(row)

    async def login(self, username: str, password: str, *, source: str) -> User:
        """`source`: the client's address, for the failure limiter (TooManyRequests)."""
        row = await self.store.read(
            lambda c: c.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        )
        if not await self._check("users", "username", row, username, password, source) or row is None:
            raise Unauthorized("bad username or password")
        return _user(row)

    async def _check(
        self,
        table: str,
        column: str,
        row: sqlite3.Row | None,
        name: str,
        password: str,
        source: str | None,
    ) -> bool:
        stored = row["password_hash"] if row else None
        verdict = await self.passwords.verify(table, name, password, stored, source)
        if verdict.new_hash is not None:
            # compare-and-set: a password changed meanwhile (command line) is not overwritten
            await self.store.write(
                lambda c: c.execute(
                    f"UPDATE {table} SET password_hash = ? WHERE {column} = ? AND password_hash = ?",
                    (verdict.new_hash, name, stored),
                )
            )
        return verdict.matched

    async def get_user(self, caller: User, sub: str) -> User:
        if sub != caller.id:
            raise Forbidden("a user may read only its own record")
        return caller

    # ---- tokens ------------------------------------------------------------------------------
    async def issue_token(self, user: User) -> str:
        issued = ids.now()
        jti = secrets.token_urlsafe(16)
        expires = issued + self.token_ttl
        await self.store.write(
            lambda c: c.execute(
                "INSERT INTO tokens (jti, user_id, issued, expires, revoked) VALUES (?,?,?,?,0)",
                (jti, user.id, issued, expires),
            )
        )
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": user.id,
            "username": user.username,
            "jti": jti,
            "iat": int(issued),
            "exp": int(expires),
        }
        return jwt.encode(claims, self._token_key, algorithm="HS256")

    def _claims(self, token: str) -> dict:
        try:
            return jwt.decode(
                token,
                self._token_key,
                algorithms=["HS256"],
                issuer=TOKEN_ISSUER,
                options={"require": ["exp", "sub", "jti", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("access token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("access token is not valid") from exc

    async def authenticate(self, token: str) -> User:
        claims = self._claims(token)
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT users.*, tokens.revoked FROM tokens JOIN users ON users.id = tokens.user_id"
                " WHERE tokens.jti = ? AND tokens.user_id = ?",
                (claims["jti"], claims["sub"]),
            ).fetchone()
        )
        if row is None or row["revoked"]:
            raise Unauthorized("access token has been revoked")
        return _user(row)

    async def revoke_token(self, token: str) -> None:
        claims = self._claims(token)
        await self.store.write(
            lambda c: c.execute("UPDATE tokens SET revoked = 1 WHERE jti = ?", (claims["jti"],))
        )

    # ---- subscriptions and quota ---------------------------------------------------------------
    async def subscriptions(self, user: User) -> list[Subscription]:
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT * FROM subscriptions WHERE user_id = ? ORDER BY created", (user.id,)
            ).fetchall()
        )
        return [_subscription(r) for r in rows]

    async def subscription(self, user: User, subscription_id: str) -> Subscription:
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT * FROM subscriptions WHERE id = ? AND user_id = ?", (subscription_id, user.id)
            ).fetchone()
        )
        if row is None:
            raise NotFound("subscription not found")
        return _subscription(row)

    async def active_policy(self, user: User) -> SubscriptionPolicy:
        return await self.store.read(active_policy, user.id, self.free_plan_things)

    async def set_plan(self, username: str, things: int, plan_name: str = "Custom") -> Subscription:
        if things < 0:
            raise Invalid("the thing quota cannot be negative")
        user = await self.user_by_name(username)

        def switch(conn: sqlite3.Connection) -> Subscription:
            sub = new_subscription(user.id, things, plan_name)
            conn.execute(
                "UPDATE subscriptions SET status = 'ended', endts = ? WHERE user_id = ? AND status = 'active'",
                (sub.startts, user.id),
            )
            _insert_subscription(conn, sub)
            return sub

        return await self.store.write(switch)

    # ---- application principals -----------------------------------------------------------------
    async def create_app(self, name: str, owner: str, password: str, fleet_wide: bool = False) -> App:
        ids.check_name(name, "application name")
        if len(APP_CN_PREFIX + name) > 64:
            raise Invalid("application name must be at most 60 characters")
        user = await self.user_by_name(owner)
        if fleet_wide and not user.is_admin:
            raise Forbidden("only an admin may own a fleet-wide application")
        pw_hash = await self.passwords.hash(password)

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO apps (name, owner_id, password_hash, fleet_wide, created) VALUES (?,?,?,?,?)",
                    (name, user.id, pw_hash, int(fleet_wide), ids.now()),
                )
            except IntegrityError as exc:
                raise Conflict(f"application {name!r} already exists") from exc

        await self.store.write(insert)
        return App(name, user.id, fleet_wide)

    async def app(self, name: str) -> App | None:
        row = await self.store.read(
            lambda c: c.execute("SELECT * FROM apps WHERE name = ?", (name,)).fetchone()
        )
        return _app(row) if row else None

    async def set_app_certificate(self, name: str, cert_id: str) -> None:
        await self.store.write(
            lambda c: c.execute("UPDATE apps SET cert_id = ? WHERE name = ?", (cert_id, name))
        )

    async def app_login(self, name: str, password: str, *, source: str | None) -> App | None:
        """`source`: the client's address, for the failure limiter (TooManyRequests); None when an
        MQTT engine relays the login without it."""
        row = await self.store.read(
            lambda c: c.execute("SELECT * FROM apps WHERE name = ?", (name,)).fetchone()
        )
        if not await self._check("apps", "name", row, name, password, source) or row is None:
            return None
        return _app(row)


def active_policy(conn: sqlite3.Connection, user_id: str, free_quota: int) -> SubscriptionPolicy:
    """The user's active subscription and its createThing statement. Runs inside the caller's
    transaction so that thing creation checks and inserts atomically."""
    row = conn.execute(
        "SELECT * FROM subscriptions WHERE user_id = ? AND status = 'active' ORDER BY created DESC LIMIT 1",
        (user_id,),
    ).fetchone()
    sub = new_subscription(user_id, free_quota) if row is None else _subscription(row)
    counted = conn.execute("SELECT things FROM owner_things WHERE owner_id = ?", (user_id,)).fetchone()
    actual = counted[0] if counted else 0
    effect = "Allow" if actual < sub.thing_quota else "Deny"
    statement = PolicyStatement(CREATE_THING_ACTION, effect, f"{user_id}:thing:*", sub.thing_quota, actual)
    return SubscriptionPolicy(sub, [statement])
