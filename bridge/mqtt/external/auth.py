"""The engine's HTTP auth backend (RabbitMQ's rabbitmq_auth_backend_http): the engine asks this
listener who may log in (user), use the virtual host (vhost), touch a queue or exchange (resource)
and publish or subscribe to a topic (topic), and the bridge answers with the rules of
bridge/mqtt/principals.py, the same as the embedded broker's.

Who logs in:
* a thing, by its client certificate: the engine checked the chain against the bridge's CA and
  reports the certificate's subject DN as the username, without a password
  (`ssl_cert_login_from = distinguished_name`); CN = thing id, and the serialNumber attribute must
  be the thing's current certificate's (Things.device_by_subject), so an older certificate of a
  re-certified thing is refused;
* an application, by username and password (application certificates are refused here: the engine
  could not tell a revoked one from the current one);
* the bridge itself (mqtt.external.username / password): everything, and the management API.

A username with '=' is a certificate's subject: password logins never use one. Every malformed or
unknown request is answered "deny" (status 200), never an error."""

from __future__ import annotations

import hmac
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bridge.config import Config, ConfigError
from bridge.core.service import Core
from bridge.mqtt.auth import Counters
from bridge.mqtt.external.amqp import EXCHANGE, mqtt_topic
from bridge.mqtt.principals import (
    APP_PREFIX,
    Action,
    Principal,
    Refused,
    app_by_password,
    permitted,
    permitted_filter,
    thing_by_subject,
)

log = logging.getLogger(__name__)
ALLOW, DENY = "allow", "deny"
SERVICE_TAGS = "allow administrator management"
# The MQTT plugin's queue for a client's subscriptions: mqtt-subscription-<client id>qos<0|1>
SUBSCRIPTION_QUEUE = re.compile(r"mqtt-subscription-(.+)qos[01]", re.DOTALL)
MAX_FIELD = 4096  # a request with a longer field is refused


@dataclass(frozen=True)
class Service:
    """The bridge's own engine user."""

    name: str


def subject_fields(dn: str) -> dict[str, str] | None:
    """The attributes of a subject DN as the engine writes it ("CN=a,serialNumber=b", RFC 4514
    escapes), by upper-case type; None when it is not one. An attribute the engine knows no name
    for comes as its OID with the value's DER in hex ("2.5.4.5=#1304..."): decoded here."""
    fields: dict[str, str] = {}
    for part in re.split(r"(?<!\\),", dn):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            return None
        key = {"2.5.4.3": "CN", "2.5.4.5": "SERIALNUMBER"}.get(key.strip(), key.strip().upper())
        if key in fields:
            return None  # a repeated attribute: not one of our certificates
        fields[key] = _der_string(value) if value.startswith("#") else re.sub(r"\\(.)", r"\1", value)
    return fields


def thing_subject(dn: str) -> tuple[str, str | None] | None:
    """(thing id, serialNumber or None) of a subject that can be a thing certificate's; None for
    any other engine user (an application, the bridge)."""
    fields = subject_fields(dn) if "=" in dn else None
    cn = fields.get("CN") if fields else None
    if not fields or not cn or set(fields) - {"CN", "SERIALNUMBER"} or cn.startswith(APP_PREFIX) or "." in cn:
        return None
    return cn, fields.get("SERIALNUMBER")


def _der_string(value: str) -> str:
    try:
        der = bytes.fromhex(value[1:])
    except ValueError:
        return ""
    # a short string type (tag, one length byte, value): all our attribute values are short
    return der[2:].decode(errors="replace") if len(der) >= 2 and der[1] == len(der) - 2 else ""


class Logins:
    """The engine usernames (certificate subjects) each thing logged in with through this process,
    for closing its connections by username (management.py): the engine knows a connection only by
    its user. Bounded: the things seen longest ago are forgotten first."""

    def __init__(self, max_things: int = 100_000, per_thing: int = 8) -> None:
        self.max_things = max_things
        self.per_thing = per_thing
        self._seen: OrderedDict[str, list[str]] = OrderedDict()

    def add(self, thing_id: str, username: str) -> None:
        names = self._seen.pop(thing_id, [])
        if username in names:
            names.remove(username)
        self._seen[thing_id] = [*names[-(self.per_thing - 1) :], username]
        while len(self._seen) > self.max_things:
            self._seen.popitem(last=False)

    def of(self, thing_id: str) -> list[str]:
        return list(self._seen.get(thing_id, ()))


