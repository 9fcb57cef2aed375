"""The host's FastAPI app: tokendb's lifespan with the host's app, projects billed per charge.

uvicorn hostapp.main:app   (from examples/host_app, with DATABASE_URL set)
"""

from typing import Annotated
from uuid import UUID

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field
from tortoise.transactions import in_transaction

import tokendb
from hostapp.models import Project, ProjectCharge
from hostapp.settings import APPS
from tokendb.contrib.fastapi import (
    RequestSizeLimit,
    error_responses,
    exception_handlers,
    lifespan,
    require_api_key,
)

app = FastAPI(
    title="tokendb host app example",
    lifespan=lifespan(apps=APPS),
    exception_handlers=exception_handlers(),
    responses=error_responses(),
)
app.add_middleware(RequestSizeLimit)

Key = Annotated[tokendb.ApiKey, Depends(require_api_key("projects"))]


class NewProject(BaseModel):
    name: str = Field(pattern=r"^[^\x00]{1,100}$")


class NewCharge(BaseModel):
    tokens: int = Field(ge=1, le=1_000_000)


class ProjectOut(BaseModel):
    id: UUID
    name: str
    spent: int


class ChargeOut(BaseModel):
    project: ProjectOut
    balance: int


async def owned_project(project_id: UUID, key: tokendb.ApiKey) -> Project:
    project = await Project.get_or_none(id=project_id, owner_id=key.user_id)
    if project is None:  # another user's project is not found either
        raise tokendb.NotFound("project", project_id)
    return project


async def project_out(project: Project) -> ProjectOut:
    charges = await ProjectCharge.filter(project_id=project.id)
    return ProjectOut(id=project.id, name=project.name, spent=sum(c.tokens for c in charges))


@app.post("/projects", status_code=201)
async def create_project(body: NewProject, key: Key) -> ProjectOut:
    project = await Project.create(name=body.name, owner_id=key.user_id)
    return await project_out(project)


@app.get("/projects/{project_id}")
async def get_project(project_id: UUID, key: Key) -> ProjectOut:
    return await project_out(await owned_project(project_id, key))


@app.post("/projects/{project_id}/charges")
async def charge_project(project_id: UUID, body: NewCharge, key: Key) -> ChargeOut:
    project = await owned_project(project_id, key)
    # One transaction: the ledger row and the host's row commit together, or neither.
    async with in_transaction():
        row = await tokendb.charge(user=key.user_id, amount=body.tokens, description=project.name)
        await ProjectCharge.create(project=project, transaction_id=row.id, tokens=body.tokens)
    return ChargeOut(project=await project_out(project), balance=row.balance_after)
