"""The fine-tuning worker: runs the store's fine-tuning jobs, oldest first, one at a time.

For each job it validates the files (a job whose file it cannot use fails at validating_files,
with an error that names the line and the problem), trains a PT-MoE adapter on the frozen base
model (the trainer of `ptmoe-serve train`, resumable from its checkpoint), and writes the
result into the store as an ordinary adapter folder, which every server over the store then
serves like any other. It runs as a process of its own, never in the API process or vLLM's
engine.

A worker that dies (the kernel's OOM killer takes it first: it asks to be) is started again by
its supervisor, and the job it ran resumes from its last checkpoint; a job whose worker died
MAX_INTERRUPTED_RUNS times in a row fails, saying so. A full disk pauses the job, with an event
naming the cause, until it is resumed."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pydantic import ValidationError

from ptmoe_serve.adapters.config import MAX_NAME_LENGTH, problems
from ptmoe_serve.adapters.format import PtMoeAdapter, adapter_files, read_adapter
from ptmoe_serve.adapters.store import AdapterStore
from ptmoe_serve.disk import StoreError, StoreFull, classify
from ptmoe_serve.train.data import BadExample, Example, read_examples
from ptmoe_serve.train.files import FileNotFound, TrainingFiles
from ptmoe_serve.train.jobs import CHECKPOINTS, FINAL, FineTuningJobs
from ptmoe_serve.train.spec import (BASE_LEARNING_RATE, DEFAULT_TASK_TEXT, Hyperparameters,
                                    JobAdapter, TrainSettings)
from ptmoe_serve.train.trainer import CHECKPOINT, Progress, TrainingStopped, train

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 50_000
MAX_EXAMPLE_TOKENS = 4096
VALIDATE_EVERY_SECONDS = 2.0
MAX_VALIDATION_EXAMPLES = 256  # the validation metrics read the file's first ones
KEPT_CHECKPOINTS = 3  # a job's last ones (OpenAI's rule): one per epoch, the model the last
MAX_INTERRUPTED_RUNS = 3  # runs of a job in a row whose worker died: then the job fails
CHECKPOINT_NAME = re.compile(r"-([0-9a-f]{12})-ckpt-step-\d+$")


class InvalidJob(ValueError):
    """A job this worker cannot run, for a reason in its files or its record; `param` names the
    job's field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def adapter_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's `ft:<base>:<suffix>:<id>`, in the letters adapter names allow."""
    parts = ["ft", base, suffix or "", job_id.removeprefix("ftjob-")[-12:]]
    name = "-".join(re.sub(r"[^A-Za-z0-9._-]", "-", p) for p in parts if p)
    return re.sub(r"\.\.+", ".", name)[-MAX_NAME_LENGTH:].lstrip("-._")


class FineTuningWorker:
    def __init__(self, store_root: Path, model_dir: Path, base_name: str,
                 stop: Callable[[], bool] = lambda: False, device: str = "cpu"):
        """`stop()`: whether this worker should stop (a job it runs stops after its step and
        stays running, to resume from its checkpoint); `device`: where it trains."""
        from transformers import AutoConfig, AutoTokenizer

        self.stop, self.device = stop, device
        self.store_root = store_root
        # One for the worker's life: it reads the store's journal once, then only what is new.
        self.store = AdapterStore(store_root)
        self.model_dir = model_dir
        self.base_name = base_name
        self.jobs = FineTuningJobs(store_root)
        self.files = TrainingFiles(store_root)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.max_example_tokens = min(MAX_EXAMPLE_TOKENS,
                                      getattr(config, "max_position_embeddings", 1 << 30))

    def run_forever(self, poll_seconds: float = 2.0) -> None:
        try:
            self.remove_orphans()
        except (OSError, StoreError):
            logger.exception("fine-tuning worker: could not remove what crashed writers left")
        while not self.stop():
            try:
                worked = self.run_once()
            except Exception:  # a job's failure is recorded on it; this is anything else
                logger.exception("fine-tuning worker: trying again in %.0f s", poll_seconds)
                worked = False
            if not worked:
                time.sleep(poll_seconds)

    def remove_orphans(self) -> None:
        """What workers that died left: temporary files, jobs never made whole, and checkpoint
        adapters of ended jobs that their records do not keep (a worker killed between writing
        one and recording it, or a job cancelled while none ran)."""
        self.jobs.remove_orphans()
        self.jobs.mark_active()
        try:
            names = [entry.name for entry in os.scandir(self.store_root)
                     if "-ckpt-step-" in entry.name]
        except FileNotFoundError:
            return
        for name in names:
            match = CHECKPOINT_NAME.search(name)
            job = self.jobs.ending_with(match.group(1)) if match else None
            if job is None or job["status"] not in FINAL:
                continue
            kept = {c["fine_tuned_model_checkpoint"] for c in self.jobs.checkpoints(job["id"])}
            if name not in kept and name != job.get("fine_tuned_model"):
                logger.warning("removing %s, a checkpoint adapter its job %s does not keep",
                               name, job["id"])
                self.store.record_unloaded(name, purge=name)

    def run_once(self) -> bool:
        """Validate every job waiting for it, then run the oldest job ready to run (or resume
        one whose worker died); whether there was anything to do."""
        worked = self._validate_waiting()
        for job in self.jobs.active():
            if job["status"] in ("queued", "running"):
                with self.jobs.claimed(job["id"]) as mine:
                    if mine:
                        self._run(self.jobs.get(job["id"]))
                        return True
        return worked

    # -- validating --------------------------------------------------------------------------

    def _validate_waiting(self) -> bool:
        """Validate the jobs waiting for it (also between training steps, so that a job
        created meanwhile shows queued, or failed, while another trains)."""
        worked = False
        for job in self.jobs.active():
            if job["status"] == "validating_files":
                with self.jobs.claimed(job["id"]) as mine:
                    if mine:
                        self._validate(job)
                        worked = True
        return worked

    def _validate(self, job: dict) -> None:
        job_id = job["id"]
        if self.jobs.cancel_requested(job_id):
            self.jobs.finish(job_id, "cancelled")
            return
        try:
            examples = self._examples(job["training_file"], "training_file")
            if job.get("validation_file"):
                self._examples(job["validation_file"], "validation_file")
            hyperparameters = self._spec(Hyperparameters, job, "hyperparameters").resolved(
                len(examples)).model_dump()
            self._spec(JobAdapter, job, "adapter")
        except InvalidJob as e:
            self.jobs.finish(job_id, "failed", error={
                "code": f"invalid_{e.param}", "message": str(e), "param": e.param})
            return
        self.jobs.update(job_id, lambda record: record.update(
            status="queued", hyperparameters=hyperparameters))
        self.jobs.add_event(job_id, f"Validated {len(examples)} training examples; the job "
                                    "is queued")

    def _examples(self, file_id: str, param: str) -> list[Example]:
        try:
            path = self.files.content_path(self.files.get(file_id).id)
            examples = read_examples(path, self.tokenizer)
        except FileNotFound:
            raise InvalidJob(param, f"{param} {file_id} does not exist") from None
        except BadExample as e:
            raise InvalidJob(param, f"{param} {file_id}, {e}") from None
        if len(examples) > MAX_EXAMPLES:
            raise InvalidJob(param, f"{param} {file_id} holds {len(examples)} examples; the "
                                      f"limit is {MAX_EXAMPLES}")
        for number, example in enumerate(examples, start=1):
            tokens = len(example.prompt_ids) + len(example.answer_ids)
            if tokens > self.max_example_tokens:
                raise InvalidJob(param, f"{param} {file_id}, example {number}: {tokens} "
                                          f"tokens; the limit is {self.max_example_tokens}")
        return examples

    @staticmethod
    def _spec(model, job: dict, param: str):
        """The job record's `param` read with its model (train/spec.py): a record the API did
        not write may hold anything."""
        try:
            return model.model_validate(job.get(param) or {})
        except ValidationError as e:
            raise InvalidJob(param, problems(e)) from None

    # -- running -------------------------------------------------------------------------------

    def _run(self, job: dict) -> None:
        """Run a job the worker has claimed, to its end, a pause or this worker's stop."""
        job_id = job["id"]
        if self.jobs.cancel_requested(job_id):
            self._cancelled(job_id)
            return
        if self.jobs.pause_requested(job_id):
            self.jobs.paused(job_id, "The job was paused")
            return
        died = self.jobs.begin_run(job_id)
        if died >= MAX_INTERRUPTED_RUNS:
            self.jobs.finish(job_id, "failed", error={
                "code": "worker_died", "param": None,
                "message": f"the fine-tuning worker died {died} times in a row while running "
                           "this job (killed, or out of memory: see the server's log); a smaller "
                           "batch_size or prompt_length needs less memory"})
            return
        try:
            self._train(job)
        except TrainingStopped:
            if self.jobs.cancel_requested(job_id):
                self._cancelled(job_id)
            elif self.jobs.pause_requested(job_id):
                self.jobs.paused(job_id, "The job was paused: it continues from its last "
                                         "checkpoint when resumed")
            else:  # this worker stops; the job resumes from its checkpoint at the next
                self.jobs.add_event(job_id, "The fine-tuning worker stopped; the job resumes "
                                            "from its last checkpoint when one runs again")
                self.jobs.end_run(job_id)
        except (OSError, StoreError) as e:
            error = e if isinstance(e, StoreError) else classify(e, self.store_root)
            if not isinstance(error, StoreFull):
                self._failed(job_id, e)
                return
            logger.warning("fine-tuning job %s paused: %s", job_id, error)
            self.jobs.paused(job_id, f"The job was paused: {error}. Once there is space, "
                                     f"resume it (POST /v1/fine_tuning/jobs/{job_id}/resume); "
                                     "it continues from its last checkpoint",
                             level="error", requested=False)
        except Exception as e:  # the job fails, the worker goes on
            self._failed(job_id, e)

    def _failed(self, job_id: str, error: Exception) -> None:
        logger.error("fine-tuning job %s failed", job_id, exc_info=error)
        self.jobs.finish(job_id, "failed", error={
            "code": "training_failed", "message": f"{type(error).__name__}: {error}",
            "param": None})

    def _train(self, job: dict) -> None:
        job_id = job["id"]
        folder = self.jobs.job_folder(job_id) / CHECKPOINTS
        data = self.files.content_path(job["training_file"])
        adapter = JobAdapter.model_validate(job.get("adapter") or {})
        examples = read_examples(data, self.tokenizer, adapter.route_scope)
        validation = read_examples(self.files.content_path(job["validation_file"]),
                                   self.tokenizer, adapter.route_scope
                                   )[:MAX_VALIDATION_EXAMPLES] \
            if job.get("validation_file") else []
        hyperparameters = Hyperparameters.model_validate(job["hyperparameters"])
        epoch_steps = math.ceil(len(examples) / hyperparameters.batch_size)
        steps = hyperparameters.n_epochs * epoch_steps
        settings = TrainSettings(
            **adapter.model_dump(exclude={"task_text"}),
            model_dir=self.model_dir, base_name=self.base_name, data=data, output=folder,
            task_text=adapter.task_text or DEFAULT_TASK_TEXT, steps=steps,
            batch_size=hyperparameters.batch_size,
            lr=BASE_LEARNING_RATE * hyperparameters.learning_rate_multiplier,
            warmup_steps=max(1, steps // 10), seed=job["seed"],
            checkpoint_every=max(1, min(epoch_steps, steps // 10)), resume=True,
            device=self.device)
        for stale in folder.glob(".*.tmp"):  # a write a killed worker left: the claim is ours
            stale.unlink(missing_ok=True)
        resumed = (folder / CHECKPOINT).exists()
        self.jobs.update(job_id, lambda record: record.update(status="running"))
        self.jobs.add_event(job_id, "Fine-tuning job resumed from its last checkpoint"
                            if resumed else f"Fine-tuning job started: {steps} steps")
        name = adapter_name(self.base_name, job.get("suffix"), job_id)
        validated_at = [time.monotonic()]

        def on_step(progress: Progress) -> None:
            step = progress.step
            metrics = {"step": step, "total_steps": steps, "train_loss": progress.train_loss,
                       "train_mean_token_accuracy": progress.train_mean_token_accuracy}
            epoch_end = step % epoch_steps == 0
            if epoch_end and validation:
                metrics.update(progress.evaluate(validation))
            self.jobs.add_event(job_id, f"Step {step}/{steps}: training loss="
                                        f"{progress.train_loss:.4f}", data=metrics)
            if epoch_end and step < steps:  # the last step's checkpoint is the model itself
                self._add_checkpoint(job_id, f"{name}-ckpt-step-{step}", progress.adapter(),
                                     metrics)
            if time.monotonic() - validated_at[0] > VALIDATE_EVERY_SECONDS:
                self._validate_waiting()
                validated_at[0] = time.monotonic()

        on_gpu = self.device.startswith("cuda")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            train(settings, on_step=on_step,
                  should_stop=lambda: (self.jobs.cancel_requested(job_id)
                                       or self.jobs.pause_requested(job_id) or self.stop()))
        finally:
            if on_gpu:  # what serving may have back between jobs
                torch.cuda.empty_cache()
        if on_gpu:  # what to leave the worker beside vLLM (--gpu-memory-utilization)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.jobs.add_event(job_id, f"Peak GPU memory of training: {peak:.2f} GiB")
        last = next((e["data"] for e in self.jobs.newest_events(job_id) if e.get("data")),
                    {"step": steps})
        self._add_checkpoint(job_id, name, read_adapter(folder), last)
        trained = hyperparameters.n_epochs * sum(
            len(e.prompt_ids) + len(e.answer_ids) for e in examples)
        self.jobs.finish(job_id, "succeeded", fine_tuned_model=name, trained_tokens=trained)

    def _add_checkpoint(self, job_id: str, name: str, adapter: PtMoeAdapter,
                        metrics: dict) -> None:
        """Write `adapter` into the store as `name`, served like any other, and keep the job's
        last KEPT_CHECKPOINTS checkpoints (OpenAI's rule), removing older ones from the store."""
        self.store.write(name, *adapter_files(adapter))
        for old in self.jobs.add_checkpoint(job_id, name, metrics["step"], metrics,
                                            keep=KEPT_CHECKPOINTS):
            self.store.record_unloaded(old, purge=old)

    def _cancelled(self, job_id: str) -> None:
        for model in self.jobs.forget_checkpoints(job_id):
            self.store.record_unloaded(model, purge=model)
        self.jobs.finish(job_id, "cancelled")
