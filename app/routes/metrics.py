"""Prometheus metrics: the service's own and the values of the streams chosen by
EMA_METRICS_STREAM_PREFIXES (see app.metrics)."""

from fastapi import APIRouter, Request, Response

from app.deps import MetricsDep, StoreDep

router = APIRouter(tags=["monitoring"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
async def metrics(
    metrics: MetricsDep,
    store: StoreDep,
    request: Request,
) -> Response:
    """Prometheus metrics in the text format (OpenMetrics when the `Accept` header asks for it).

    Answers even when Redis is down: the stream values are then left out.
    """
    # Read from the request, not as a parameter: a header parameter would give the route a
    # (never answered) 422 in the OpenAPI document.
    body, content_type = await metrics.scrape(store, request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
