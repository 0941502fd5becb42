"""The Upgrader V2 HTTP dialect against the real `thingbridge serve` process (one server for the
module): every operation's success and documented errors under both mounts, the document's
examples round-tripping (priorities stored as the enum), the device credential (token header,
client certificate, 403 for another device's path), and a fleet walk over HTTP and MQTT: offers
by profile, the same answer over both transports, notify reaching an online MQTT thing, results
over HTTP moving a staged rollout and failures stopping one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Bridge
from tests.helpers import (
    Account,
    Resp,
    ThingFiles,
    account,
    call,
    create_thing,
    next_message,
    run_sync,
    thing_client,
    thing_jwt,
)

MOUNTS = ("/Upgrade/v2", "/v2")
EXAMPLE_SOFTWARE = {  # the document's POST /v2/software example, with real dates
    "id": "5ab8d35f",
    "name": "Gravity_ION",
    "description": "Software package for ION",
    "deviceTypes": ["STB"],
    "upgradeType": "FULLSTACK",
    "versions": [
        {
            "versionNumber": "Beta_124",
            "releaseDate": "2016-04-06T13:47:59.228Z",
            "status": "RECOMMENDED",
            "priority": "High",
            "releaseNote": "Release notes",
            "eULA": "End user license agreement",
            "downloadUrl": "http://some.site.somewhere/download",
            "rolloutProfiles": [],
            "dependencies": [
                {"softwareName": "123XYZ", "name": "Gravity_ION_HTML5", "versionNumber": "Beta_124"}
            ],
        }
    ],
}


def answer(resp: Resp, status: int) -> Any:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["Content-Type"].startswith("application/json")
    return resp.json


def failed(resp: Resp, status: int) -> str:
    """The dialect's error body with errorCode = the HTTP status; its message."""
    body = answer(resp, status)
    assert set(body) == {"status", "errorCode", "errorMessage"}, body
    assert body["errorCode"] == status and body["status"] and body["errorMessage"]
    return body["errorMessage"]


class Api:
    """One operator (or a device's token) on one mount of the dialect."""

    def __init__(self, bridge: Bridge, tok: str | None, mount: str = "/v2") -> None:
        self.base = bridge.http + mount
        self.tok = tok

    async def __call__(self, method: str, path: str, **kw: Any) -> Resp:
        return await call(method, self.base + path, self.tok, **kw)


def release(number: str, day: int, profiles: list[str], status: str = "REQUIRED") -> dict[str, Any]:
    return {
        "releaseDate": f"2024-03-{day:02d}T00:00:00Z",
        "status": status,
        "downloadUrl": f"https://dl.example/{number}",
        "priority": "UPGRADE_TYPE_FORCED",
        "rolloutProfiles": profiles,
    }


def device_headers(
    thing: ThingFiles, client_token: str | None = None, header: str = "token"
) -> dict[str, str]:
    return {header: thing_jwt(thing), **({"Client-Token": client_token} if client_token else {})}


@pytest.fixture(scope="module")
def bridge(bridge_on_each_store: Bridge) -> Bridge:
    return bridge_on_each_store


@pytest.fixture(scope="module")
def alice(bridge: Bridge) -> Account:
    acct = account(bridge)
    bridge.cli("plan", "set", acct.name, "--things", "100")  # the fleet walk's 20 and more
    return acct


@pytest.fixture(scope="module")
def bob(bridge: Bridge) -> Account:
    return account(bridge)


@pytest.fixture(scope="module")
def things_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upgrader-things")


@pytest.fixture(scope="module")
def fleet(bridge: Bridge, alice: Account, things_dir: Path) -> list[ThingFiles]:
    """Twenty EC things of alice's (the fleet walk puts ten under each of two profiles)."""

    async def make() -> list[ThingFiles]:
        return [await create_thing(bridge, alice.token, things_dir, keyType="EC") for _ in range(20)]

    return run_sync(make())


