"""External mode's data plane (issue #15) on a real 2-node RabbitMQ cluster (tests/engine.py): a
thing's certificate connects to an engine node over MQTT/TLS; what it publishes is committed by the
bridge (read back over HTTP) before the engine has it acknowledged; replies, an owner's messages
and retained documents reach it through the engine; bridge workers share the queue; a worker
killed or an engine node stopped loses nothing acknowledged and commits nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import orjson
import pytest

from tests.conftest import Bridge, basic
from tests.engine import Node, RabbitCluster, serving
from tests.helpers import Account, account, becomes, call, create_thing, next_message, ok, run_sync, until

# kill -9 of a worker under load is a race: once in the suite (its time budget), 20 rounds when it
# was made and whenever the consumer changes (THINGBRIDGE_KILL_ROUNDS=20)
KILL_ROUNDS = int(os.environ.get("THINGBRIDGE_KILL_ROUNDS", "1"))


# This module's queue, declared by its first bridge through the second node (its AMQP URL first):
# that node holds the queue, and it is the one the fault test stops.
QUEUE = "thingbridge.data-plane-tests"


def external_config(cluster: RabbitCluster, **extra: object) -> dict:
    external = cluster.external_config()
    return {**external, "amqp": external["amqp"][::-1], "queue": QUEUE, **extra}


def external_bridge(cluster: RabbitCluster, folder: Path) -> Bridge:
    """A bridge of the cluster in external mode, with the cluster's CA (the engine trusts what it
    issues); it answers the engine's auth backend."""
    folder.mkdir(parents=True, exist_ok=True)
    # a thing per test and round (THINGBRIDGE_KILL_ROUNDS): a quota set here, not by a CLI process
    return cluster.bridge(folder, external_config(cluster), accounts={"free_plan_things": 1000})


@pytest.fixture(scope="module")
def engine_bridge(
    rabbit_cluster: RabbitCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bridge]:
    bridge = external_bridge(rabbit_cluster, tmp_path_factory.mktemp("external"))
    yield from serving(bridge)


@pytest.fixture(scope="module")
def owner(engine_bridge: Bridge) -> Account:
    return account(engine_bridge)


async def messages(bridge: Bridge, owner: Account, thing_id: str, kind: str | None = None) -> list[dict]:
    query = f"?messagetype={kind}" if kind else ""
    return ok(await call("GET", f"{bridge.api}/things/{thing_id}/messages{query}", owner.token))


async def test_a_device_s_messages_are_committed_and_answered_through_the_engine(
    rabbit_cluster: RabbitCluster, engine_bridge: Bridge, owner: Account, tmp_path: Path
) -> None:
    thing = await create_thing(engine_bridge, owner.token, tmp_path)
    node = rabbit_cluster.nodes[0]
    async with node.thing_client(thing) as client:
        await client.subscribe(f"things/{thing.id}/status/+", qos=1)  # the replies
        await client.subscribe(f"things/{thing.id}/upgrade/check/+", qos=1)
        await client.publish(f"things/{thing.id}/collect", b'{"temp": 21.5}', qos=1)
        await client.publish(f"things/{thing.id}/status", b'{"status": "ok", "info": {"v": 1}}', qos=1)
        status_reply = await next_message(client, 10)
        await client.publish(f"things/{thing.id}/upgrade/check", b'{"name": "nope", "version": "1"}', qos=1)
        check_reply = await next_message(client, 10)
    assert str(status_reply.topic) == f"things/{thing.id}/status/accepted"
    assert orjson.loads(status_reply.payload) == {"config": "sync"}
    assert str(check_reply.topic) == f"things/{thing.id}/upgrade/check/rejected"
    assert orjson.loads(check_reply.payload)["errorCode"] == 400
    stored = await until(lambda: messages(engine_bridge, owner, thing.id, "ingress"), "the collect")
    assert [m["message"] for m in stored] == [{"temp": 21.5}]
    assert [m["message"] for m in await messages(engine_bridge, owner, thing.id, "status")] == [
        {"status": "ok", "info": {"v": 1}}
    ]


