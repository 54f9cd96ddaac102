"""The parts of vLLM this project relies on that vLLM does not publish as an interface, each
named here: the launcher functions the server is assembled from (imported from here), the
methods of vLLM's serving objects, engine and multimodal processor that it wraps, replaces or
overrides, and the attributes it reads or sets on them.

Each was read in vLLM's source at VERIFIED_VERSION. tests/engine/test_vllm_internals.py checks
every one against the installed vLLM (a callable's parameters, the attributes a class's own code
sets) and fails naming the version and the object that moved, so that an upgrade meets them all
at once instead of one failure at a time."""

from __future__ import annotations

from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.api_server.entry import (
    build_async_engine_client_from_engine_args)
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.launcher import serve_http, setup_server

VERIFIED_VERSION = "0.32.0"

# Callables, by where they are defined: their parameters as the test writes them (a trailing
# "=" for a default; "*" before keyword-only ones).
CALLABLES = {
    # The server's assembly (api/server.py), as `vllm serve` assembles its own.
    "vllm.entrypoints.launchers.api_server.app_state.init_app_state":
        "engine_client, state, args, supported_tasks=",
    "vllm.entrypoints.launchers.api_server.entry.build_async_engine_client_from_engine_args":
        "engine_args, *, usage_context=, client_config=",
    "vllm.entrypoints.launchers.app.build_app":
        "args, supported_tasks=, model_config=",
    "vllm.entrypoints.launchers.launcher.serve_http":
        "app, sock, enable_ssl_refresh=, peer_loads=, **uvicorn_kwargs",
    "vllm.entrypoints.launchers.launcher.setup_server":
        "args, *, reuse_port",
    # Wrapped or replaced on each serving object (api/server.py).
    "vllm.entrypoints.serve.engine.serving.BaseServing._get_active_default_mm_loras":
        "self, request",
    "vllm.entrypoints.generate.beam_search.online.BeamSearchOnlineMixin.beam_search":
        "self, prompt, request_id, params, lora_request=, trace_headers=, session_id=",
    "vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion.create_completion":
        "self, request, raw_request=",
    # Wrapped on the app's one renderer (api/chat_scope.py): every endpoint's chats.
    "vllm.renderers.online_renderer.OnlineRenderer.preprocess_chat":
        "self, request, messages, default_template, default_template_content_format, "
        "default_template_kwargs, tool_dicts=, parser=, *, skip_mm_cache=",
    # vLLM's per-LoRA request accounting (engine/lora_stats.py) and the running count
    # (engine/engine.py).
    "vllm.v1.engine.output_processor.OutputProcessor.add_request":
        "self, request, prompt, parent_req=, request_index=, queue=",
    "vllm.v1.engine.output_processor.OutputProcessor.get_num_unfinished_requests":
        "self",
    # Overridden by the engine route's multimodal processor (engine/vllm_model.py).
    "vllm.multimodal.parse.MultiModalDataParser._get_subparsers":
        "self",
    "vllm.multimodal.processing.BaseMultiModalProcessor._get_mm_fields_config":
        "self, hf_inputs, hf_processor_mm_kwargs",
    "vllm.multimodal.processing.BaseMultiModalProcessor._get_prompt_updates":
        "self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs",
}

# Attributes read or set on instances, by the class whose own code sets them.
ATTRIBUTES = {
    # The serving objects on vLLM's app state (api/server.py); the model-name table.
    "starlette.datastructures.State": ("_state",),
    "vllm.entrypoints.openai.models.serving.OpenAIServingModels": ("lora_requests",),
    # vLLM's engine, its output processor and Prometheus logger (engine/lora_stats.py,
    # engine/engine.py).
    "vllm.v1.engine.async_llm.AsyncLLM": ("logger_manager", "output_processor"),
    "vllm.v1.engine.output_processor.OutputProcessor": ("request_states",),
    "vllm.v1.engine.EngineCoreRequest": ("external_req_id",),
    "vllm.v1.engine.output_processor.RequestState": ("lora_name",),
    "vllm.v1.metrics.loggers.PrometheusStatLogger": (
        "gauge_lora_info", "labelname_max_lora", "labelname_waiting_lora_adapters",
        "labelname_running_lora_adapters", "max_lora"),
}

__all__ = ["build_app", "build_async_engine_client_from_engine_args", "init_app_state",
           "serve_http", "setup_server", "CALLABLES", "ATTRIBUTES", "VERIFIED_VERSION"]
