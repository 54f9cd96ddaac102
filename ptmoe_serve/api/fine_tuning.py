"""OpenAI's fine-tuning jobs API (`client.fine_tuning.jobs.*` of the `openai` package works as
it is): create, list, retrieve and cancel jobs, list their events and checkpoints. A job trains
a PT-MoE adapter of this server's base model on a file uploaded through /v1/files; the
fine-tuning worker (worker.py, a process of its own) runs it and writes the adapter into the
store, from which every server over the store serves it. Every route needs the admin key.

Besides OpenAI's fields, a job takes the adapter's own: num_experts, prompt_length, rank,
top_k, and task_text (the description its prompt is initialised from)."""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ptmoe_serve.adapters.format import MAX_EXPERTS, MAX_RANK
from ptmoe_serve.api.auth import require_admin
from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.train.files import FileNotFound
from ptmoe_serve.train.jobs import FineTuningJobs, JobNotFound
from ptmoe_serve.train.worker import MAX_EPOCHS

router = APIRouter(prefix="/v1/fine_tuning/jobs", dependencies=[Depends(require_admin)])
MAX_LIST_LIMIT = 1000
MAX_SOFT_PROMPT = 512


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"]
    supervised: Supervised | None = None


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    # The adapter's own.
    num_experts: Annotated[int, Field(ge=1, le=MAX_EXPERTS)] = 2
    prompt_length: Annotated[int, Field(ge=1, le=MAX_SOFT_PROMPT)] = 16
    rank: Annotated[int, Field(ge=1, le=MAX_RANK)] = 16
    top_k: Annotated[int, Field(ge=1, le=MAX_EXPERTS)] = 1
    task_text: Annotated[str, StringConstraints(max_length=4000)] | None = None


def _jobs(request: Request) -> FineTuningJobs:
    return request.app.state.services.jobs


def _get(jobs: FineTuningJobs, job_id: str) -> dict:
    try:
        return jobs.get(job_id)
    except JobNotFound:
        raise RequestError(404, f"No fine-tuning job found with id {job_id}",
                           code="job_not_found", param="fine_tuning_job_id") from None


def _shown(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "created_ns"}


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page over newest-first `items`."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


@router.post("")
async def create_job(body: CreateJob, request: Request) -> dict:
    services = request.app.state.services
    base = services.settings.engine.served_model_name
    if body.model != base:
        raise RequestError(400, f"model {body.model!r} is not this server's base model; "
                                f"fine-tuning trains adapters of {base!r}", param="model")
    if body.top_k > body.num_experts:
        raise RequestError(400, f"top_k {body.top_k} is more than num_experts "
                                f"{body.num_experts}", param="top_k")
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        try:
            if file_id is not None:
                services.files.get(file_id)
        except FileNotFound:
            raise RequestError(400, f"invalid {param}: {file_id} does not exist",
                               code="invalid_file", param=param) from None
    hyperparameters = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        hyperparameters = body.method.supervised.hyperparameters or hyperparameters
    hyperparameters = (hyperparameters or Hyperparameters()).model_dump()
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    record = _jobs(request).create({
        "model": base, "training_file": body.training_file,
        "validation_file": body.validation_file, "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "seed": seed, "suffix": body.suffix, "metadata": body.metadata,
        "adapter": {"num_experts": body.num_experts, "prompt_length": body.prompt_length,
                    "rank": body.rank, "top_k": body.top_k, "task_text": body.task_text}})
    return _shown(record)


@router.get("")
async def list_jobs(request: Request, after: str | None = None,
                    limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    jobs = [_shown(job) for job in reversed(_jobs(request).list())]
    return _page(jobs, after, limit)


@router.get("/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> dict:
    return _shown(_get(_jobs(request), job_id))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    jobs = _jobs(request)
    _get(jobs, job_id)
    return _shown(jobs.cancel(job_id))


@router.get("/{job_id}/events")
async def list_events(job_id: str, request: Request, after: str | None = None,
                      limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    return _job_page(request, job_id, FineTuningJobs.events, after, limit)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, after: str | None = None,
                           limit: int = Query(10, ge=1, le=MAX_LIST_LIMIT)) -> dict:
    return _job_page(request, job_id, FineTuningJobs.checkpoints, after, limit)


def _job_page(request: Request, job_id: str, read, after: str | None, limit: int) -> dict:
    """A page of a job's events or checkpoints, newest first."""
    jobs = _jobs(request)
    _get(jobs, job_id)
    return _page(list(reversed(read(jobs, job_id))), after, limit)
