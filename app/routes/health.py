"""Probes for orchestrators: liveness never touches Redis; readiness does."""

from fastapi import APIRouter

from app.deps import StoreDep
from app.errors import problem_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness probe")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness probe", responses=problem_responses())
async def readyz(store: StoreDep) -> dict[str, str]:
    """Redis answers: the service can serve requests."""
    await store.ping()
    return {"status": "ready"}
