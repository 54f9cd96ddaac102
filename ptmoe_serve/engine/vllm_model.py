"""The routing step inside vLLM's worker: the base model wrapped as a multimodal model whose
one "modality" is a PT-MoE soft prompt.

A request carries its prompt's token ids and a small routing key (adapter shape, slot, name
and version): the input processor puts T placeholder positions before the prompt and hashes the key
with the prompt, and the worker computes the soft prompts of all requests of a step in one
`embed_multimodal` call, from banks of adapters it holds on the engine's device. Only token ids
and keys cross process boundaries; adapters reach the workers through `collective_rpc`
(`PtMoeWorkerExtension`), many per call (`pack_adapters`), each tensor-parallel rank holding
the whole bank (an adapter is tens of kilobytes; the routing step reads the full embedding
rows, which vLLM's embedding layer gathers across ranks)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.inputs import MultiModalInput, mm_input
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems, PlaceholderRange
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor,
                                        BaseProcessingInfo, ProcessorInputs, TimingContext)

from ptmoe_serve.adapters.bank import AdapterBank, BankShape, bank_rows
from ptmoe_serve.adapters.registry import AdapterEntry
from ptmoe_serve.routing.step import route_step

MODALITY = "ptmoe"
ARCHITECTURE = "PtMoeLlamaForCausalLM"
# hf_config attribute (set through hf_overrides) bounding T, for vLLM's encoder budget.
MAX_PROMPT_LENGTH = "ptmoe_max_prompt_length"
# An adapter's fields as the worker receives them (a row of ints), in this order.
KEY_FIELDS = ("num_experts", "prompt_length", "rank", "slot")


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version as a request names it to the workers: its bank's shape and its
    slot there, and its name and store version, which key vLLM's prefix and encoder caches.
    The wire format, defined once: a key (the request's multimodal data) and, inside the
    worker, a row of KEY_FIELDS."""

    shape: BankShape
    slot: int
    name: str
    version: int

    def to_key(self, route_tokens: int, experts: list[int] | None = None) -> dict:
        """The request's key; the router reads the prompt's first `route_tokens` tokens, or,
        where the API process already knows which `experts` it keeps (an adapter whose
        `router_scaling` is "none"), they stand for those tokens."""
        return {**self._row_fields(), "name": self.name, "version": self.version,
                "route_tokens": route_tokens, "experts": experts}

    def _row_fields(self) -> dict[str, int]:
        return {"num_experts": self.shape.num_experts, "prompt_length": self.shape.prompt_length,
                "rank": self.shape.rank, "slot": self.slot}

    @staticmethod
    def from_key(key: dict) -> AdapterRef:
        return AdapterRef(BankShape(key["num_experts"], key["prompt_length"], key["rank"]),
                          key["slot"], key["name"], key["version"])

    def row(self) -> list[int]:
        fields = self._row_fields()
        return [fields[field] for field in KEY_FIELDS]

    @staticmethod
    def target(row: list[int], banks: dict[BankShape, AdapterBank]
               ) -> tuple[AdapterBank | None, BankShape, int]:
        """A row as the routing step's target: the worker's bank of that shape, if any."""
        n, t, r, slot = row
        shape = BankShape(n, t, r)
        return banks.get(shape), shape, slot


class _RoutingKeys(ModalityDataItems[dict, dict]):
    """One routing key per prompt."""

    def __init__(self, data: dict):
        super().__init__(data, MODALITY)

    def get_count(self) -> int:
        return 1

    def get(self, index: int) -> dict:
        return self.data

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return {}


class _Parser(MultiModalDataParser):
    def _get_subparsers(self):
        return {MODALITY: _RoutingKeys}


class PtMoeProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return _Parser()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]):
        return {MODALITY: getattr(self.get_hf_config(), MAX_PROMPT_LENGTH)}