# ---- operator operations --------------------------------------------------------------------------
async def test_operator_needs_the_access_token(bridge: Bridge, alice: Account) -> None:
    for mount in MOUNTS:
        for method, path in (("GET", "/software"), ("POST", "/rolloutProfile"), ("GET", "/rollouts")):
            message = failed(await Api(bridge, None, mount)(method, path), 401)
            assert "Authorization" in message
            failed(await Api(bridge, alice.token + "x", mount)(method, path), 401)
    # unknown paths and methods under the mounts answer in this dialect's shape, never /v2/v2
    failed(await Api(bridge, alice.token)("GET", "/nothing"), 404)
    failed(await Api(bridge, alice.token)("PATCH", "/software"), 405)
    failed(await Api(bridge, alice.token)("GET", "/v2/software"), 404)


async def test_software_and_versions(bridge: Bridge, alice: Account, bob: Account) -> None:
    api, other = Api(bridge, alice.token, "/Upgrade/v2"), Api(bridge, bob.token)
    assert answer(await api("POST", "/software", json=EXAMPLE_SOFTWARE), 201) == {"id": "5ab8d35f"}
    stored = answer(await api("GET", "/software/Gravity_ION"), 200)
    expected = orjson.loads(orjson.dumps(EXAMPLE_SOFTWARE))
    expected["versions"][0]["priority"] = "UPGRADE_TYPE_FORCED"  # the alias, stored as the enum
    assert stored == expected
    assert answer(await api("GET", "/software/5ab8d35f"), 200) == stored  # by id too
    assert answer(await Api(bridge, alice.token, "/v2")("GET", "/software/Gravity_ION"), 200) == stored
    failed(await api("POST", "/software", json={"name": "Gravity_ION"}), 409)
    failed(await api("POST", "/software", json={"name": 5}), 400)
    failed(await api("POST", "/software", json={"name": "x", "upgradeType": "PARTIAL"}), 400)
    failed(
        await api("POST", "/software", data=b"{not json", headers={"Content-Type": "application/json"}), 400
    )
    bad_date = {**EXAMPLE_SOFTWARE["versions"][0], "releaseDate": "ISO 8061 date-time"}
    assert "releaseDate" in failed(
        await api("POST", "/software", json={"name": "y", "versions": [bad_date]}), 400
    )
    failed(await other("GET", "/software/Gravity_ION"), 404)  # another operator's

    # a version PUT upserts; the path names it
    v125 = {**release("Beta_125", 2, []), "priority": "Low"}
    assert answer(await api("PUT", "/software/Gravity_ION/versions/Beta_125", json=v125), 200) == {
        "matchedCount": 0,
        "modifiedCount": 0,
    }
    got = answer(await api("GET", "/software/Gravity_ION/versions/Beta_125"), 200)
    assert got["priority"] == "UPGRADE_TYPE_MANUAL" and got["versionNumber"] == "Beta_125"
    put = answer(
        await api("PUT", "/software/Gravity_ION/versions/Beta_125", json={**v125, "status": "OK"}), 200
    )
    assert put == {"matchedCount": 1, "modifiedCount": 1}
    failed(
        await api("PUT", "/software/Gravity_ION/versions/Beta_125", json={**v125, "versionNumber": "x"}), 400
    )
    failed(
        await api("PUT", "/software/Gravity_ION/versions/Beta_125", json={**v125, "priority": "Urgent"}), 400
    )
    failed(await api("PUT", "/software/Nope/versions/1", json=v125), 404)
    failed(await api("GET", "/software/Gravity_ION/versions/Nope"), 404)
    deps = answer(await api("GET", "/software/Gravity_ION/versions/Beta_124/dependency"), 200)
    assert deps == {"totalRecords": 1, "dependencyList": EXAMPLE_SOFTWARE["versions"][0]["dependencies"]}
    failed(await api("GET", "/software/Gravity_ION/versions/Nope/dependency"), 404)
    assert answer(await api("DELETE", "/software/Gravity_ION/versions/Beta_125"), 200) == {"deletedCount": 1}
    failed(await api("DELETE", "/software/Gravity_ION/versions/Beta_125"), 404)

    # software PUT: the whole document
    renamed = {"name": "Gravity_ION", "description": "new", "versions": EXAMPLE_SOFTWARE["versions"]}
    assert answer(await api("PUT", "/software/Gravity_ION", json=renamed), 200)["matchedCount"] == 1
    assert answer(await api("GET", "/software/Gravity_ION"), 200)["description"] == "new"
    failed(await api("PUT", "/software/Gravity_ION", json={"name": "Gravity_ION", "id": "other"}), 400)
    failed(await api("PUT", "/software/Nope", json={"name": "Nope"}), 404)

    # lists: limit/page/offset/filter/fields/sort
    for name in ("Alpha", "Beta"):
        answer(await api("POST", "/software", json={"name": name, "id": f"id-{name}"}), 201)
    listed = answer(await api("GET", "/software", params={"sort": "-name", "fields": '["name"]'}), 200)
    assert listed["totalRecords"] == 3
    assert [s["name"] for s in listed["softwareList"]] == ["Gravity_ION", "Beta", "Alpha"]
    assert set(listed["softwareList"][0]) == {"id", "name"}
    paged = answer(await api("GET", "/software", params={"sort": "name", "limit": "1", "page": "2"}), 200)
    assert (paged["totalRecords"], [s["name"] for s in paged["softwareList"]]) == (3, ["Beta"])
    skipped = answer(await api("GET", "/software", params={"sort": "name", "limit": "2", "offset": "2"}), 200)
    assert [s["name"] for s in skipped["softwareList"]] == ["Gravity_ION"]
    found = answer(await api("GET", "/software", params={"filter": '{"name":"Alpha"}'}), 200)
    assert [s["id"] for s in found["softwareList"]] == ["id-Alpha"]
    for params in ({"filter": "{oops"}, {"fields": "[1]"}, {"filter": '{"nope": 1}'}, {"limit": "0"}):
        failed(await api("GET", "/software", params=params), 400)
    assert answer(await other("GET", "/software"), 200) == {"totalRecords": 0, "softwareList": []}
    for name in ("Alpha", "Beta"):
        assert answer(await api("DELETE", f"/software/{name}"), 200) == {"deletedCount": 1}
    failed(await api("DELETE", "/software/Alpha"), 404)


