"""GET /health: the API, Redis and the workers, each reported; 503 unless all are up.

It reads the workers' heartbeats from Redis (two quick commands), so any number of callers cost
the other routes nothing. Worker names are shown only to callers the API would let in (any
caller when the server has no keys, else one with a valid key); others learn up or down.
"""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import Services, ServicesDep
from app.security import MayReadDetails
from core.heartbeats import Heartbeats
from core.protocol import ComponentHealth, HealthReport

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthReport, responses={503: {"model": HealthReport}})
def health(services: ServicesDep, details: MayReadDetails) -> JSONResponse:
    redis_health = _redis(services)
    workers = (
        _workers(services, details) if redis_health.ok else ComponentHealth(ok=False, detail="unknown: Redis is down")
    )
    report = HealthReport(
        ok=redis_health.ok and workers.ok,
        api=ComponentHealth(ok=True, detail="up"),
        redis=redis_health,
        workers=workers,
    )
    return JSONResponse(status_code=200 if report.ok else 503, content=report.model_dump())


def _redis(services: Services) -> ComponentHealth:
    try:
        services.redis.ping()
    except Exception as exc:
        return ComponentHealth(ok=False, detail=f"unreachable: {type(exc).__name__}")
    return ComponentHealth(ok=True, detail="up")


def _workers(services: Services, details: bool) -> ComponentHealth:
    """Up when at least one worker can take a task now; one that is recovering its engine does not count."""
    states = Heartbeats(services.redis).live()
    ready = [s.name for s in states if s.ready]
    recovering = [s.name for s in states if not s.ready]
    if not details:
        return ComponentHealth(ok=bool(ready), detail="up" if ready else "down")
    parts = [f"{len(ready)} ready" + (f": {', '.join(ready)}" if ready else "")]
    if recovering:
        parts.append(f"{len(recovering)} recovering: {', '.join(recovering)}")
    return ComponentHealth(ok=bool(ready), detail="; ".join(parts))
