"""``/api/v1/admin/settings``: retention and the message policy (stored keys; what
postroom.toml or the environment sets is locked), and the configuration's export and
import (postroom.ops.settings)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.ops import settings as ops
from postroom.store.dbconfig import Origin
from postroom.web import api, auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call

router = APIRouter(prefix=fence.API, tags=["admin"], responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]
Section = Literal["retention", "policy"]  # ops.settings.SECTIONS
Values = Annotated[dict[str, Any], Body(description="The keys to store (by their "
                                        "postroom.toml names); a key left out goes back to "
                                        "its default. Keys the file sets are refused.")]


class SectionOut(BaseModel):
    values: dict[str, Any] = Field(description="Each key as in force now.")
    origins: dict[str, Origin] = Field(description="Where each key comes from: file and "
                                       "environment are locked here.")
    stored: dict[str, Any] = Field(description="The keys stored in the database.")


class ExportIn(BaseModel):
    passphrase: str | None = Field(default=None, max_length=1024, description="Encrypts "
                                   "the secrets (at least 12 characters).")
    without_secrets: bool = Field(default=False, description="Leave the secrets out "
                                  "instead; one of the two is required.")


class ImportIn(BaseModel):
    document: dict[str, Any] = Field(description="The export, as exported.")
    passphrase: str | None = Field(default=None, max_length=1024)
    without_secrets: bool = False


class AppCredentials(BaseModel):
    secret: str
    api_key: str


class ImportOut(BaseModel):
    imported: list[str]
    skipped: list[str] = Field(description="Each with its reason.")
    secrets: bool = Field(description="Whether secrets were imported.")
    apps: dict[str, AppCredentials] = Field(description="Each imported app's NEW "
                                            "credentials (shown this once).")


def section_out(view: ops.SectionView) -> SectionOut:
    return SectionOut(values=view.values, origins=view.origins, stored=view.stored)


@router.get("/settings/{section}", summary="Retention or policy settings")
async def get_section(request: Request, actor: Viewer, section: Section) -> SectionOut:
    return section_out(await call(ops.view, instance(request), actor, section))


@router.put("/settings/{section}", summary="Store retention or policy settings")
async def put_section(request: Request, actor: Admin, section: Section,
                      body: Values) -> SectionOut:
    return section_out(await call(ops.change, instance(request), actor, section, body))


@router.post("/settings/export", summary="Export the configuration")
async def export(request: Request, actor: Admin, body: ExportIn) -> dict[str, Any]:
    """The whole configuration; secrets encrypted with the passphrase, or left out."""
    return await call(ops.export, instance(request), actor, passphrase=body.passphrase,
                      without_secrets=body.without_secrets)


@router.post("/settings/import", summary="Import a configuration")
async def import_(request: Request, actor: Admin, body: ImportIn) -> ImportOut:
    import json

    inst = instance(request)
    report = await call(ops.import_, inst, actor, json.dumps(body.document),
                        passphrase=body.passphrase, without_secrets=body.without_secrets)
    return ImportOut(imported=report.imported, skipped=report.skipped, secrets=report.secrets,
                     apps={n: AppCredentials(secret=s, api_key=inst.apps.api_key(n, s))
                           for n, s in report.app_secrets.items()})
