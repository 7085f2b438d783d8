"""The web admin's JSON side under ``/api/v1/admin``, in the OpenAPI document: every admin
action the pages offer is also an endpoint here (phase by phase), calling the same service
functions. Authentication: an admin API token (``Authorization: Bearer prt_...``, from
`postroom admin token`) or the page session's cookie with ``X-CSRF-Token`` on any
state-changing request (web.auth.api_actor).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.ingress.http_models import ErrorBody
from postroom.web import auth, fence

admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="adminToken", bearerFormat="prt_ID_SECRET",
    description="An admin API token from `postroom admin token`: "
    "`Authorization: Bearer prt_...`. It acts with its account's role. The web admin's "
    "signed-in session (its cookie, with `X-CSRF-Token` on a change) is taken too.")
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No valid admin token or session."},
    403: {"model": ErrorBody, "description": "Role too low, missing X-CSRF-Token, or a "
          "client outside server.admin_networks."},
}


async def _declared(
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(admin_bearer)],
) -> None:
    """Not read (web.auth reads the header): declares the security scheme in OpenAPI."""


# Added to every /api/v1/admin router where web.app.install includes it (the bearer scheme
# in OpenAPI), so a new router cannot leave it out: none of them names it itself.
DEPENDENCIES = [Depends(_declared)]
router = APIRouter(prefix=fence.API, tags=["admin"], responses=ERRORS)


class Me(BaseModel):
    name: str = Field(description="The account's name.")
    role: Role = Field(description="admin: everything; viewer: read only.")
    kind: str = Field(description="How the request is signed in: admin (a session), sso "
                      "(a session opened by the single sign-on proxy) or token.")


@router.get("/me", summary="Who am I")
async def me(actor: Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]) -> Me:
    """The account the request acts as, and its role."""
    return Me(name=actor.name, role=actor.role, kind=actor.kind)
