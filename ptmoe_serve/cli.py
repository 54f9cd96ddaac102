"""Command line -> one settings object -> constructors.

`ptmoe-serve serve` starts the server; `prepare-model` prepares the embedded default model;
`init-adapter` writes a format v1 adapter initialised from a task description;
`convert-peft` imports a PEFT prompt-tuning checkpoint; `train` and `eval` train adapters and
score them through a server; `make-tasks` generates the example tasks."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ptmoe_serve.base_model import (DEFAULT_MODEL_NAME, default_cache_dir,
                                    ensure_default_model)

# The fine-tuning worker's: the kernel's OOM killer takes it before the engine (at most 1000).
OOM_SCORE_ADJ = 1000


def _resolve_model(model: str, cache_dir: Path) -> tuple[Path, str]:
    """`default` is the embedded model; anything else is a local Hugging Face folder."""
    if model == "default":
        return ensure_default_model(cache_dir), DEFAULT_MODEL_NAME
    path = Path(model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a Hugging Face model folder (no config.json)")
    return path, path.name


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="a local Hugging Face model folder, or 'default' for the embedded "
                             f"{DEFAULT_MODEL_NAME} (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where the default model is prepared (default: %(default)s)")


def _serve_parser(sub) -> None:
    from ptmoe_serve.config import ServeOptions

    p = sub.add_parser(
        "serve", help="serve adapters over vLLM's OpenAI-compatible server", allow_abbrev=False,
        description="Serve PT-MoE adapters over vLLM's own OpenAI-compatible server. Every "
                    "option of vLLM's server (`vllm serve --help`: --max-model-len, --dtype, "
                    "--tensor-parallel-size, --enable-auto-tool-choice, --tool-call-parser, "
                    "--max-num-seqs, --shutdown-timeout, ...) is accepted beside these.")
    _add_model_args(p)
    _add_options(p, ServeOptions, ServeOptions.model_fields)


def _vllm_args(rest: list[str]) -> argparse.Namespace:
    """vLLM's own server options, parsed by vLLM's parser, with this project's defaults: a
    loopback bind, a 30 s drain on SIGTERM, no /docs (--no-disable-fastapi-docs turns it on).
    Everything else is vLLM's default, compiling the model on the CPU as on a GPU (run eagerly, the engine route fell to 0.90x of vLLM's
    own server on 2 CPU cores; see BENCHMARKS.md)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="ptmoe-serve serve"))
    parser.set_defaults(host="127.0.0.1", shutdown_timeout=30, disable_fastapi_docs=True)
    args = parser.parse_args(rest)
    for name in ("model_tag", "api_key"):
        if getattr(args, name, None):
            raise SystemExit(f"ptmoe-serve serve: give the model with --model and keys with "
                             f"--api-key before vLLM's options (got {name})")
    validate_parsed_serve_args(args)
    return args


def fine_tune_worker(args: argparse.Namespace) -> None:
    """Training shares the machine with serving: at a lower priority, on half the cores, and
    first in line for the kernel's OOM killer (its job resumes; a killed engine would stop
    serving). On SIGTERM, or when the server that started it has gone, it stops after the step
    in progress; its job resumes from its checkpoint when a worker runs again."""
    import signal

    import torch

    from ptmoe_serve.train.worker import FineTuningWorker

    model_dir, name = _resolve_model(args.model, args.cache_dir)
    os.nice(args.niceness)
    try:  # raising one's own score needs no privilege
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
    except OSError as e:
        logging.getLogger("ptmoe_serve").warning("fine-tuning worker: oom_score_adj not set: %s",
                                                 e)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    terminated = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    worker = FineTuningWorker(
        args.adapters.resolve(), model_dir, args.served_model_name or name,
        stop=lambda: bool(terminated) or (args.parent_pid is not None
                                          and os.getppid() != args.parent_pid),
        device=device)
    logging.getLogger("ptmoe_serve").info("fine-tuning worker over %s, training on %s",
                                          args.adapters, device)
    worker.run_forever()


def _add_options(parser: argparse.ArgumentParser, model, names) -> None:
    """Options for these fields of a pydantic model (config.py's ServeOptions, train/spec.py's
    models), whose defaults, bounds, choices and help are written there once."""
    from typing import Literal, get_args, get_origin

    groups = {}
    for name in names:
        field = model.model_fields[name]
        kind = field.annotation
        extra = field.json_schema_extra or {}
        flag = "--" + name.replace("_", "-")
        options = {"help": field.description or ""}
        if extra.get("metavar"):
            options["metavar"] = extra["metavar"]
        if field.is_required():
            options["required"] = True
        elif kind is not bool and field.default is not None and not extra.get("repeatable"):
            options["default"] = field.default
            options["help"] += " (default: %(default)s)"
        if get_origin(kind) is Literal:
            options["choices"] = list(get_args(kind))
        elif kind is bool:
            options["action"] = "store_false" if field.default else "store_true"
            if field.default:
                flag = "--no-" + flag[2:]
                options["dest"] = name
        elif get_origin(kind) is tuple:
            options["type"] = get_args(kind)[0]
            if extra.get("repeatable"):
                options.update(action="append", default=[])
            else:
                options.update(nargs="+", default=field.default)
        else:  # one type, or one type or None
            options["type"] = next(t for t in (get_args(kind) or (kind,)) if t is not type(None))
        group = extra.get("group")
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(group)
        (groups[group] if group else parser).add_argument(flag, **options)