class PtMoeDummyInputs(BaseDummyInputsBuilder[PtMoeProcessingInfo]):
    """Profiling runs the largest soft prompt, from no adapter (slot -1 routes to zeros)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        length = getattr(self.info.get_hf_config(), MAX_PROMPT_LENGTH)
        return {MODALITY: AdapterRef(BankShape(1, length, 1), -1, "profile", 0).to_key(0)}


class PtMoeProcessor(BaseMultiModalProcessor[PtMoeProcessingInfo]):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {name: MultiModalFieldConfig.batched(MODALITY, keep_on_cpu=True)
                for name in ("ptmoe_key", "ptmoe_prompt_ids", "ptmoe_experts")}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        return []

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        key = inputs.mm_data_items[MODALITY].get(0)
        ref = AdapterRef.from_key(key)
        prompt = list(inputs.prompt)
        experts = key.get("experts")
        # The router's input: the routed prompt tokens, or none where the experts are given.
        routed = prompt[: key["route_tokens"]] if experts is None else []
        length = ref.shape.prompt_length
        fields = BatchFeature({
            "ptmoe_key": torch.tensor([ref.row()]),
            "ptmoe_prompt_ids": torch.tensor([routed or [0]]),
            "ptmoe_experts": torch.tensor([[-1] if experts is None else experts]),
        })
        kwargs = MultiModalKwargsItems.from_hf_inputs(fields, self._get_mm_fields_config(fields, {}))
        # The soft prompt is fixed by the adapter's name and version and the routed prompt
        # tokens (or the kept experts that stand for them), and by nothing else: they key
        # vLLM's encoder and prefix caches, so that a replaced adapter never answers from the
        # cache, and an adapter evicted and read back into another slot keeps its cached
        # prefixes. Prompts with the same key share the soft prompt and its KV blocks (vLLM's
        # block hashes chain the tokens after it): under "none" scaling, every prompt whose
        # router keeps the same experts.
        fixed_by = (f"experts:{','.join(map(str, experts))}".encode() if experts is not None
                    else torch.tensor(routed, dtype=torch.int64).numpy().tobytes())
        digest = hashlib.sha256(f"{ref.name}@{ref.version}|".encode() + fixed_by).hexdigest()
        return mm_input(prompt_token_ids=[0] * length + prompt, mm_kwargs=kwargs,
                        mm_hashes={MODALITY: [digest]},
                        mm_placeholders={MODALITY: [PlaceholderRange(offset=0, length=length)]})


@MULTIMODAL_REGISTRY.register_processor(PtMoeProcessor, info=PtMoeProcessingInfo,
                                        dummy_inputs=PtMoeDummyInputs)
class PtMoeLlamaForCausalLM(LlamaForCausalLM, SupportsMultiModal):
    """A Llama-architecture model whose requests may start with a PT-MoE soft prompt."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.ptmoe_banks: dict[BankShape, AdapterBank] = {}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None

    def ptmoe_write(self, shape: BankShape, slots: torch.Tensor, rows: dict[str, torch.Tensor],
                    capacity: int) -> None:
        bank = self.ptmoe_banks.get(shape)
        if bank is None:
            device = self.model.embed_tokens.weight.device
            bank = self.ptmoe_banks[shape] = AdapterBank(shape, self.config.hidden_size, device)
        bank.write_rows(slots, rows, capacity)

    @torch.inference_mode()
    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        # Batched fields arrive stacked when all items have one shape, else as lists.
        keys = [k.tolist() for k in kwargs["ptmoe_key"]]
        prompts = list(kwargs["ptmoe_prompt_ids"])
        experts = [e.tolist() for e in kwargs["ptmoe_experts"]]
        weight = self.model.embed_tokens.weight
        # The fused kernels read embedding rows from the table itself: the whole table, so
        # on one rank only; across ranks vLLM's embedding layer gathers the rows.
        fused = weight.is_cuda and get_tensor_model_parallel_world_size() == 1
        return route_keys(self.ptmoe_banks, keys, prompts, self.config.hidden_size,
                          self.embed_input_ids, weight if fused else None, weight.dtype,
                          experts)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        # Llama's own comes first in the method order and knows nothing of soft prompts.
        return SupportsMultiModal.embed_input_ids(self, input_ids, multimodal_embeddings,
                                                  is_multimodal=is_multimodal)


