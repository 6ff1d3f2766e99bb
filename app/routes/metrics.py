"""GET /metrics: Prometheus's text format, for the whole fleet; no API key, as /health."""

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import ServicesDep
from app.metrics import render

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def prometheus_metrics(services: ServicesDep) -> Response:
    return Response(render(services), media_type=CONTENT_TYPE_LATEST)
