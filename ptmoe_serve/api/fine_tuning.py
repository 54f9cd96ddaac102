"""OpenAI's fine-tuning jobs API (`client.fine_tuning.jobs.*` of the `openai` package works as it
is): create, list, retrieve and cancel jobs, list their events and checkpoints. A job trains a
PT-MoE adapter of this server's base model on a file uploaded through /v1/files; the fine-tuning
worker (train/worker.py, a process of its own) runs it and writes the adapter into the store,
from which every server over the store serves it. Every route needs the admin key.

Besides OpenAI's fields, a job takes the adapter's own (train/spec.py). A job is refused
before any training when this server could not serve what it would train.

A job this server shows `succeeded`, and a checkpoint it lists, can be called at once: the
worker writes a model into the store before it records it, and each route here reads the jobs
first and then brings this server up to date with the store (a look at the store's journal), so
nothing it shows names a model it does not serve. Other servers over the store serve it within
their --watch-interval."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ptmoe_serve.adapters.config import AdapterError, problems
from ptmoe_serve.api.auth import require_admin
from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.api.paging import cursor_page
from ptmoe_serve.train.files import FileNotFound
from ptmoe_serve.train.jobs import FineTuningJobs, JobNotFound
from ptmoe_serve.train.spec import Hyperparameters, JobAdapter

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fine_tuning/jobs", dependencies=[Depends(require_admin)])
MAX_LIST_LIMIT = 1000


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"]
    supervised: Supervised | None = None


class CreateJob(JobAdapter):
    """OpenAI's job request; the adapter's own fields (JobAdapter's) beside OpenAI's."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: Annotated[str, StringConstraints(max_length=64,
                                             pattern=r"^[A-Za-z0-9_.-]*$")] | None = None
    metadata: Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                             Annotated[str, StringConstraints(max_length=512)]],
                        Field(max_length=16)] | None = None
    integrations: Annotated[list, Field(max_length=0)] | None = None

    def adapter(self) -> JobAdapter:
        return JobAdapter(**self.model_dump(include=set(JobAdapter.model_fields)))

    def resolved_hyperparameters(self) -> Hyperparameters:
        """OpenAI's two places for them: `method.supervised` first, then the top level."""
        supervised = self.method.supervised if self.method is not None else None
        if supervised is not None and supervised.hyperparameters is not None:
            return supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def _jobs(request: Request) -> FineTuningJobs:
    return request.app.state.jobs


def _get(jobs: FineTuningJobs, job_id: str) -> dict:
    try:
        return jobs.get(job_id)
    except JobNotFound:
        raise RequestError(404, f"No fine-tuning job found with id {job_id}",
                           code="job_not_found", param="fine_tuning_job_id") from None


async def _served(request: Request, shown):
    """`shown`, read from the store, once this server serves every model it may name."""
    try:
        await request.app.state.services.manager.sync_store()
    except Exception:  # the watcher tries again; what was read still stands
        logger.exception("cannot follow the adapter store")
    return shown


def _shown(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "created_ns"}


def _check_servable(request: Request, adapter: JobAdapter) -> None:
    """A job trains only an adapter this server would serve: its limits are the job's."""
    services = request.app.state.services
    try:
        config = adapter.adapter_config(services.settings.engine.served_model_name,
                                        services.engine.hidden_size)
    except ValidationError as e:
        raise RequestError(400, f"this server would not serve the adapter the job asks for: "
                                f"{problems(e)}") from None
    try:
        services.registry.check_compatible(config)
    except AdapterError as e:
        raise RequestError(400, f"this server would not serve the adapter the job asks for: "
                                f"{e}", param=e.field) from None


@router.post("")
async def create_job(body: CreateJob, request: Request) -> dict:
    services = request.app.state.services
    base = services.settings.engine.served_model_name
    if body.model != base:
        raise RequestError(400, f"model {body.model!r} is not this server's base model; "
                                f"fine-tuning trains adapters of {base!r}", param="model")
    adapter = body.adapter()
    _check_servable(request, adapter)
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        try:
            if file_id is not None:
                request.app.state.files.get(file_id)
        except FileNotFound:
            raise RequestError(400, f"invalid {param}: {file_id} does not exist",
                               code="invalid_file", param=param) from None
    hyperparameters = body.resolved_hyperparameters().model_dump()
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    record = _jobs(request).create({
        "model": base, "training_file": body.training_file,
        "validation_file": body.validation_file, "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "seed": seed, "suffix": body.suffix, "metadata": body.metadata,
        "adapter": adapter.model_dump()})
    return _shown(record)


@router.get("")
async def list_jobs(request: Request, after: str | None = None,
                    limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    jobs = [_shown(job) for job in reversed(_jobs(request).list())]
    return await _served(request, cursor_page(jobs, after, limit))


@router.get("/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> dict:
    return await _served(request, _shown(_get(_jobs(request), job_id)))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    jobs = _jobs(request)
    _get(jobs, job_id)
    return await _served(request, _shown(jobs.cancel(job_id)))


@router.get("/{job_id}/events")
async def list_events(job_id: str, request: Request, after: str | None = None,
                      limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    return await _job_page(request, job_id, FineTuningJobs.events, after, limit)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, after: str | None = None,
                           limit: int = Query(10, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    return await _job_page(request, job_id, FineTuningJobs.checkpoints, after, limit)


async def _job_page(request: Request, job_id: str, read, after: str | None, limit: int) -> dict:
    """A page of a job's events or checkpoints, newest first."""
    jobs = _jobs(request)
    _get(jobs, job_id)
    return await _served(request, cursor_page(list(reversed(read(jobs, job_id))), after, limit))
