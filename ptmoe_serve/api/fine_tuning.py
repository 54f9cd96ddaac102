"""OpenAI's fine-tuning jobs API (`client.fine_tuning.jobs.*` of the `openai` package works as it
is): create, list, retrieve, cancel, pause and resume jobs, list their events and checkpoints.
A job trains a PT-MoE adapter of this server's base model on a file uploaded through /v1/files;
the fine-tuning worker (train/worker.py, a process of its own) runs it and writes the adapter
into the store, from which every server over the store serves it. Every route needs the admin
key.

Besides OpenAI's fields, a job takes the adapter's own (train/spec.py). A job is refused
before any training when this server could not serve what it would train.

A job this server shows `succeeded`, and a checkpoint it lists, can be called at once: the
worker writes a model into the store before it records it, and each route here reads the jobs
first and then brings this server up to date with the store (a look at the store's journal), so
nothing it shows names a model it does not serve. Other servers over the store serve it within
their --watch-interval.

Every route reads and writes the store on the store's own threads, with its lock waits bounded
(--store-lock-timeout), never on the event loop. A creation that sends an `Idempotency-Key`
gets the job that key made before, if any: a retried request makes one job."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ptmoe_serve.adapters.config import AdapterError, problems
from ptmoe_serve.adapters.registry import AdapterNotFound
from ptmoe_serve.api.auth import require_admin
from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.api.paging import cursor_page, list_page
from ptmoe_serve.train.files import FileNotFound
from ptmoe_serve.train.jobs import FineTuningJobs, JobNotFound, JobStateError, shown
from ptmoe_serve.train.spec import Hyperparameters, JobAdapter

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fine_tuning/jobs", dependencies=[Depends(require_admin)])
MAX_LIST_LIMIT = 1000
MAX_IDEMPOTENCY_KEY_CHARS = 255


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


async def _in_store(request: Request, work, *args):
    """`work(*args)` on the store's threads, its refusals as the API's answers."""
    try:
        return await request.app.state.services.manager.store.call(work, *args)
    except JobNotFound as e:
        raise RequestError(404, f"No fine-tuning job found with id {e.args[0]}",
                           code="job_not_found", param="fine_tuning_job_id") from None
    except JobStateError as e:
        raise RequestError(400, str(e), code="invalid_job_state",
                           param="fine_tuning_job_id") from None


async def _served(request: Request, shown_now):
    """`shown_now`, read from the store, once this server serves every model it may name."""
    try:
        await request.app.state.services.manager.sync_store()
    except Exception:  # the watcher tries again; what was read still stands
        logger.exception("cannot follow the adapter store")
    return shown_now


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
async def create_job(body: CreateJob, request: Request,
                     idempotency_key: Annotated[str | None, Header(
                         max_length=MAX_IDEMPOTENCY_KEY_CHARS)] = None) -> dict:
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
                await _in_store(request, request.app.state.files.get, file_id)
        except FileNotFound:
            raise RequestError(400, f"invalid {param}: {file_id} does not exist",
                               code="invalid_file", param=param) from None
    hyperparameters = body.resolved_hyperparameters().model_dump()
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    record = await _in_store(request, _jobs(request).create, {
        "model": base, "training_file": body.training_file,
        "validation_file": body.validation_file, "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "seed": seed, "suffix": body.suffix, "metadata": body.metadata,
        "adapter": adapter.model_dump()}, idempotency_key)
    return shown(record)


@router.get("")
async def list_jobs(request: Request, after: str | None = None,
                    limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    jobs, more = await _in_store(request, _jobs(request).page, after, limit)
    return await _served(request, list_page([shown(job) for job in jobs], more))


@router.get("/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> dict:
    return await _served(request, shown(await _in_store(request, _jobs(request).get, job_id)))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    jobs = _jobs(request)
    record = await _in_store(request, jobs.cancel, job_id)
    if record["status"] == "cancelled":  # no worker ran it: nothing of it may stay
        manager = request.app.state.services.manager
        for model in await _in_store(request, jobs.forget_checkpoints, job_id):
            try:
                await manager.unload(model, purge=True)
            except AdapterNotFound:  # in the store, not yet followed here
                await manager.store.call(manager.store.record_unloaded, model, model)
    return await _served(request, shown(record))


@router.post("/{job_id}/pause")
async def pause_job(job_id: str, request: Request) -> dict:
    """A queued or running job stops after its step in progress and keeps its checkpoint."""
    return shown(await _in_store(request, _jobs(request).pause, job_id))


@router.post("/{job_id}/resume")
async def resume_job(job_id: str, request: Request) -> dict:
    """A paused job goes back to the queue and continues from its last checkpoint."""
    return shown(await _in_store(request, _jobs(request).resume, job_id))


@router.get("/{job_id}/events")
async def list_events(job_id: str, request: Request, after: str | None = None,
                      limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    """Newest first, read from the end of the job's events."""
    events, more = await _in_store(request, _jobs(request).events_page, job_id, after, limit)
    return await _served(request, list_page(events, more))


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, after: str | None = None,
                           limit: int = Query(10, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    """Newest first (a job keeps its last three)."""
    checkpoints = await _in_store(request, _jobs(request).checkpoints, job_id)
    return await _served(request, cursor_page(list(reversed(checkpoints)), after, limit))
