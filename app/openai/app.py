"""The OpenAI family as its own sub-application, mounted at /v1, so that it answers every error in
OpenAI's envelope while the other routes keep FastAPI's."""

from fastapi import Depends, FastAPI

from app.deps import Services
from app.errors import install
from app.openai import errors
from app.openai.protocol import ErrorResponse
from app.openai.batches.routes import router as batches_router
from app.openai.files.routes import router as files_router
from app.openai.responses.routes import router as responses_router
from app.openai.routes import router
from app.security import authenticate


def create_openai_app(docs: bool) -> FastAPI:
    hidden = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="OpenAI-compatible API", redirect_slashes=False, **hidden)
    install(app, errors.CHAT)
    errors_documented: dict[int | str, dict[str, object]] = {code: {"model": ErrorResponse} for code in (400, 401)}
    for routes in (router, responses_router, files_router, batches_router):
        app.include_router(routes, dependencies=[Depends(authenticate)], responses=errors_documented)
    return app


def share_services(app: FastAPI, services: Services) -> None:
    """A mounted application has state of its own: it is handed the parent's services at startup."""
    app.state.services = services