def route_keys(banks: dict[BankShape, AdapterBank], keys: list[list[int]],
               prompts: list[torch.Tensor], hidden_size: int,
               embed: Callable[[torch.Tensor], torch.Tensor],
               table: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
               experts: list[list[int]] | None = None) -> list[torch.Tensor]:
    """The routing step over a worker's banks, for requests as the worker receives them
    (rows of KEY_FIELDS; each request's kept experts, or [-1] to route on its prompt)."""
    kept = [None if e == [-1] else e for e in experts] if experts else None
    return route_step([AdapterRef.target(row, banks) for row in keys], prompts, hidden_size,
                      embed, table, dtype, kept)


def pack_adapters(entries: Sequence[AdapterEntry]
                  ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """Entries as the workers receive them: for each bank, its shape and capacity
    [N, T, R, capacity], and its slots and stacked rows as tensors named
    "<bank index>.<field>", for one safetensors file or blob (what crosses vLLM's messaging
    unchanged: its serializer cannot carry these tensors)."""
    by_bank: dict[AdapterBank, list[AdapterEntry]] = {}
    for entry in entries:
        by_bank.setdefault(entry.bank, []).append(entry)
    banks, tensors = [], {}
    for i, (bank, members) in enumerate(by_bank.items()):
        banks.append([bank.shape.num_experts, bank.shape.prompt_length, bank.shape.rank,
                      bank.capacity])
        tensors[f"{i}.slots"] = torch.tensor([e.slot for e in members])
        for field, rows in bank_rows([e.adapter for e in members]).items():
            tensors[f"{i}.{field}"] = rows.contiguous()
    return banks, tensors


def read_packed(tensors: bytes | str) -> dict[str, torch.Tensor]:
    """`pack_adapters`' tensors from safetensors bytes, or from a safetensors file's path."""
    if isinstance(tensors, bytes):
        return safetensors.torch.load(tensors)
    return safetensors.torch.load_file(tensors)


def unpack_adapters(banks: list[list[int]], tensors: dict[str, torch.Tensor]
                    ) -> Iterator[tuple[BankShape, torch.Tensor, dict[str, torch.Tensor], int]]:
    """`pack_adapters`' output as (shape, slots, rows, capacity), one per bank."""
    for i, (n, t, r, capacity) in enumerate(banks):
        rows = {field.split(".", 1)[1]: tensor for field, tensor in tensors.items()
                if field.startswith(f"{i}.") and field != f"{i}.slots"}
        yield BankShape(n, t, r), tensors[f"{i}.slots"], rows, capacity


class PtMoeWorkerExtension:
    """Methods vLLM mixes into its workers, called through `collective_rpc`."""

    def ptmoe_write(self, banks: list[list[int]], tensors: bytes | str) -> None:
        """Write adapters into this worker's banks: `pack_adapters`' output, its tensors in
        safetensors bytes or a file of them."""
        model = self.get_model()
        for shape, slots, rows, capacity in unpack_adapters(banks, read_packed(tensors)):
            model.ptmoe_write(shape, slots, rows, capacity)

    def ptmoe_drop(self, shape: list[int]) -> None:
        """Free the bank of this shape (num_experts, prompt_length, rank): its last adapter
        went, and no request reads it."""
        self.get_model().ptmoe_banks.pop(BankShape(*shape), None)


def supports(model_dir: Path) -> bool:
    """Whether the in-engine route can wrap this model's architecture."""
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("architectures") == ["LlamaForCausalLM"]


def engine_args(max_prompt_length: int) -> dict:
    """vLLM engine arguments that serve the base model through the wrapper class."""
    return {"hf_overrides": {"architectures": [ARCHITECTURE],
                             MAX_PROMPT_LENGTH: max_prompt_length},
            "limit_mm_per_prompt": {MODALITY: 1},
            "worker_extension_cls": f"{__name__}.PtMoeWorkerExtension"}


def register() -> None:
    """vLLM general plugin: makes the architecture known in every vLLM process."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:PtMoeLlamaForCausalLM")