async def test_profiles_accounts_and_devices(
    bridge: Bridge, alice: Account, bob: Account, fleet: list[ThingFiles]
) -> None:
    api, other = Api(bridge, alice.token), Api(bridge, bob.token)
    example = {
        "id": "Beta",
        "name": "Beta_Upgrade",
        "description": "Rollout Profile for Beta version upgrade",
    }
    assert answer(await api("POST", "/rolloutProfile", json=example), 201) == {"id": "Beta"}
    failed(await api("POST", "/rolloutProfile", json=example), 409)
    failed(await api("POST", "/rolloutProfile", json={"id": 1}), 400)
    generated = answer(await api("POST", "/rolloutProfile", json={"name": "no id"}), 201)["id"]
    assert answer(await api("GET", "/rolloutProfile/Beta"), 200) == {**example, "softwareVersions": []}
    failed(await other("GET", "/rolloutProfile/Beta"), 404)
    listed = answer(await api("GET", "/rolloutProfile", params={"filter": '{"id":"Beta"}'}), 200)
    assert listed == {"totalRecords": 1, "rolloutProfileList": [{**example, "softwareVersions": []}]}
    failed(await api("GET", "/rolloutProfile", params={"fields": "not json"}), 400)
    put = answer(await api("PUT", "/rolloutProfile/Beta", json={"id": "Beta", "name": "Beta 2"}), 200)
    assert put["matchedCount"] == 1  # modifiedCount: see the report of the core's stale-row compare
    assert answer(await api("GET", "/rolloutProfile/Beta"), 200)["name"] == "Beta 2"
    failed(await api("PUT", "/rolloutProfile/Beta", json={"id": "Gamma"}), 400)
    failed(await api("PUT", "/rolloutProfile/Nope", json={}), 404)

    # an account: upsert (201 then 200), its devices by thing id or regId
    one, two, three = fleet[0].id, fleet[1].id, fleet[2].id
    ok_desired = await call(
        "PATCH", f"{bridge.api}/things/{three}/desired", alice.token, json={"regId": f"stb-{three}"}
    )
    assert ok_desired.status == 200
    account_path = "/rolloutProfile/Beta/accounts/acc-1"
    created = await api("PUT", account_path, json={"id": "acc-1", "devices": [{"id": one, "type": "STB"}]})
    assert answer(created, 201) == {"id": "acc-1"}
    again = await api("PUT", account_path, json={"devices": [{"id": one, "type": "STB"}]})
    assert answer(again, 200) == {"matchedCount": 1, "modifiedCount": 0}
    failed(await api("PUT", account_path, json={"devices": [{"id": "no-such-thing", "type": "STB"}]}), 404)
    failed(await api("PUT", account_path, json={"devices": [{"id": one}]}), 400)
    failed(await api("PUT", "/rolloutProfile/Nope/accounts/acc-1", json={}), 404)
    assert answer(await api("GET", account_path), 200) == {
        "id": "acc-1",
        "rolloutProfileId": "Beta",
        "devices": [{"id": one, "type": "STB"}],
    }
    failed(await api("GET", "/rolloutProfile/Beta/accounts/nope"), 404)
    failed(await other("GET", account_path), 404)
    added = answer(
        await api("PUT", f"{account_path}/devices/add", json={"deviceList": [{"id": two, "type": "STB"}]}),
        200,
    )
    assert added == {"matchedCount": 1, "modifiedCount": 1}
    new_account = await api("PUT", "/rolloutProfile/Beta/accounts/acc-2/devices/add", json={"deviceList": []})
    assert answer(new_account, 200) == {"matchedCount": 0, "modifiedCount": 0, "_id": "acc-2"}
    failed(await api("PUT", f"{account_path}/devices/add", json={}), 400)
    single = await api(
        "PUT", f"{account_path}/devices/stb-{three}/add", json={"id": f"stb-{three}", "type": "STB"}
    )
    assert answer(single, 200) == {"matchedCount": 1, "modifiedCount": 1}
    failed(await api("PUT", f"{account_path}/devices/{one}/add", json={"id": two, "type": "STB"}), 400)
    failed(
        await api(
            "PUT", f"/rolloutProfile/Beta/accounts/nope/devices/{one}/add", json={"id": one, "type": "T"}
        ),
        404,
    )
    accounts = answer(await api("GET", "/rolloutProfile/Beta/accounts", params={"limit": "1"}), 200)
    assert accounts["totalRecords"] == 2 and [a["id"] for a in accounts["accountList"]] == ["acc-1"]
    assert len(answer(await api("GET", account_path), 200)["devices"]) == 3
    failed(await api("GET", "/rolloutProfile/Nope/accounts"), 404)
    removed = answer(await api("PUT", f"{account_path}/devices/remove", json={"deviceIdList": [two]}), 200)
    assert removed == {"matchedCount": 1, "modifiedCount": 1}
    failed(await api("PUT", f"{account_path}/devices/remove", json={}), 400)
    assert answer(await api("PUT", f"{account_path}/devices/stb-{three}/remove"), 200) == {
        "matchedCount": 1,
        "modifiedCount": 1,
    }
    failed(await api("PUT", f"/rolloutProfile/Beta/accounts/nope/devices/{one}/remove"), 404)
    assert answer(await api("GET", account_path), 200)["devices"] == [{"id": one, "type": "STB"}]
    assert answer(await api("DELETE", "/rolloutProfile/Beta/accounts/acc-2"), 200) == {"deletedCount": 1}
    failed(await api("DELETE", "/rolloutProfile/Beta/accounts/acc-2"), 404)
    assert answer(await api("DELETE", f"/rolloutProfile/{generated}"), 200) == {"deletedCount": 1}
    failed(await api("DELETE", f"/rolloutProfile/{generated}"), 404)
    assert answer(await api("DELETE", "/rolloutProfile/Beta"), 200) == {"deletedCount": 1}


