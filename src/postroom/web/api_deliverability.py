"""``/api/v1/admin/deliverability``: the doctor's verdict for a sending domain (run in the
background, cached a few minutes: ask again while ``state`` is "checking"), and DKIM keys
(postroom.ops.deliverability)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.dkim import KeyInfo
from postroom.ops import deliverability as ops
from postroom.web import api, auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call

router = APIRouter(prefix=fence.API, tags=["admin"], responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]


class CheckOut(BaseModel):
    domain: str = Field(description="\"\": the domains the connections send from.")
    state: ops.State
    started_at: float
    report: dict[str, Any] | None = Field(description="The doctor's findings (as `postroom "
                                          "doctor --json`) once done.")
    records: list[dict[str, Any]] = Field(description="Each DNS record to publish, with its "
                                          "zone-file line.")
    error: str


class DkimIn(BaseModel):
    domain: str = Field(max_length=253)
    selector: str = Field(max_length=253)
    bits: int = Field(default=2048, ge=1024, le=4096)
    force: bool = Field(default=False, description="Replace an existing key of this "
                        "selector (its signatures stop verifying).")


class DkimOut(BaseModel):
    domain: str
    selector: str
    bits: int
    name: str = Field(description="Where to publish: SELECTOR._domainkey.DOMAIN.")
    type: str
    value: str
    strings: list[str] = Field(description="The value as DNS strings of at most 255 bytes.")
    zone: str = Field(description="The record in zone-file syntax.")


def dkim_out(info: KeyInfo) -> DkimOut:
    return DkimOut.model_validate(info.to_dict())


@router.get("/deliverability", summary="SPF, DKIM, DMARC and MX of a sending domain")
async def check(request: Request, actor: Viewer,
                domain: Annotated[str, Query(max_length=253)] = "",
                wait: Annotated[float, Query(ge=0, le=30)] = 0) -> CheckOut:
    """Starts the check (or returns the cached one); ``wait``: seconds to wait for it."""
    found = await call(ops.check, instance(request), actor, domain, wait=wait)
    return CheckOut(domain=found.domain, state=found.state, started_at=found.started_at,
                    report=found.report, records=found.records, error=found.error)


@router.get("/deliverability/dkim", summary="Stored DKIM keys and their records")
async def dkim_keys(request: Request, actor: Viewer) -> list[DkimOut]:
    return [dkim_out(k) for k in await call(ops.dkim_keys, instance(request), actor)]


@router.post("/deliverability/dkim", status_code=201, summary="Generate a DKIM key")
async def generate(request: Request, actor: Admin, body: DkimIn) -> DkimOut:
    """A new key, stored encrypted; the answer is the DNS record to publish."""
    return dkim_out(await call(ops.generate_dkim, instance(request), actor, body.domain,
                               body.selector, bits=body.bits, force=body.force))
