"""The MQTT topic contract: every topic name the bridge uses, and who may use which, as pure
functions (no broker needed to test them). The one place a topic string is built.

A thing may use only `things/{its id}/...`, and may not publish on the cloud-to-device topics
(so it cannot forge commands, config or presence that applications trust). An application may
subscribe under `things/` and publish to `things/{id}/publish` of the things its owner owns, and
subscribe under `rollouts/` to its owner's staged rollouts' progress."""

from __future__ import annotations

PREFIX = "things"

# Flows, relative to things/{id}/.
COLLECT = "collect"  # device -> cloud: a message to store (ingress)
PUBLISH = "publish"  # cloud -> device: a message for the device (egress)
STATUS = "status"  # device -> cloud: SetStatus
STATUS_ACCEPTED = "status/accepted"
STATUS_REJECTED = "status/rejected"
CONFIG = "config"  # cloud -> device: the desired configuration (retained)
CONFIG_GET = "config/get"  # device -> cloud: send the configuration again
PRESENCE = "presence"  # bridge -> applications: online/offline (retained)
UPGRADE_NOTIFY = "upgrade/notify"  # cloud -> device: pending upgrade offers (retained)
UPGRADE_CHECK = "upgrade/check"  # device -> cloud: checkForUpgrade
UPGRADE_CHECK_ACCEPTED = "upgrade/check/accepted"
UPGRADE_CHECK_REJECTED = "upgrade/check/rejected"
VERSIONS = "versions"  # device -> cloud: currentVersionNumbers
UPGRADE_RESULT = "upgrade/result"  # device -> cloud: upgradeResult
FIRMWARE_TARGET = "firmware/target"  # cloud -> device: the firmware target document (retained)
FIRMWARE_GET = "firmware/get"  # device -> cloud: {version, offset, length} of a chunk
FIRMWARE_GET_REJECTED = "firmware/get/rejected"
FIRMWARE_CHUNK = "firmware/chunk"  # cloud -> device: firmware/chunk/{offset}, the raw bytes
FIRMWARE_SWITCHED = "firmware/switched"  # device -> cloud: {version} it runs now
FIRMWARE_SWITCHED_ACCEPTED = "firmware/switched/accepted"
FIRMWARE_SWITCHED_REJECTED = "firmware/switched/rejected"

# What a device bundle tells the device it publishes and subscribes to.
DEVICE_TOPICS = (COLLECT, STATUS, CONFIG_GET, UPGRADE_CHECK, VERSIONS, UPGRADE_RESULT)
CLOUD_TOPICS = (
    PUBLISH,
    CONFIG,
    UPGRADE_NOTIFY,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
    UPGRADE_CHECK_ACCEPTED,
    UPGRADE_CHECK_REJECTED,
)
# Firmware over MQTT is for the things of a firmware product (not in every bundle's thing.json).

# bridge -> applications: a staged rollout's progress (retained), rollouts/{id}/state.
ROLLOUTS = "rollouts"
ROLLOUT_STATE = "state"

# Topics only the bridge or applications publish on, with their whole subtrees (a thing
# publishing on presence/x would reach apps subscribed to presence/#) ...
CLOUD_TO_DEVICE = (PUBLISH, CONFIG, UPGRADE_NOTIFY, PRESENCE, FIRMWARE_TARGET, FIRMWARE_CHUNK)
# ... except these device requests that live under them.
DEVICE_REQUESTS = frozenset({CONFIG_GET})
REPLY_SUFFIXES = ("/accepted", "/rejected")


def topic(thing_id: str, flow: str) -> str:
    return f"{PREFIX}/{thing_id}/{flow}"


def thing_prefix(thing_id: str) -> str:
    """Every topic of the thing starts with this."""
    return f"{PREFIX}/{thing_id}/"


def thing_of(name: str) -> str | None:
    """The thing id a concrete topic belongs to, or None when it is not a things/{id}/... topic."""
    parts = name.split("/", 2)
    if len(parts) == 3 and parts[0] == PREFIX and parts[1] and parts[2]:
        return parts[1]
    return None


def flow_of(thing_id: str, name: str) -> str | None:
    """The flow of one of the thing's own topics (`collect`, `config/get`, ...), else None."""
    prefix = thing_prefix(thing_id)
    return name[len(prefix) :] if name.startswith(prefix) else None


def thing_may_publish(thing_id: str, name: str) -> bool:
    flow = flow_of(thing_id, name)
    if not flow:
        return False
    if flow in DEVICE_REQUESTS:
        return True
    cloud = any(flow == t or flow.startswith(t + "/") for t in CLOUD_TO_DEVICE)
    replies = flow.endswith(REPLY_SUFFIXES) or "/accepted/" in flow or "/rejected/" in flow
    return not cloud and not replies


def firmware_chunk(thing_id: str, offset: int) -> str:
    return topic(thing_id, f"{FIRMWARE_CHUNK}/{offset}")


def thing_may_subscribe(thing_id: str, topic_filter: str) -> bool:
    return bool(flow_of(thing_id, topic_filter))


def rollout_state(rollout_id: str) -> str:
    return f"{ROLLOUTS}/{rollout_id}/{ROLLOUT_STATE}"


def rollout_of(name: str) -> str | None:
    """The rollout a concrete rollouts/{id}/... topic belongs to, else None."""
    parts = name.split("/", 2)
    if len(parts) == 3 and parts[0] == ROLLOUTS and parts[1] and parts[2]:
        return parts[1]
    return None


def app_may_subscribe(topic_filter: str) -> bool:
    parts = topic_filter.split("/", 1)
    return parts[0] in (PREFIX, ROLLOUTS) and len(parts) == 2 and parts[1] != ""


def publish_target(name: str) -> str | None:
    """The thing an application's publish is addressed to (things/{id}/publish), else None."""
    thing = thing_of(name)
    return thing if thing is not None and name == topic(thing, PUBLISH) else None
