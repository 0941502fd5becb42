"""Software upgrades in-process: the core with a real Store on a temporary SQLite file (no server,
no mocks). The list rules and wave membership as pure functions; the catalog (software, versions,
profiles, accounts) with its tenancy, upserts and cascades; checkForUpgrade resolution, notices
and reports; and a 20-thing fleet walk through a staged rollout that moves on results and
timeouts and stops itself above its error threshold."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.core import topics
from bridge.core.accounts import User
from bridge.core.errors import Conflict, Invalid, NotFound, Revoked
from bridge.core.listing import ListQuery
from bridge.core.messages import UPGRADE, VERSIONS, Query
from bridge.core.rollouts import parse_waves, wave_order, wave_sizes, waves_of
from bridge.core.service import Core
from bridge.core.things import DeviceIdentity, NewThing
from bridge.core.upgrades import Put
from tests.helpers import in_process_core

# The document's example version, with its "High" priority (an alias of UPGRADE_TYPE_FORCED).
EXAMPLE_VERSION = {
    "versionNumber": "Beta_124",
    "releaseDate": "2016-04-06T13:47:59.228Z",
    "status": "RECOMMENDED",
    "priority": "High",
    "releaseNote": "Release note of the software version release",
    "eULA": "A license agreement of the software",
    "downloadUrl": "download url",
    "rolloutProfiles": ["Beta"],
    "dependencies": [{"softwareName": "HTML5", "name": "Gravity_ION_HTML5", "versionNumber": "Beta_123"}],
}


def version(number: str, day: int, profiles: list[str], status: str = "REQUIRED") -> dict[str, Any]:
    return {
        "versionNumber": number,
        "releaseDate": f"2024-01-{day:02d}T00:00:00Z",
        "status": status,
        "priority": "UPGRADE_TYPE_STANDBY",
        "downloadUrl": f"https://dl.example/{number}",
        "rolloutProfiles": profiles,
    }


# ---- pure rules -----------------------------------------------------------------------------------
def test_list_query_pages_filters_projects_and_sorts() -> None:
    records = [{"id": str(i), "name": f"n{i % 3}", "size": i} for i in range(10)]
    known = ("id", "name", "size")
    assert ListQuery.parse().apply(records, known) == (10, records)
    total, page = ListQuery.parse(limit="3", page="2").apply(records, known)
    assert total == 10 and [r["id"] for r in page] == ["3", "4", "5"]
    total, page = ListQuery.parse(limit="3", page="2", offset="1").apply(records, known)  # offset wins
    assert [r["id"] for r in page] == ["1", "2", "3"]
    total, page = ListQuery.parse(filter='{"name":"n1"}', fields='["size"]', sort="-size").apply(
        records, known
    )
    assert total == 3 and page == [{"id": "7", "size": 7}, {"id": "4", "size": 4}, {"id": "1", "size": 1}]
    total, page = ListQuery.parse(sort="name,-size", limit=2).apply(records, known)
    assert [r["id"] for r in page] == ["9", "6"]
    for bad in (
        {"limit": "0"},
        {"limit": "x"},
        {"page": "0"},
        {"offset": "-1"},
        {"filter": "{"},
        {"filter": "[1]"},
        {"fields": '{"a":1}'},
        {"fields": "[1]"},
        {"sort": "name,,size"},
    ):
        with pytest.raises(Invalid):
            ListQuery.parse(**bad)
    with pytest.raises(Invalid, match="unknown field"):
        ListQuery.parse(sort="colour").apply(records, known)


def test_wave_membership_is_stable_and_cumulative() -> None:
    things = [f"t{i:02d}" for i in range(20)]
    assert wave_order(things) == wave_order(list(reversed(things)))  # not the input order
    assert wave_sizes([10, 50, 100], 20) == [2, 10, 20]
    assert wave_sizes([10, 50, 100], 5) == [1, 3, 5]  # a percentage that reaches a device includes it
    waves = waves_of(things, [10, 50, 100])
    ordered = wave_order(things)
    assert [waves[t] for t in ordered] == [0] * 2 + [1] * 8 + [2] * 10
    for bad in ([], [50, 40, 100], [10, 50], [0, 100], [10, 10, 100], ["10", 100], [True, 100]):
        with pytest.raises(Invalid):
            parse_waves(bad)


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
async def core(tmp_path: Path, store_url: str) -> AsyncIterator[Core]:
    async with in_process_core(tmp_path, store_url) as core:
        yield core


@dataclass
class Operator:
    user: User
    things: list[str]

    @property
    def id(self) -> str:
        return self.user.id


async def operator(core: Core, name: str, things: int) -> Operator:
    await core.accounts.create_user(name, "operator-password-1")
    await core.accounts.set_plan(name, things + 1)
    user = await core.accounts.user_by_name(name)
    created = [
        await core.things.create(user, NewThing(id=f"{name}-{i:02d}", key_type="EC")) for i in range(things)
    ]
    return Operator(user, [t.id for t in created])


async def retained(core: Core, topic: str) -> Any:
    """The last document queued for `topic` in the outbox (no server drains it here); None when
    it was cleared (an empty retained payload) or never queued."""
    rows = await core.store.read(
        lambda c: c.execute("SELECT payload FROM outbox WHERE topic = ? ORDER BY seq", (topic,)).fetchall()
    )
    return orjson.loads(rows[-1]["payload"]) if rows and rows[-1]["payload"] else None


async def device(core: Core, owner: Operator, thing_id: str) -> DeviceIdentity:
    thing = await core.things.get(owner.user, thing_id)
    return DeviceIdentity(thing.id, thing.owner_id, thing.cert_id)


# ---- the catalog ----------------------------------------------------------------------------------
async def test_catalog_round_trip_upserts_and_tenancy(core: Core) -> None:
    alice, bob = await operator(core, "alice", 0), await operator(core, "bob", 0)
    up = core.upgrades
    assert await up.create_profile(alice.id, {"id": "Beta", "name": "Beta testers"}) == "Beta"
    generated = await up.create_profile(alice.id, {"name": "no id given"})
    assert generated and generated != "Beta"
    with pytest.raises(Conflict):
        await up.create_profile(alice.id, {"id": "Beta"})
    assert await up.create_profile(bob.id, {"id": "Beta"}) == "Beta"  # ids are per operator

    software = {"id": "ion", "name": "Gravity_ION", "deviceTypes": ["STB"], "upgradeType": "FULLSTACK"}
    assert await up.create_software(alice.id, {**software, "versions": [EXAMPLE_VERSION]}) == "ion"
    with pytest.raises(Conflict):
        await up.create_software(alice.id, {**software, "id": "other"})  # the name is taken
    doc = await up.get_software(alice.id, "Gravity_ION")
    assert doc == await up.get_software(alice.id, "ion")  # by name, then by id
    stored = {**EXAMPLE_VERSION, "priority": "UPGRADE_TYPE_FORCED"}
    assert doc == {**software, "versions": [stored]}
    assert await up.get_version(alice.id, "Gravity_ION", "Beta_124") == stored
    assert (await up.get_profile(alice.id, "Beta"))["softwareVersions"] == [
        {"softwareName": "Gravity_ION", "name": "Gravity_ION", "versionNumber": "Beta_124"}
    ]

    # An update of top-level fields counts as a modification; the same body again does not.
    renamed = {"id": "Beta", "name": "Beta testers (renamed)"}
    assert await up.update_profile(alice.id, "Beta", renamed) == Put(1, 1)
    assert await up.update_profile(alice.id, "Beta", renamed) == Put(1, 0)
    described = {**software, "description": "gravity sensor firmware"}
    assert await up.update_software(alice.id, "ion", described) == Put(1, 1)
    assert await up.update_software(alice.id, "ion", described) == Put(1, 0)
    assert (await up.get_software(alice.id, "ion"))["description"] == "gravity sensor firmware"

    # PUT of a version upserts; the same body again changes nothing.
    v2 = version("Beta_125", 5, ["Beta"])
    assert await up.put_version(alice.id, "Gravity_ION", "Beta_125", v2) == Put(0, 0, created=True)
    assert await up.put_version(alice.id, "Gravity_ION", "Beta_125", v2) == Put(1, 0)
    assert await up.put_version(alice.id, "Gravity_ION", "Beta_125", {**v2, "status": "OK"}) == Put(1, 1)
    with pytest.raises(Invalid, match="differs from the path"):
        await up.put_version(alice.id, "Gravity_ION", "Beta_126", v2)
    total, listed = await up.list_software(alice.id, ListQuery.parse(fields='["name"]'))
    assert (total, listed) == (1, [{"id": "ion", "name": "Gravity_ION"}])

    # Another operator's objects do not exist for bob; his own list is empty.
    for call in (
        lambda: up.get_software(bob.id, "Gravity_ION"),
        lambda: up.get_version(bob.id, "ion", "Beta_124"),
        lambda: up.put_version(bob.id, "Gravity_ION", "Beta_125", v2),
        lambda: up.delete_software(bob.id, "ion"),
        lambda: up.get_profile(bob.id, generated),
    ):
        with pytest.raises(NotFound):
            await call()
    assert await up.list_software(bob.id, ListQuery()) == (0, [])

    # Bad input is a clear Invalid, never another exception.
    for bad in (
        {**EXAMPLE_VERSION, "releaseDate": "ISO 8061 date-time"},  # the document's own example
        {**EXAMPLE_VERSION, "priority": "Urgent"},
        {**EXAMPLE_VERSION, "status": "MAYBE"},
        {**EXAMPLE_VERSION, "rolloutProfiles": ["nobody"]},
        {**EXAMPLE_VERSION, "dependencies": [{"name": "no softwareName"}]},
        {**EXAMPLE_VERSION, "colour": "red"},
        {key: value for key, value in EXAMPLE_VERSION.items() if key != "downloadUrl"},
        ["not", "an", "object"],
    ):
        with pytest.raises(Invalid):
            await up.put_version(alice.id, "Gravity_ION", "Beta_124", bad)
    with pytest.raises(Invalid):
        await up.create_software(alice.id, {"name": "x", "upgradeType": "PARTIAL"})

    # Deleting software takes its versions out of every profile.
    assert await up.delete_software(alice.id, "Gravity_ION") == 1
    assert (await up.get_profile(alice.id, "Beta"))["softwareVersions"] == []


async def test_accounts_name_devices_by_id_or_regid_of_the_owner_only(core: Core) -> None:
    alice, bob = await operator(core, "alice", 3), await operator(core, "bob", 1)
    up = core.upgrades
    await up.create_profile(alice.id, {"id": "P"})
    await core.status.set_desired(alice.id, alice.things[1], {"regId": "reg-1"})
    put = await up.put_account(
        alice.id,
        "P",
        "acc",
        {"devices": [{"id": alice.things[0], "type": "STB"}, {"id": "reg-1", "type": "STB"}]},
    )
    assert put.created
    assert await up.get_account(alice.id, "P", "acc") == {
        "id": "acc",
        "rolloutProfileId": "P",
        "devices": [{"id": alice.things[0], "type": "STB"}, {"id": "reg-1", "type": "STB"}],
    }
    with pytest.raises(NotFound, match="device"):  # bob's thing is not alice's device
        await up.add_device(alice.id, "P", "acc", bob.things[0], {"type": "STB"})
    put, created = await up.add_devices(
        alice.id, "P", "acc2", {"deviceList": [{"id": alice.things[2], "type": "X"}]}
    )
    assert created == "acc2" and put.matched == 0
    assert (await up.remove_devices(alice.id, "P", "acc", {"deviceIdList": [alice.things[1]]})).modified == 1
    assert (await up.remove_device(alice.id, "P", "acc", "absent")).modified == 0
    total, accounts = await up.list_accounts(alice.id, "P", ListQuery.parse(limit=1))
    assert total == 2 and [a["id"] for a in accounts] == ["acc"]
    with pytest.raises(NotFound):
        await up.list_accounts(bob.id, "P", ListQuery())

    # Deleting the thing takes it out of its account (ON DELETE CASCADE).
    await core.things.delete(alice.user, alice.things[0])
    assert (await up.get_account(alice.id, "P", "acc"))["devices"] == []


# ---- resolution, notices and reports --------------------------------------------------------------
async def test_check_offers_the_latest_targeted_version_and_reports_clear_notices(core: Core) -> None:
    alice = await operator(core, "alice", 3)
    up = core.upgrades
    for profile in ("A", "B"):
        await up.create_profile(alice.id, {"id": profile})
    await up.put_account(alice.id, "A", "acc-a", {"devices": [{"id": alice.things[0], "type": "STB"}]})
    await up.put_account(alice.id, "B", "acc-b", {"devices": [{"id": alice.things[1], "type": "STB"}]})
    await up.create_software(alice.id, {"name": "html5", "versions": [version("h2", 1, [])]})
    await up.create_software(
        alice.id,
        {
            "name": "ion",
            "versions": [
                version("1.0", 1, ["A", "B"]),
                {
                    **version("2.0", 2, ["A"]),
                    "dependencies": [{"softwareName": "html5", "versionNumber": "h2"}],
                },
                version("3.0", 3, ["B"], status="OK"),
            ],
        },
    )
    a, b, loose = [await device(core, alice, t) for t in alice.things]

    offer = await up.check(a, {"name": "ion", "version": "1.0"})
    assert offer == {
        "name": "ion",
        "status": "REQUIRED",
        "version": "2.0",
        "downloadUrl": "https://dl.example/2.0",
        "dependencies": [{"softwareName": "html5", "name": "html5", "versionNumber": "h2"}],
    }
    # B's latest is 3.0, stored "OK": still offered, as RECOMMENDED.
    assert (await up.check(b, {"name": "ion", "version": "1.0"}))["status"] == "RECOMMENDED"
    # Up to date (or ahead): OK with the supplied version and its own URL.
    assert await up.check(a, {"name": "ion", "version": "3.0"}) == {
        "name": "ion",
        "status": "OK",
        "version": "3.0",
        "downloadUrl": "https://dl.example/3.0",
        "dependencies": [],
    }
    # In no account: every version is a candidate (CATALOG 001 #8).
    assert (await up.check(loose, {"name": "ion", "version": "1.0"}))["version"] == "3.0"
    with pytest.raises(Invalid, match="unknown software"):
        await up.check(a, {"name": "nope", "version": "1"})
    with pytest.raises(Invalid):
        await up.check(a, {"name": "ion"})

    # Notify: A's device is behind on 2.0 -> retained notice + an `upgrade` message; B is not targeted.
    assert await up.notify_version(alice.id, "ion", "2.0") == [a.thing_id]
    assert await up.notify_version(alice.id, "ion", "2.0") == []  # told once per offer
    notice_topic = topics.topic(a.thing_id, topics.UPGRADE_NOTIFY)
    assert await retained(core, notice_topic) == {"upgrades": [offer]}
    upgrade_messages = await core.messages.query(a.thing_id, alice.id, Query(type=UPGRADE))
    assert [m.value for m in upgrade_messages] == [offer]
    # ... which an HTTP-only device's egress long-poll returns.
    assert [m.value for m in await core.messages.wait_egress(a.thing_id, alice.id, Query(), 0)] == [offer]

    # Reporting the version clears the notice; the report is a `versions` message.
    await up.report_versions(
        a,
        {"currentVersionNumbers": [{"softwareName": "ion", "currentVersionNumber": "2.0"}]},
        transport="http",
        client_token="app-7",
    )
    assert await retained(core, notice_topic) is None
    reported = await up.reported_versions(alice.id, a.thing_id)
    assert [(r["softwareName"], r["currentVersionNumber"]) for r in reported] == [("ion", "2.0")]
    assert (await up.check(a, {"name": "ion", "version": "2.0"}))["status"] == "OK"

    await up.report_results(
        b,
        {
            "currentVersionsUpgradeResult": [
                {
                    "softwareName": "ion",
                    "versionNumber": "3.0",
                    "status": "FAILED",
                    "errorCode": "sdp error",
                    "message": "no space",
                }
            ]
        },
        transport="mqtt",
        client_token="tok",
    )
    history = await up.results(alice.id, b.thing_id)
    assert [(r["status"], r["errorCode"], r["clientToken"]) for r in history] == [
        ("FAILED", "sdp error", "tok")
    ]
    assert len(await core.messages.query(b.thing_id, alice.id, Query(type=VERSIONS))) == 1
    for bad in (
        {"currentVersionsUpgradeResult": [{"softwareName": "ion", "versionNumber": "3", "status": "DONE"}]},
        {"currentVersionNumbers": "3.0"},
        {"currentVersionNumbers": [{"softwareName": "ion"}]},
    ):
        with pytest.raises(Invalid):
            await (up.report_results if "currentVersionsUpgradeResult" in bad else up.report_versions)(
                b, bad, transport="mqtt"
            )

    # A revoked identity stores nothing.
    await core.things.set_enabled(alice.user, b.thing_id, False)
    with pytest.raises(Revoked):
        await up.report_versions(
            b,
            {"currentVersionNumbers": [{"softwareName": "ion", "currentVersionNumber": "3.0"}]},
            transport="mqtt",
        )
    assert len(await core.messages.query(b.thing_id, alice.id, Query(type=VERSIONS))) == 1


# ---- staged rollouts ------------------------------------------------------------------------------
def result(version_number: str, status: str) -> dict[str, Any]:
    return {
        "currentVersionsUpgradeResult": [
            {"softwareName": "ion", "versionNumber": version_number, "status": status}
        ]
    }


async def test_fleet_walk_waves_move_on_results_and_stop_above_the_threshold(core: Core) -> None:
    """20 things, two accounts under two profiles; 2.0 targets profile A only. A rollout of 2.0 to
    A in waves of 20/60/100 % with threshold 0.25: wave 1 all succeed -> wave 2; a wave-2 timeout
    with one failure of three reported -> above the threshold, stopped; nothing further offered."""
    alice = await operator(core, "alice", 20)
    up, rollouts = core.upgrades, core.rollouts
    profile_a, profile_b = alice.things[:10], alice.things[10:]
    for profile, members in (("A", profile_a), ("B", profile_b)):
        await up.create_profile(alice.id, {"id": profile})
        await up.put_account(
            alice.id, profile, f"acc-{profile}", {"devices": [{"id": t, "type": "STB"} for t in members]}
        )
    await up.create_software(
        alice.id, {"name": "ion", "versions": [version("1.0", 1, ["A", "B"]), version("2.0", 2, ["A"])]}
    )
    devices = {t: await device(core, alice, t) for t in alice.things}

    async def offered(thing_id: str) -> str:
        return (await up.check(devices[thing_id], {"name": "ion", "version": "1.0"}))["version"]

    with pytest.raises(Invalid, match="does not target"):
        await rollouts.create(alice.id, rollout_body(profile="B"))
    with pytest.raises(NotFound):
        await rollouts.create(alice.id, {**rollout_body(), "versionNumber": "9.9"})
    start = 1_000_000.0
    state = await rollouts.create(alice.id, rollout_body(), now=start)
    with pytest.raises(Conflict):  # one unfinished rollout per version and profile
        await rollouts.create(alice.id, rollout_body())
    waves = waves_of(profile_a, [20, 60, 100])
    wave = {w: [t for t in wave_order(profile_a) if waves[t] == w] for w in range(3)}
    assert [len(wave[w]) for w in range(3)] == [2, 4, 4]
    assert state["state"] == "running" and state["wave"] == 1
    assert state["counts"] == {"targeted": 10, "offered": 2, "succeeded": 0, "failed": 0, "pending": 2}
    assert await retained(core, topics.rollout_state(state["id"])) == state

    # Only the released wave is offered 2.0 (and told); profile B never is.
    assert [await offered(t) for t in wave[0]] == ["2.0", "2.0"]
    assert {await offered(t) for t in wave[1] + wave[2]} == {"1.0"}
    assert {await offered(t) for t in profile_b} == {"1.0"}
    assert await retained(core, topics.topic(wave[0][0], topics.UPGRADE_NOTIFY)) is not None
    assert await retained(core, topics.topic(wave[1][0], topics.UPGRADE_NOTIFY)) is None

    # Results outside the rollout's version do not count; wave 1 all SUCCESS -> wave 2 released.
    await up.report_results(devices[wave[0][0]], result("1.0", "FAILED"), transport="mqtt")
    await up.report_results(devices[wave[0][0]], result("2.0", "INITIATED"), transport="mqtt")
    for thing_id in wave[0]:
        await up.report_results(devices[thing_id], result("2.0", "SUCCESS"), transport="mqtt")
    state = await rollouts.get(alice.id, state["id"])
    assert state["wave"] == 2 and state["counts"]["offered"] == 6 and state["counts"]["succeeded"] == 2
    assert {await offered(t) for t in wave[1]} == {"2.0"}
    assert await retained(core, topics.topic(wave[1][0], topics.UPGRADE_NOTIFY)) is not None
    assert await retained(core, topics.rollout_state(state["id"])) == state

    # Pause holds the wave even past its timeout; resume restarts the timeout.
    await rollouts.pause(alice.id, state["id"])
    assert await rollouts.advance(now=start + 10_000) == 0
    resumed = await rollouts.resume(alice.id, state["id"])
    assert resumed["state"] == "running" and resumed["wave"] == 2

    # Wave 2: one FAILED, two SUCCESS, one silent; before the timeout it waits, after it 1/3 > 0.25.
    await up.report_results(devices[wave[1][0]], result("2.0", "FAILED"), transport="http")
    for thing_id in wave[1][1:3]:
        await up.report_results(devices[thing_id], result("2.0", "SUCCESS"), transport="http")
    assert await rollouts.advance() == 0  # the (restarted) timeout has not passed
    assert await rollouts.advance(now=resumed_at(resumed) + 61) == 1
    state = await rollouts.get(alice.id, state["id"])
    assert state["state"] == "stopped" and "above the error threshold" in state["reason"]
    assert state["counts"] == {"targeted": 10, "offered": 6, "succeeded": 4, "failed": 1, "pending": 1}
    # No further device is offered the version; those already offered keep it.
    assert {await offered(t) for t in wave[2]} == {"1.0"}
    assert await offered(wave[1][3]) == "2.0"
    with pytest.raises(Conflict):
        await rollouts.resume(alice.id, state["id"])
    total, listed = await rollouts.list(alice.id, ListQuery.parse(fields='["state"]'))
    assert (total, listed) == (1, [{"id": state["id"], "state": "stopped"}])
    bob = await operator(core, "bob", 0)
    with pytest.raises(NotFound):
        await rollouts.get(bob.id, state["id"])
    assert await rollouts.list(bob.id, ListQuery()) == (0, [])


async def test_a_wave_failing_beyond_recovery_stops_at_once_and_completion_offers_to_all(core: Core) -> None:
    alice = await operator(core, "alice", 5)
    up, rollouts = core.upgrades, core.rollouts
    await up.create_profile(alice.id, {"id": "A"})
    await up.put_account(
        alice.id, "A", "acc", {"devices": [{"id": t, "type": "STB"} for t in alice.things[:4]]}
    )
    await up.create_software(alice.id, {"name": "ion", "versions": [version("2.0", 2, ["A"])]})
    devices = {t: await device(core, alice, t) for t in alice.things}
    ordered = wave_order(alice.things[:4])

    # Waves of 50/100 %, threshold 0.4: one failure of a 2-device wave (0.5) cannot come back under.
    first = await rollouts.create(alice.id, {**rollout_body(), "waves": [50, 100], "errorThreshold": 0.4})
    await up.report_results(devices[ordered[0]], result("2.0", "ABORTED"), transport="mqtt")
    assert (await rollouts.get(alice.id, first["id"]))["state"] == "stopped"

    # Cancelled, then a new rollout at threshold 0.5 completes: then everyone in A is offered 2.0,
    # also a device added to the profile afterwards.
    second = await rollouts.create(alice.id, {**rollout_body(), "waves": [50, 100], "errorThreshold": 0.5})
    for thing_id in ordered[:2]:
        await up.report_results(devices[thing_id], result("2.0", "SUCCESS"), transport="mqtt")
    assert (await rollouts.get(alice.id, second["id"]))["wave"] == 2
    cancelled = await rollouts.cancel(alice.id, second["id"])
    assert cancelled["state"] == "stopped" and cancelled["reason"] == "cancelled"
    third = await rollouts.create(alice.id, {**rollout_body(), "waves": [100], "errorThreshold": 0.5})
    for thing_id in ordered[2:]:
        await up.report_results(devices[thing_id], result("2.0", "SUCCESS"), transport="mqtt")
    assert (await rollouts.get(alice.id, third["id"]))["state"] == "completed"
    late = alice.things[4]
    await up.add_device(alice.id, "A", "acc", late, {"type": "STB"})
    assert (await up.check(devices[late], {"name": "ion", "version": "1.0"}))["version"] == "2.0"


def rollout_body(profile: str = "A") -> dict[str, Any]:
    return {
        "softwareName": "ion",
        "versionNumber": "2.0",
        "rolloutProfileId": profile,
        "waves": [20, 60, 100],
        "errorThreshold": 0.25,
        "waveTimeout": 60,
    }


def resumed_at(state: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(state["updated"].replace("Z", "+00:00")).timestamp()
