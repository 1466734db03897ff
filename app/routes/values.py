"""Bulk pushes: values for many streams in one request, each entry applied on its own."""

from http import HTTPStatus

from fastapi import APIRouter, Request

from app.auth import ApiKey, Forbidden
from app.deps import StoreDep
from app.errors import InvalidInput, ServiceError
from app.errors import problem_responses as _problems
from app.models import BulkEntry, BulkPush, BulkReply, BulkResult, Problem
from app.store import PushRequest

router = APIRouter(prefix="/v1", tags=["streams"])


@router.post("/values", responses=_problems(413, 422))
async def push_bulk(bulk: BulkPush, store: StoreDep, request: Request) -> BulkReply:
    """Push to many streams in one request.

    Each entry is applied on its own, atomically, exactly as a push of it to its stream alone
    would be, and gets its own result: an invalid entry, or one the API key may not write, fails
    alone while the others are applied. The entries are sent to Redis in one pipeline per node
    (a Redis Cluster's nodes get theirs at once). At most EMA_MAX_BATCH values in all.
    """
    holder: ApiKey | None = getattr(request.state, "api_key", None)
    results: list[BulkResult | None] = [None] * len(bulk.entries)
    pushes: list[PushRequest] = []
    positions: list[int] = []
    for index, entry in enumerate(bulk.entries):
        if not isinstance(entry, BulkEntry):
            error: ServiceError = InvalidInput.from_validation(entry.errors)
            results[index] = _failed(index, entry.stream, error)
        elif holder is not None and not holder.allows("write", entry.stream):
            error = Forbidden(f"the key {holder.name!r} may not write {entry.stream!r}")
            results[index] = _failed(index, entry.stream, error)
        else:
            pushes.append(PushRequest(entry.stream, entry.samples(), entry.idempotency_key))
            positions.append(index)
    outcomes = await store.push_many(pushes)
    for index, push, outcome in zip(positions, pushes, outcomes, strict=True):
        if isinstance(outcome, ServiceError):
            results[index] = _failed(index, push.name, outcome)
        else:
            state, replayed = outcome
            results[index] = BulkResult(
                index=index, stream=push.name, status=200, replayed=replayed, state=state
            )
    done = [result for result in results if result is not None]
    return BulkReply(
        applied=sum(1 for r in done if r.status == 200 and not r.replayed),
        failed=sum(1 for r in done if r.status != 200),
        results=done,
    )


def _failed(index: int, stream: str | None, error: ServiceError) -> BulkResult:
    problem = Problem(
        title=HTTPStatus(error.status).phrase,
        status=error.status,
        detail=error.detail,
        errors=[dict(e) for e in error.errors] if error.errors else None,
    )
    return BulkResult(index=index, stream=stream, status=error.status, error=problem)
