"""Staged rollouts (our extension, same mounts and error shape): a version offered to a rollout
profile's devices wave by wave, stopping itself above an error threshold (bridge/core/rollouts.py).
Progress is also published retained on MQTT rollouts/{id}/state to the owner's applications."""

from __future__ import annotations

from typing import Any

import msgspec

from bridge.core.accounts import User
from bridge.http.common.auth import USER
from bridge.http.common.operation import Call, Operations
from bridge.http.upgrader import models
from bridge.http.upgrader.models import ListParams, RolloutPath, body
from bridge.http.upgrader.routes import list_query, listing

api = Operations()
ROLLOUT_TAG = "upgrader rollouts"


@api.post(
    "/rollouts",
    "Start a staged rollout (extension)",
    tag=ROLLOUT_TAG,
    auth=USER,
    body=models.NewRollout,
    body_required=True,
    answer=models.Rollout,
    status=201,
    errors=(400, 401, 404, 409, 413),
    description="The profile's devices are fixed now, ordered by SHA-256 of the thing id and cut at the "
    "cumulative wave percentages; the first wave is offered the version at once. 409 when a running "
    "or paused rollout of the version to the profile exists; 400 when the version does not target it.",
)
async def create_rollout(call: Call[User, None, None, models.NewRollout]) -> models.Rollout:
    return msgspec.convert(
        await call.core.rollouts.create(call.principal.id, body(call.body)), models.Rollout
    )


@api.get(
    "/rollouts",
    "The staged rollouts (extension)",
    tag=ROLLOUT_TAG,
    auth=USER,
    query=ListParams,
    answer=models.RolloutList,
    errors=(400, 401),
)
async def list_rollouts(call: Call[User, None, ListParams, None]) -> Any:
    found = await call.core.rollouts.list(call.principal.id, list_query(call.query))
    return listing(models.RolloutList, "rolloutList", found)


@api.get(
    "/rollouts/{rolloutId}",
    "One staged rollout: state, current wave, counts (extension)",
    tag=ROLLOUT_TAG,
    auth=USER,
    path_model=RolloutPath,
    answer=models.Rollout,
    errors=(400, 401, 404),
)
async def get_rollout(call: Call[User, RolloutPath, None, None]) -> models.Rollout:
    return msgspec.convert(
        await call.core.rollouts.get(call.principal.id, call.path.rolloutId), models.Rollout
    )


def _transition(verb: str, summary: str, description: str) -> None:
    """POST /rollouts/{id}/<verb>: one state change of the core (409 from any other state)."""

    async def handler(call: Call[User, RolloutPath, None, None]) -> models.Rollout:
        change = getattr(call.core.rollouts, verb)
        return msgspec.convert(await change(call.principal.id, call.path.rolloutId), models.Rollout)

    api.post(
        f"/rollouts/{{rolloutId}}/{verb}",
        summary,
        tag=ROLLOUT_TAG,
        auth=USER,
        path_model=RolloutPath,
        answer=models.Rollout,
        errors=(400, 401, 404, 409),
        description=description,
        operation_id=f"{verb}Rollout",
    )(handler)


_transition("pause", "Pause a running rollout (extension)", "No further wave is released until resumed.")
_transition("resume", "Resume a paused rollout (extension)", "The current wave's timeout starts again.")
_transition(
    "cancel",
    "Cancel a rollout for good (extension)",
    "Devices already offered the version keep the offer; no further device is offered it.",
)
