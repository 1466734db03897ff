"""Prometheus metrics: the service's own and the values of the streams chosen by
EMA_METRICS_STREAM_PREFIXES (see app.metrics)."""

from typing import Annotated

from fastapi import APIRouter, Header, Response

from app.deps import MetricsDep, StoreDep

router = APIRouter(tags=["monitoring"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(
    metrics: MetricsDep,
    store: StoreDep,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Prometheus metrics in the text format (OpenMetrics when the `Accept` header asks for it).

    Answers even when Redis is down: the stream values are then left out.
    """
    body, content_type = await metrics.scrape(store, accept)
    return Response(body, headers={"Content-Type": content_type})