def _spec(model, args: argparse.Namespace, **given):
    """The spec model from the parsed options; its refusal as a usage error."""
    from pydantic import ValidationError

    fields = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        return model(**fields, **given)
    except ValidationError as e:
        said = "; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}"
                         if err["loc"] else err["msg"] for err in e.errors())
        raise SystemExit(f"ptmoe-serve {args.command}: {said}") from None


def _init_parser(sub) -> None:
    from ptmoe_serve.train.spec import AdapterShape

    p = sub.add_parser("init-adapter", help="write an adapter initialised from a task "
                                            "description (the paper's SVD initialisation)")
    _add_model_args(p)
    p.add_argument("output", type=Path, help="adapter folder to write; its name is the adapter's")
    p.add_argument("--text", required=True, help="the task description")
    _add_options(p, AdapterShape, AdapterShape.model_fields)


def _train_parser(sub) -> None:
    from ptmoe_serve.train.spec import TrainSettings

    p = sub.add_parser("train", help="train a PT-MoE adapter on a frozen base model")
    _add_model_args(p)
    _add_options(p, TrainSettings,
                      [name for name in TrainSettings.model_fields
                       if name not in ("model_dir", "base_name")])


def train(args: argparse.Namespace) -> None:
    from ptmoe_serve.adapters.config import validate_name
    from ptmoe_serve.train.spec import TrainSettings
    from ptmoe_serve.train.trainer import train as run_training

    if args.method == "ptmoe":
        validate_name(args.output.name)
    model_dir, name = _resolve_model(args.model, args.cache_dir)
    summary = run_training(_spec(TrainSettings, args, model_dir=model_dir, base_name=name))
    print(f"wrote {args.output}: loss {summary['losses'][0]:.4f} -> {summary['losses'][-1]:.4f}")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a JSONL test set through a running server")
    p.add_argument("--data", type=Path, required=True,
                   help='JSONL: {"prompt", "answer"} or {"messages": [..., reference answer]}')
    p.add_argument("--model", action="append", required=True,
                   help="adapter or base model name (repeatable: one row each)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("PTMOE_API_KEY"))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, help="also write the results as JSON")


def evaluate(args: argparse.Namespace) -> None:
    import json

    from ptmoe_serve.train.evaluate import evaluate_models, format_table, read_records

    results = evaluate_models(args.url, args.model, read_records(args.data), args.max_tokens,
                              args.concurrency, args.api_key)
    print(format_table(results))
    if args.out:
        args.out.write_text(json.dumps({"data": str(args.data), "results": results}, indent=2))


def make_tasks(args: argparse.Namespace) -> None:
    from ptmoe_serve.train.tasks import TASKS, write_task

    for task in args.task or list(TASKS):
        write_task(task, args.out / task, args.train_size, args.test_size, args.seed)
        print(f"wrote {args.out / task}/train.jsonl ({args.train_size}) and test.jsonl "
              f"({args.test_size})")


def convert_peft(args: argparse.Namespace) -> None:
    from ptmoe_serve.adapters.config import validate_name
    from ptmoe_serve.adapters.format import write_adapter
    from ptmoe_serve.adapters.create import convert_prompt_tuning

    validate_name(args.output.name)
    write_adapter(convert_prompt_tuning(args.source), args.output)
    print(f"wrote {args.output}")


def _routing_in_engine(location: str, model_dir: Path) -> bool:
    from ptmoe_serve.engine.vllm_model import supports

    if location == "engine" and not supports(model_dir):
        raise SystemExit(f"--routing-location engine: {model_dir.name}'s architecture is not "
                         "one the in-engine route wraps (Llama); use --routing-location api")
    return location == "engine" or (location == "auto" and supports(model_dir))


def serve(args: argparse.Namespace, rest: list[str]) -> None:
    from ptmoe_serve.api.auth import AccessSetupError, access_policy, given_keys
    from ptmoe_serve.config import ServeOptions

    options = _spec(ServeOptions, args)
    try:
        keys = given_keys(options)  # before anything slow starts
    except AccessSetupError as e:
        raise SystemExit(f"ptmoe-serve serve: {e}") from None

    import torch

    from ptmoe_serve.api.server import serve as run_server
    from ptmoe_serve.config import CPU_KV_CACHE_GIB, EngineSettings, ServerSettings

    model_dir, name = _resolve_model(args.model, args.cache_dir)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # vLLM 0.32's CPU build cannot load the AOT-compiled model it saves ("'function' object
        # has no attribute 'finalize_loading'") and compiles again at every start; without
        # AOT, inductor's cache serves later starts (here: 2 minutes the first time, then 35 s).
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    vllm_args = _vllm_args(rest)
    try:
        access = access_policy(options, keys, vllm_args.host, args.cache_dir / "admin.key")
    except AccessSetupError as e:
        raise SystemExit(f"ptmoe-serve serve: {e}") from None
    vllm_args.model = str(model_dir)
    served_name = (vllm_args.served_model_name or [name])[0]
    vllm_args.served_model_name = [served_name]
    settings = ServerSettings(
        options=options,
        engine=EngineSettings(
            model_dir=str(model_dir),
            served_model_name=served_name,
            routing_in_engine=_routing_in_engine(options.routing_location, model_dir),
            max_soft_prompt_length=options.max_soft_prompt_length,
            kv_cache_gib=options.kv_cache_gib or (None if on_gpu else CPU_KV_CACHE_GIB)),
        adapters_dir=options.adapters.resolve(),
        routing_device=options.routing_device or ("cuda" if on_gpu else "cpu"),
        vllm_args=vllm_args)
    run_server(settings, access)


def init_adapter(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from ptmoe_serve.adapters.config import validate_name
    from ptmoe_serve.adapters.format import write_adapter
    from ptmoe_serve.adapters.create import fit_to_length, init_from_text
    from ptmoe_serve.base_model import load_input_embeddings
    from ptmoe_serve.train.spec import AdapterShape

    validate_name(args.output.name)
    shape = _spec(AdapterShape, args)
    model_dir, name = _resolve_model(args.model, args.cache_dir)
    table = load_input_embeddings(model_dir)
    ids = fit_to_length(AutoTokenizer.from_pretrained(model_dir).encode(args.text),
                        shape.prompt_length)
    config = shape.adapter_config(name, table.shape[1])
    write_adapter(init_from_text(table[torch.tensor(ids)], config), args.output)
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> None:
    from ptmoe_serve.config import ServeOptions

    parser = argparse.ArgumentParser(prog="ptmoe-serve", description="Serve PT-MoE prompt-tuned adapters over one frozen model on vLLM.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    prepare = sub.add_parser("prepare-model", help="prepare the embedded default model")
    prepare.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    _init_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    worker = sub.add_parser("fine-tune-worker", help="run the fine-tuning jobs of an adapter "
                                                     "store (on this machine or another)")
    _add_model_args(worker)
    worker.add_argument("--adapters", type=Path, required=True, help="the adapter store")
    worker.add_argument("--served-model-name", default=None,
                        help="the base model's name in the server (default: its folder's)")
    worker.add_argument("--niceness", type=int,
                        default=ServeOptions.model_fields["fine_tune_niceness"].default,
                        help="added to this process's niceness, so that serving on the same "
                             "machine goes first (default: %(default)s)")
    worker.add_argument("--threads", type=int, default=None,
                        help="torch threads for training (default: half the cores, at least "
                             "one)")
    worker.add_argument("--device", default=None,
                        help="where to train: cpu, cuda, cuda:1, ... (default: cuda if there "
                             "is one)")
    worker.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process has gone (serve sets it)")
    tasks = sub.add_parser("make-tasks", help="generate the example tasks' train and held-out "
                                              "splits (extractive QA, arithmetic, contact cards, home city)")
    tasks.add_argument("--out", type=Path, required=True, help="one folder per task goes here")
    tasks.add_argument("--task", action="append", help="only this task (repeatable)")
    tasks.add_argument("--train-size", type=int, default=2000)
    tasks.add_argument("--test-size", type=int, default=200)
    tasks.add_argument("--seed", type=int, default=0)
    convert = sub.add_parser("convert-peft", help="convert a PEFT prompt-tuning checkpoint "
                                                  "(PROMPT_TUNING) into an adapter of format v1")
    convert.add_argument("source", type=Path, help="the PEFT checkpoint folder")
    convert.add_argument("output", type=Path, help="adapter folder to write; its name is the "
                                                   "adapter's")
    # `serve` hands what it does not know to vLLM's parser.
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(args, rest)
    elif args.command == "prepare-model":
        print(ensure_default_model(args.cache_dir))
    elif args.command == "convert-peft":
        convert_peft(args)
    elif args.command == "train":
        train(args)
    elif args.command == "eval":
        evaluate(args)
    elif args.command == "make-tasks":
        make_tasks(args)
    elif args.command == "fine-tune-worker":
        fine_tune_worker(args)
    else:
        init_adapter(args)


if __name__ == "__main__":
    main()