class EngineAuth:
    """The four paths' answers. Stateless but for `logins`: each request names its user again."""

    def __init__(self, cfg: Config, core: Core, logins: Logins, counters: Counters) -> None:
        self.core = core
        self.logins = logins
        self.counters = counters  # refusals and denials, shown by the link's stats
        self.username = cfg.mqtt.external.username
        self.password = cfg.mqtt.external.password

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        for name, handler, login in (
            ("user", self.user, True),
            ("vhost", self.vhost, True),  # the client id: part of a login too
            ("resource", self.resource, False),
            ("topic", self.topic, False),
        ):
            app.router.add_route("*", f"/auth/{name}", self._answer(handler, login))
        return app

    def _answer(self, decide: Any, login: bool) -> Any:
        """The handler of one path: `decide`'s answer; a refusal of a `login` path is counted."""

        async def handler(request: web.Request) -> web.Response:
            form = dict(request.query)
            if request.method == "POST":
                try:
                    form.update(await request.post())
                except (ValueError, web.HTTPException):
                    form = {}
            try:
                # all or nothing: a field left out could change the question (a password dropped
                # would make a password login look like a certificate's)
                if not all(isinstance(v, str) and len(v) <= MAX_FIELD for v in form.values()):
                    raise Refused("bad_request", "a field is too long or not text")
                answer = await decide(form, request.remote or "")
            except Refused as refused:
                log.info("engine auth: %s refused: %s", request.path, refused)
                if login:
                    self.counters.refuse(refused.reason)
                answer = DENY
            except Exception:  # never a 500: the engine reads anything but "allow" as a refusal
                log.exception("engine auth: %s failed; answered deny", request.path)
                answer = DENY
            return web.Response(text=answer)

        return handler

    # ---- who -----------------------------------------------------------------------------------
    async def user(self, params: dict[str, str], remote: str) -> str:
        username = params.get("username", "")
        if "password" in params:  # a password login: the bridge itself or an application
            password = params["password"]
            if "=" in username:
                raise Refused("bad_username", "a password login cannot use a certificate's subject")
            if username == self.username:
                if not (self.password and hmac.compare_digest(password.encode(), self.password.encode())):
                    raise Refused("bad_password", "bad password for the bridge's own engine user")
                return SERVICE_TAGS
            # The engine does not say from where: limited by the name (FailureLimiter.keys), not
            # by the engine node's address, which every application shares.
            await app_by_password(self.core, username, password, None)
            return ALLOW
        thing = await self._certificate(username)
        self.logins.add(thing.name, username)
        return ALLOW

    async def _certificate(self, dn: str) -> Principal:
        fields = subject_fields(dn)
        cn = fields.get("CN") if fields else None
        if not cn or set(fields or {}) - {"CN", "SERIALNUMBER"}:
            raise Refused("unknown_certificate", f"not a subject this bridge issues: {dn[:200]!r}")
        if cn.startswith(APP_PREFIX):
            raise Refused("app_certificate", "applications log in to the engine by username and password")
        if "." in cn:  # '.' separates routing-key words: such an id would alias other things' topics
            raise Refused("dotted_id", f"a thing id with '.' cannot use external mode: {cn[:200]!r}")
        return await thing_by_subject(self.core, cn, (fields or {}).get("SERIALNUMBER"))

    async def _principal(self, username: str) -> Principal | Service:
        """Who a user the engine has logged in is (vhost, resource and topic requests)."""
        if username == self.username:
            return Service(username)
        if "=" in username:
            subject = thing_subject(username)
            if subject is None:
                raise Refused("unknown_certificate", "not a thing certificate's subject")
            # the login checked the certificate; a revocation since then closes the connection
            return Principal("thing", subject[0], "")
        app = await self.core.accounts.app(username)
        if app is None:
            raise Refused("unknown_app", f"unknown application {username[:200]!r}")
        return Principal("app", app.name, app.owner_id, app.fleet_wide)

    # ---- what ----------------------------------------------------------------------------------
    async def vhost(self, params: dict[str, str], remote: str) -> str:
        principal = await self._principal(params.get("username", ""))
        client_id = params.get("client_id")
        if (
            isinstance(principal, Principal)
            and client_id is not None
            and not principal.owns_client_id(client_id)
        ):
            raise Refused("client_id_mismatch", principal.client_id_rule())
        return ALLOW

    async def resource(self, params: dict[str, str], remote: str) -> str:
        principal = await self._principal(params.get("username", ""))
        if isinstance(principal, Service):
            return ALLOW
        kind, name, permission = params.get("resource"), params.get("name", ""), params.get("permission")
        if kind == "exchange" and name == EXCHANGE and permission in ("read", "write"):
            return ALLOW  # which topics: the topic path
        if kind == "queue":
            # the MQTT plugin's queue of one of its own client ids
            match = SUBSCRIPTION_QUEUE.fullmatch(name)
            if match and principal.owns_client_id(match.group(1)):
                return ALLOW
        return DENY

    async def topic(self, params: dict[str, str], remote: str) -> str:
        principal = await self._principal(params.get("username", ""))
        if isinstance(principal, Service):
            return ALLOW
        if params.get("resource") != "topic" or params.get("name") != EXCHANGE:
            return DENY
        topic = mqtt_topic(params.get("routing_key", ""))
        permission = params.get("permission")
        if permission == "write":
            if await permitted(self.core, principal, Action.PUBLISH, topic):
                return ALLOW
            self.counters.denied_publishes += 1
            log.info("publish by %s %s to %.200r denied", principal.kind, principal.name, topic)
        elif permission == "read":
            if await permitted_filter(self.core, principal, topic):
                return ALLOW
            self.counters.denied_subscribes += 1
        return DENY


class AuthListener:
    def __init__(self, runner: web.AppRunner, port: int, auth: EngineAuth) -> None:
        self.runner = runner
        self.port = port
        self.auth = auth

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_external_auth(
    cfg: Config, core: Core, logins: Logins, counters: Counters
) -> AuthListener | None:
    """Serve the auth backend on mqtt.external.auth (None when it is disabled: another bridge
    process of the same installation answers the engine); `logins` records the things' usernames,
    `counters` the refused logins and denied publishes and subscriptions."""
    listener = cfg.mqtt.external.auth
    if not listener.enabled:
        return None
    auth = EngineAuth(cfg, core, logins, counters)
    runner = web.AppRunner(auth.app(), access_log=None, shutdown_timeout=2, keepalive_timeout=30)
    await runner.setup()
    try:
        await web.TCPSite(runner, listener.host, listener.port).start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"cannot listen on {listener.host}:{listener.port} (mqtt.external.auth): {reason};"
            " choose another mqtt.external.auth.port or host"
        ) from None
    port = next(a[1] for a in map(tuple, runner.addresses))
    return AuthListener(runner, port, auth)