async def test_an_owner_s_message_and_the_retained_config_reach_the_thing_on_any_node(
    rabbit_cluster: RabbitCluster, engine_bridge: Bridge, owner: Account, tmp_path: Path
) -> None:
    thing = await create_thing(engine_bridge, owner.token, tmp_path)
    first, second = rabbit_cluster.nodes
    async with first.thing_client(thing) as client:
        await client.subscribe(f"things/{thing.id}/publish", qos=1)
        sent = await call(
            "POST", f"{engine_bridge.api}/things/{thing.id}/publish", owner.token, json={"led": "on"}
        )
        ok(sent)
        got = await next_message(client, 10)
    assert orjson.loads(got.payload) == {"led": "on"}
    # A config set over HTTP, then a device that subscribes later, on the other node: retained there too.
    desired = {"UpdateRate": 77}
    ok(await call("PATCH", f"{engine_bridge.api}/things/{thing.id}/desired", owner.token, json=desired))

    async def config_on(node: Node) -> dict | None:
        async with node.thing_client(thing, f"{thing.id}:late") as late:
            await late.subscribe(f"things/{thing.id}/config", qos=1)
            try:
                message = await next_message(late, 1)
            except (AssertionError, TimeoutError):
                return None
            assert message.retain
            return orjson.loads(message.payload)

    for node in (second, first):
        config = await until(lambda node=node: config_on(node), f"the retained config on {node.name}")
        assert config["UpdateRate"] == 77


async def test_a_refused_message_is_answered_and_acknowledged_once(
    rabbit_cluster: RabbitCluster, engine_bridge: Bridge, owner: Account, tmp_path: Path
) -> None:
    """Bad JSON on status is answered on status/rejected, acknowledged, never redelivered."""
    thing = await create_thing(engine_bridge, owner.token, tmp_path)
    async with rabbit_cluster.nodes[1].thing_client(thing) as client:
        await client.subscribe(f"things/{thing.id}/status/+", qos=1)
        await client.publish(f"things/{thing.id}/status", b"{not json", qos=1)
        reply = await next_message(client, 10)
        assert str(reply.topic) == f"things/{thing.id}/status/rejected"
        assert orjson.loads(reply.payload)["errorCode"] == 400
        with pytest.raises((AssertionError, TimeoutError)):  # once: not redelivered and answered again
            await next_message(client, 1.5)
    assert await messages(engine_bridge, owner, thing.id, "status") == []


def published_seqs(stored: list[dict]) -> list[int]:
    return sorted(m["message"]["seq"] for m in stored)


async def publish_paced(client: aiomqtt.Client, topic: str, seqs: range, acked: list[int]) -> None:
    """QoS 1 publishes, 20 in flight at a time; `acked` gets each seq whose PUBACK came back."""
    window = asyncio.Semaphore(20)

    async def one(seq: int) -> None:
        async with window:
            await client.publish(topic, orjson.dumps({"seq": seq}), qos=1)
            acked.append(seq)

    await asyncio.gather(*(one(seq) for seq in seqs))