# ---- device operations ----------------------------------------------------------------------------
async def test_device_operations_and_their_credential(
    bridge: Bridge, alice: Account, fleet: list[ThingFiles]
) -> None:
    api = Api(bridge, alice.token)
    device, neighbour = fleet[3], fleet[4]
    answer(
        await api(
            "POST",
            "/software",
            json={"name": "dev-fw", "versions": [{"versionNumber": "1", **release("1", 1, [])}]},
        ),
        201,
    )
    check = {"name": "dev-fw", "version": "0"}
    url = f"{bridge.http}/Upgrade/v2"
    offered = answer(
        await call("POST", f"{url}/checkForUpgrade", json=check, headers=device_headers(device)), 200
    )
    assert offered == {
        "name": "dev-fw",
        "status": "REQUIRED",
        "version": "1",
        "downloadUrl": "https://dl.example/1",
        "dependencies": [],
    }
    same = await call(
        "POST", f"{url}/checkForUpgrade", json=check, headers=device_headers(device, header="Token")
    )
    assert answer(same, 200) == offered
    https = f"https://127.0.0.1:{bridge.ports['https']}/v2"
    tls = bridge.client_tls(device.cert, device.key)
    assert answer(await call("POST", f"{https}/checkForUpgrade", json=check, ssl=tls), 200) == offered
    failed(
        await call(
            "POST",
            f"{url}/checkForUpgrade",
            json={"name": "nope", "version": "0"},
            headers=device_headers(device),
        ),
        400,
    )
    failed(
        await call("POST", f"{url}/checkForUpgrade", json={"name": "dev-fw"}, headers=device_headers(device)),
        400,
    )
    failed(await call("POST", f"{url}/checkForUpgrade", json=check), 401)
    failed(await call("POST", f"{url}/checkForUpgrade", json=check, headers={"token": "garbage"}), 401)
    forged = thing_jwt(device, signer=neighbour)
    failed(await call("POST", f"{url}/checkForUpgrade", json=check, headers={"token": forged}), 401)
    failed(await call("POST", f"{url}/checkForUpgrade", json=check, auth=f"Bearer {alice.token}"), 401)

    versions = {"currentVersionNumbers": [{"softwareName": "dev-fw", "currentVersionNumber": "1"}]}
    path = f"{url}/devices/{device.id}/currentVersionNumbers"
    reported = await call("PUT", path, json=versions, headers=device_headers(device, "app-7"))
    assert answer(reported, 202) == {"message": "Accepted"}
    failed(await call("PUT", path, json=versions, headers=device_headers(neighbour)), 403)
    failed(await call("PUT", path, json={"currentVersionNumbers": [{}]}, headers=device_headers(device)), 400)
    failed(await call("PUT", path, json=versions), 401)
    neighbour_tls = bridge.client_tls(neighbour.cert, neighbour.key)
    failed(
        await call(
            "PUT", f"{https}/devices/{device.id}/currentVersionNumbers", json=versions, ssl=neighbour_tls
        ),
        403,
    )
    state = await call("GET", f"{bridge.api}/things/{device.id}/state", alice.token)
    assert [v["currentVersionNumber"] for v in state.json["result"]["currentVersionNumbers"]] == ["1"]
    # the device is OK now, and a regId in the path names it too
    assert (
        answer(
            await call(
                "POST",
                f"{url}/checkForUpgrade",
                json={**check, "version": "1"},
                headers=device_headers(device),
            ),
            200,
        )["status"]
        == "OK"
    )
    ok_desired = await call(
        "PATCH", f"{bridge.api}/things/{device.id}/desired", alice.token, json={"regId": f"reg-{device.id}"}
    )
    assert ok_desired.status == 200

    result = {
        "currentVersionsUpgradeResult": [
            {
                "softwareName": "dev-fw",
                "versionNumber": "1",
                "status": "FAILED",
                "errorCode": "sdp error",
                "message": "no space",
            }
        ]
    }
    reg_path = f"{url}/devices/reg-{device.id}/currentVersionNumbers/upgradeResult"
    assert answer(await call("PUT", reg_path, json=result, headers=device_headers(device, "app-7")), 202) == {
        "message": "Accepted"
    }
    failed(await call("PUT", reg_path, json=result, headers=device_headers(neighbour)), 403)
    bad = {
        "currentVersionsUpgradeResult": [{"softwareName": "dev-fw", "versionNumber": "1", "status": "BROKEN"}]
    }
    failed(await call("PUT", reg_path, json=bad, headers=device_headers(device)), 400)
    history = answer(await api("GET", f"/devices/{device.id}/upgradeResults"), 200)
    assert history["totalRecords"] == 1
    (record,) = history["upgradeResultList"]
    assert {k: record[k] for k in ("status", "errorCode", "message", "clientToken", "transport")} == {
        "status": "FAILED",
        "errorCode": "sdp error",
        "message": "no space",
        "clientToken": "app-7",
        "transport": "http",
    }
    failed(await api("GET", "/devices/no-such-device/upgradeResults"), 404)
    failed(await call("GET", f"{bridge.http}/v2/devices/{device.id}/upgradeResults", alice.token + "x"), 401)


