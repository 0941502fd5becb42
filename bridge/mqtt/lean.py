"""amqtt's per-connection and per-broker objects without their weight (issue #14): a session without
a `transitions` state machine of its own, the queues it keeps per connection made lean, and the
broker's subscription table knowing which filters match a topic. hardened.py installs them
(importing this module makes amqtt build BridgeSession for every session)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from amqtt import broker as broker_module
from amqtt import session as session_module
from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.protocol import broker_handler as broker_handler_module
from amqtt.session import Session


class SessionState:
    """A session's state as amqtt drives it (new -> connected <-> disconnected), with the triggers
    and the check it calls. Stock gives every Session a `transitions` Machine of its own: 23 KiB
    and about a tenth of the event loop's time per TLS connection (issue #14)."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def connect(self) -> bool:
        if self.state == "connected":  # stock's take-over path catches this (as MachineError)
            raise ValueError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"  # from any state, entered again when already there
        self._session._on_enter_disconnected()
        return True


class BridgeSession(Session):
    def __init__(self) -> None:
        super().__init__()  # its two queues are LeanQueues (below)
        self.retained_messages = OfflineQueue()

    def _init_states(self) -> None:
        self.transitions = SessionState(self)


# amqtt makes its sessions by these module names (a CONNECT, an offline session at start-up), and
# the queues of a session and of a protocol handler by the name Queue (LeanQueue, below).
broker_handler_module.Session = BridgeSession  # type: ignore[attr-defined]
broker_module.Session = BridgeSession  # type: ignore[attr-defined]


class Subscriptions(dict[str, list[tuple[Session, int]]]):
    """The broker's table (filter -> subscribers) knowing, per topic, which filters match it: stock
    tests every filter against every message. Any change to the filters clears what it knows;
    it knows at most MAX_TOPICS topics at a time (then it starts over)."""

    MAX_TOPICS = 4096

    def __init__(self, matches: Callable[[str, str], bool]) -> None:
        super().__init__()
        self._matches = matches
        self._matched: dict[str, tuple[str, ...]] = {}

    def matching(self, topic: str) -> tuple[str, ...]:
        found = self._matched.get(topic)
        if found is None:
            if len(self._matched) >= self.MAX_TOPICS:
                self._matched.clear()
            found = self._matched[topic] = tuple(f for f in self if self._matches(topic, f))
        return found

    def __setitem__(self, key: str, value: list[tuple[Session, int]]) -> None:
        self._matched.clear()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._matched.clear()
        super().__delitem__(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, *args: Any) -> Any:
        self._matched.clear()
        return super().pop(*args)

    def popitem(self) -> tuple[str, list[tuple[Session, int]]]:
        self._matched.clear()
        return super().popitem()

    def clear(self) -> None:
        self._matched.clear()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._matched.clear()
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> Subscriptions:
        self.update(other)
        return self


class LeanQueue(asyncio.Queue):  # type: ignore[type-arg]
    """The unbounded asyncio.Queue amqtt keeps four of per connection (two in the session, two in the
    protocol handler), at a tenth of its 3.3 KiB: nothing joins these queues (one shared `finished`
    event that nobody awaits), an unbounded put never waits (one shared putters deque, always
    empty), and the items and the waiting getters sit in lists (a deque starts with a 512-byte
    block; these hold one or two entries)."""

    _no_putters: ClassVar[deque[Any]] = deque()
    _never_joined: ClassVar[asyncio.Event] = asyncio.Event()

    def __init__(self) -> None:  # asyncio.Queue.__init__, with the shared parts
        self._maxsize = 0
        self._getters: list[Any] = []  # type: ignore[assignment]
        self._putters = self._no_putters
        self._unfinished_tasks = 0
        self._finished = self._never_joined
        self._init(0)

    def _wakeup_next(self, waiters: Any) -> None:  # asyncio's, for a list as well
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    def _init(self, maxsize: int) -> None:
        self._queue: list[Any] = []

    def _put(self, item: Any) -> None:
        self._queue.append(item)

    def _get(self) -> Any:
        return self._queue.pop(0)

    def ring(self, waiter: asyncio.Future[None]) -> None:
        """`waiter` is resolved by the next put, as a get() waiting here would be: one waiter for
        several queues (HardenedBroker._client_message_loop); `unring` once it woke."""
        self._getters.append(waiter)

    def unring(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._getters.remove(waiter)  # type: ignore[attr-defined]


class OfflineQueue(LeanQueue):
    """A persistent session's messages for while it is offline (stock: a plain asyncio.Queue),
    knowing its size in bytes and its head's (through the subclassing hooks asyncio.Queue offers)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)  # type: ignore[misc]
        self.bytes = 0

    def _put(self, item: RetainedApplicationMessage) -> None:
        super()._put(item)  # type: ignore[misc]
        self.bytes += len(item.data or b"")

    def _get(self) -> RetainedApplicationMessage:
        item = super()._get()  # type: ignore[misc]
        self.bytes -= len(item.data or b"")
        return item

    def head_size(self) -> int:
        return len(self._queue[0].data or b"")  # type: ignore[attr-defined]


session_module.Queue = LeanQueue  # type: ignore[attr-defined]
broker_handler_module.Queue = LeanQueue  # type: ignore[attr-defined]
