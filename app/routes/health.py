"""GET /health: the API, Redis and the workers, each reported; 503 unless all answer."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import Services, ServicesDep
from core.protocol import ComponentHealth, HealthReport

router = APIRouter(tags=["health"])

WORKER_PING_TIMEOUT_S = 1.0


@router.get("/health", response_model=HealthReport, responses={503: {"model": HealthReport}})
def health(services: ServicesDep) -> JSONResponse:
    redis_health = _redis(services)
    workers = _workers(services) if redis_health.ok else ComponentHealth(ok=False, detail="unknown: Redis is down")
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


def _workers(services: Services) -> ComponentHealth:
    try:
        replies = services.celery.control.ping(timeout=WORKER_PING_TIMEOUT_S)
    except Exception as exc:
        return ComponentHealth(ok=False, detail=f"ping failed: {type(exc).__name__}")
    names = sorted(name for reply in replies for name in reply)
    if not names:
        return ComponentHealth(ok=False, detail="no worker answered")
    return ComponentHealth(ok=True, detail=f"{len(names)} answering: {', '.join(names)}")
