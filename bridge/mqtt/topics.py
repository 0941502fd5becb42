"""Topic rules, as pure functions (no broker needed to test them).

A thing may use only `things/{its id}/...`, and may not publish on the cloud-to-device topics
(so it cannot forge commands, config or presence that applications trust). An application may
subscribe under `things/` and publish to `things/{id}/publish` of the things its owner owns."""

from __future__ import annotations

PREFIX = "things"
# Topics only the bridge or applications publish on (relative to things/{id}/), with their whole
# subtrees (a thing publishing on presence/x would reach apps subscribed to presence/#) ...
CLOUD_TO_DEVICE = ("publish", "config", "upgrade/notify", "presence")
# ... except these device requests that live under them.
DEVICE_REQUESTS = frozenset({"config/get"})
REPLY_SUFFIXES = ("/accepted", "/rejected")


def thing_of(topic: str) -> str | None:
    """The thing id a concrete topic belongs to, or None when it is not a things/{id}/... topic."""
    parts = topic.split("/", 2)
    if len(parts) == 3 and parts[0] == PREFIX and parts[1] and parts[2]:
        return parts[1]
    return None


def thing_may_publish(thing_id: str, topic: str) -> bool:
    if thing_of(topic) != thing_id:
        return False
    rest = topic.split("/", 2)[2]
    if rest in DEVICE_REQUESTS:
        return True
    cloud = any(rest == t or rest.startswith(t + "/") for t in CLOUD_TO_DEVICE)
    return (
        not cloud
        and not rest.endswith(REPLY_SUFFIXES)
        and "/accepted/" not in rest
        and "/rejected/" not in rest
    )


def thing_may_subscribe(thing_id: str, topic_filter: str) -> bool:
    parts = topic_filter.split("/", 2)
    return len(parts) == 3 and parts[0] == PREFIX and parts[1] == thing_id and parts[2] != ""


def app_may_subscribe(topic_filter: str) -> bool:
    parts = topic_filter.split("/", 1)
    return parts[0] == PREFIX and len(parts) == 2 and parts[1] != ""


def publish_target(topic: str) -> str | None:
    """The thing an application's publish is addressed to (things/{id}/publish), else None."""
    thing = thing_of(topic)
    return thing if thing is not None and topic == f"{PREFIX}/{thing}/publish" else None