# ---- the fleet walk: offers by profile, both transports, notify, staged rollouts --------------------
async def test_fleet_walk_over_both_transports(
    bridge: Bridge, alice: Account, bob: Account, things_dir: Path, fleet: list[ThingFiles]
) -> None:
    api, bobs = Api(bridge, alice.token), Api(bridge, bob.token)
    gold, silver = fleet[:10], fleet[10:]
    bobs_thing = await create_thing(bridge, bob.token, things_dir, keyType="EC")
    for profile, members in (("gold", gold), ("silver", silver)):
        answer(await api("POST", "/rolloutProfile", json={"id": profile}), 201)
        devices = [{"id": t.id, "type": "STB"} for t in members]
        answer(
            await api("PUT", f"/rolloutProfile/{profile}/accounts/{profile}-acc", json={"devices": devices}),
            201,
        )
    answer(await bobs("POST", "/rolloutProfile", json={"id": "gold"}), 201)
    answer(
        await bobs(
            "PUT", "/rolloutProfile/gold/accounts/b", json={"devices": [{"id": bobs_thing.id, "type": "STB"}]}
        ),
        201,
    )
    failed(
        await bobs(
            "PUT", "/rolloutProfile/gold/accounts/b", json={"devices": [{"id": gold[0].id, "type": "STB"}]}
        ),
        404,
    )
    base = {"versionNumber": "1.0", **release("1.0", 1, ["gold", "silver"])}
    answer(await api("POST", "/software", json={"name": "walk-fw", "versions": [base]}), 201)
    answer(
        await bobs(
            "POST",
            "/software",
            json={"name": "walk-fw", "versions": [{"versionNumber": "1.0", **release("1.0", 1, ["gold"])}]},
        ),
        201,
    )

    # 2.0 targets gold only, staged: waves 50/100
    answer(await api("PUT", "/software/walk-fw/versions/2.0", json=release("2.0", 2, ["gold"])), 200)
    staged = {
        "softwareName": "walk-fw",
        "versionNumber": "2.0",
        "rolloutProfileId": "gold",
        "waves": [50, 100],
        "errorThreshold": 0.5,
        "waveTimeout": 3600,
    }
    rollout = answer(await api("POST", "/rollouts", json=staged), 201)
    assert (
        rollout["state"],
        rollout["wave"],
        rollout["counts"]["targeted"],
        rollout["counts"]["offered"],
    ) == ("running", 1, len(gold), len(gold) // 2)

    async def http_offer(thing: ThingFiles) -> dict:
        resp = await call(
            "POST",
            f"{bridge.http}/v2/checkForUpgrade",
            json={"name": "walk-fw", "version": "1.0"},
            headers=device_headers(thing),
        )
        return answer(resp, 200)

    offers = {t.id: (await http_offer(t))["version"] for t in fleet}
    first_wave = [t for t in gold if offers[t.id] == "2.0"]
    later = [t for t in gold if offers[t.id] != "2.0"]
    assert len(first_wave) == len(gold) // 2 and all(offers[t.id] == "1.0" for t in silver + later)

    # MQTT: the same answer for the same device; the first wave was told (retained) at the start
    online = first_wave[0]
    async with thing_client(bridge, online) as client:
        await client.subscribe(f"things/{online.id}/upgrade/notify", qos=1)
        told = orjson.loads((await next_message(client)).payload)
        assert [u["version"] for u in told["upgrades"]] == ["2.0"]
        await client.subscribe(f"things/{online.id}/upgrade/check/accepted", qos=1)
        await client.publish(
            f"things/{online.id}/upgrade/check", orjson.dumps({"name": "walk-fw", "version": "1.0"}), qos=1
        )
        assert orjson.loads((await next_message(client)).payload) == await http_offer(online)

    # notify over HTTP reaches an online MQTT thing at once: 1.5 for silver, told by the operator
    watcher = silver[0]
    async with thing_client(bridge, watcher) as other:
        await other.subscribe(f"things/{watcher.id}/upgrade/#", qos=1)
        await other.publish(
            f"things/{watcher.id}/upgrade/check", orjson.dumps({"name": "walk-fw", "version": "1.0"}), qos=1
        )
        accepted = await next_message(other)
        assert accepted.topic.matches(f"things/{watcher.id}/upgrade/check/accepted")
        assert orjson.loads(accepted.payload) == await http_offer(watcher)
        answer(await api("PUT", "/software/walk-fw/versions/1.5", json=release("1.5", 1, ["silver"])), 200)
        answer(await api("POST", "/software/walk-fw/versions/1.5/notify"), 202)
        message = await next_message(other)
        assert message.topic.matches(f"things/{watcher.id}/upgrade/notify")
        assert [u["version"] for u in orjson.loads(message.payload)["upgrades"]] == ["1.5"]
    failed(await api("POST", "/software/walk-fw/versions/9.9/notify"), 404)
    answer(await api("POST", "/devices/software/pendingUpdate/notify"), 202)
    assert (await http_offer(bobs_thing))["version"] == "1.0"  # bob's catalog, not alice's

    # results over HTTP move the rollout: wave 1 succeeds -> wave 2 released
    async def report(thing: ThingFiles, number: str, status: str) -> None:
        body = {
            "currentVersionsUpgradeResult": [
                {"softwareName": "walk-fw", "versionNumber": number, "status": status}
            ]
        }
        answer(
            await call(
                "PUT",
                f"{bridge.http}/v2/devices/{thing.id}/currentVersionNumbers/upgradeResult",
                json=body,
                headers=device_headers(thing),
            ),
            202,
        )

    for thing in first_wave:
        await report(thing, "2.0", "SUCCESS")
    moved = answer(await api("GET", f"/rollouts/{rollout['id']}"), 200)
    assert (moved["wave"], moved["counts"]["offered"], moved["counts"]["succeeded"]) == (
        2,
        len(gold),
        len(first_wave),
    )
    assert [(await http_offer(t))["version"] for t in later] == ["2.0"] * len(later)
    listed = answer(await api("GET", "/rollouts", params={"fields": '["state"]'}), 200)
    assert listed["rolloutList"] == [{"id": rollout["id"], "state": "running"}]

    # 3.0 to gold: failures above the threshold stop its rollout; later checks offer nothing new
    answer(await api("PUT", "/software/walk-fw/versions/3.0", json=release("3.0", 3, ["gold"])), 200)
    staged = {**staged, "versionNumber": "3.0", "errorThreshold": 0.4}
    failing = answer(await api("POST", "/rollouts", json=staged), 201)
    failed(await api("POST", "/rollouts", json=staged), 409)  # one running rollout per version and profile
    for thing in first_wave:
        await report(thing, "3.0", "FAILED")
    stopped = answer(await api("GET", f"/rollouts/{failing['id']}"), 200)
    assert (stopped["state"], stopped["wave"], stopped["counts"]["failed"]) == ("stopped", 1, len(first_wave))
    assert "error threshold" in stopped["reason"]
    assert [(await http_offer(t))["version"] for t in later] == ["2.0"] * len(later)

    # the 2.0 rollout: pause, resume, cancel, each only from its states
    path = f"/rollouts/{rollout['id']}"
    assert answer(await api("POST", f"{path}/pause"), 200)["state"] == "paused"
    failed(await api("POST", f"{path}/pause"), 409)
    assert answer(await api("POST", f"{path}/resume"), 200)["state"] == "running"
    assert answer(await api("POST", f"{path}/cancel"), 200)["state"] == "stopped"
    failed(await api("POST", f"{path}/resume"), 409)
    failed(await bobs("GET", path), 404)


async def test_rollout_routes(bridge: Bridge, alice: Account) -> None:
    api = Api(bridge, alice.token)
    failed(await api("GET", "/rollouts/nope"), 404)
    failed(await api("POST", "/rollouts/nope/pause"), 404)
    failed(await api("POST", "/rollouts", json={"softwareName": "x"}), 400)
    body = {
        "softwareName": "nope",
        "versionNumber": "1",
        "rolloutProfileId": "nope",
        "waves": [100],
        "errorThreshold": 0,
        "waveTimeout": 1,
    }
    failed(await api("POST", "/rollouts", json=body), 404)
    failed(await api("POST", "/rollouts", json={**body, "waves": [50, 40]}), 400)
