"""Small clients for the tests: users, tokens and things over the real HTTP API."""

from __future__ import annotations

import itertools
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import aiohttp

from tests.conftest import ADMIN_PASSWORD, Bridge, basic

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


async def token(bridge: Bridge, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{bridge.api}/token", headers=basic(username, password)) as r,
    ):
        assert r.status == 200, await r.text()
        return (await r.json())["accessToken"]


def new_user(bridge: Bridge, password: str = "user-password-1") -> tuple[str, str]:
    name = unique("user")
    bridge.cli("user", "add", name, "--password", password)
    return name, password


@dataclass
class ThingFiles:
    id: str
    folder: Path
    record: dict

    @property
    def cert(self) -> Path:
        return self.folder / "certificate.pem"

    @property
    def key(self) -> Path:
        return self.folder / "private.key"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"


async def create_thing(bridge: Bridge, tok: str, folder: Path, **body: object) -> ThingFiles:
    """POST /things, then unpack GET /things/{id}/dist into `folder`."""
    headers = {"Authorization": f"Bearer {tok}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(f"{bridge.api}/things", json=body) as r:
            assert r.status == 200, await r.text()
            record = (await r.json())["result"]
        async with s.get(f"{bridge.api}/things/{record['flthingspk']}/dist") as r:
            assert r.status == 200
            data = await r.read()
    with zipfile.ZipFile(BytesIO(data)) as zf:
        for name in zf.namelist():
            target = folder / record["flthingspk"] / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return ThingFiles(record["flthingspk"], folder / record["flthingspk"], record)