@pytest.mark.parametrize("round_", range(KILL_ROUNDS))
def test_kill_9_of_a_worker_loses_nothing_and_commits_nothing_twice(
    rabbit_cluster: RabbitCluster, engine_bridge: Bridge, owner: Account, tmp_path: Path, round_: int
) -> None:
    """A second worker on the same store and queue; killed while 300 messages flow: the first
    takes its unacknowledged ones over, and the redelivered ones it finds committed are skipped."""
    worker = rabbit_cluster.worker(engine_bridge, tmp_path, external_config(rabbit_cluster))
    worker.start(timeout=60)
    thing = run_sync(create_thing(engine_bridge, owner.token, tmp_path / "things"))
    total = 300
    acked: list[int] = []

    async def flow() -> None:
        async with rabbit_cluster.nodes[round_ % 2].thing_client(thing) as client:
            sender = asyncio.create_task(
                publish_paced(client, f"things/{thing.id}/collect", range(total), acked)
            )
            await until(lambda: _at_least(acked, total // 3), "a third acknowledged")
            worker.kill()  # SIGKILL: whatever it held unacknowledged goes back to the queue
            await sender

    try:
        run_sync(flow())
    finally:
        worker.kill()
    assert sorted(acked) == list(range(total))

    async def all_stored() -> list[dict] | None:
        stored = await messages(engine_bridge, owner, thing.id, "ingress")
        return stored if len(stored) >= total else None

    stored = run_sync(until(all_stored, "every message stored", 30))
    assert published_seqs(stored) == list(range(total))  # each exactly once


async def _at_least(items: list[int], n: int) -> bool:
    return len(items) >= n


async def test_killing_the_engine_node_that_holds_the_queue_loses_nothing_acknowledged(
    rabbit_cluster: RabbitCluster, engine_bridge: Bridge, owner: Account, tmp_path: Path
) -> None:
    """kill -9 of the node holding the queue (and the bridge's AMQP connections, and the device's)
    while a device publishes through it: the device goes on through the other node, the bridge's
    connections move there, the queue's mirror takes over. Every message the engine acknowledged
    is stored; only one the device sent again (no PUBACK came) may be stored twice. A thing that
    was connected to that node alone is offline (no closed event: the node died)."""
    thing = await create_thing(engine_bridge, owner.token, tmp_path)
    bystander = await create_thing(engine_bridge, owner.token, tmp_path / "bystander")
    first, holder = rabbit_cluster.nodes  # the bridge declared the queue through the second
    total = 300
    acked: set[int] = set()
    attempts = dict.fromkeys(range(total), 0)
    cut = asyncio.Event()

    async def send(client: aiomqtt.Client, seq: int, window: asyncio.Semaphore) -> None:
        async with window:
            attempts[seq] += 1
            await client.publish(f"things/{thing.id}/collect", orjson.dumps({"seq": seq}), qos=1)
            acked.add(seq)
            if len(acked) == total // 3:
                cut.set()

    async def kill_holder() -> None:
        await cut.wait()
        await asyncio.to_thread(rabbit_cluster.kill_node, holder)

    queue = await engine_queue(rabbit_cluster)  # mirrored by the bridge's policy, held where said
    assert queue["effective_policy_definition"] == {"ha-mode": "all", "ha-sync-mode": "automatic"}
    assert queue["node"] == holder.name and queue["synchronised_slave_nodes"] == [first.name]
    killer = asyncio.create_task(kill_holder())
    bystanding = contextlib.AsyncExitStack()
    try:
        await bystanding.enter_async_context(holder.thing_client(bystander, timeout=3))
        await becomes(engine_bridge, owner, bystander.id, "online")
        for node in (holder, first, first):
            broken = False
            try:
                # a short timeout: leaving a dead connection waits that long for its DISCONNECT
                async with (
                    node.thing_client(thing, timeout=3) as client,
                    asyncio.TaskGroup() as group,
                ):
                    window = asyncio.Semaphore(20)
                    for seq in range(total):
                        if seq not in acked:
                            group.create_task(send(client, seq, window))
            except* aiomqtt.MqttError:
                broken = True  # that node went away: the rest through the next one
            if not broken:
                break
        await killer
        assert acked == set(range(total))

        async def all_stored() -> list[dict] | None:
            stored = await messages(engine_bridge, owner, thing.id, "ingress")
            return stored if {m["message"]["seq"] for m in stored} >= acked else None

        stored = published_seqs(await until(all_stored, "every acknowledged message stored", 30))
        await becomes(engine_bridge, owner, bystander.id, "offline")
        twice = {seq for seq in stored if stored.count(seq) > 1}
        assert all(attempts[seq] > 1 for seq in twice), twice  # only what the device sent again
        assert attempts[0] == 1 and max(attempts.values()) > 1  # the kill did cut the flow
    finally:
        killer.cancel()
        with contextlib.suppress(aiomqtt.MqttError):  # its node is gone
            await bystanding.aclose()
        if holder.proc is None:  # the cluster serves the next tests whole again
            await asyncio.to_thread(rejoin, rabbit_cluster, holder)


async def engine_queue(cluster: RabbitCluster) -> dict:
    """The module's queue as the engine's management API describes it (as the bridge's user), once
    its statistics show the policy (they lag: collect_statistics_interval, 1 s here)."""
    ext = cluster.external_config()
    url = f"{cluster.nodes[0].management_url}/api/queues/%2F/{QUEUE}"

    async def described() -> dict | None:
        answer = await call("GET", url, headers=basic(ext["username"], ext["password"]))
        assert answer.status == 200, answer.body
        return answer.json if "effective_policy_definition" in answer.json else None

    return await until(described, "the queue's policy in the engine's statistics")


def rejoin(cluster: RabbitCluster, node: Node) -> None:
    """Start a stopped node again and wait until it runs in the cluster."""
    cluster.start_node(node)
    cluster.ctl(node, "await_startup", timeout=120)
