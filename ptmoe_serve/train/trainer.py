"""`ptmoe-serve train`: fit a PT-MoE prompt on a frozen causal LM and write format v1.

Initialisation from the task description (adapters/create.py), noisy top-k routing
(module.py), loss on the answer tokens only, AdamW with linear warmup then a constant rate,
gradient accumulation. Each step's batch and noise derive from (seed, step), so a run resumed
from its checkpoint follows the same trajectory as one that never stopped."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from ptmoe_serve.adapters.format import PtMoeAdapter, write_adapter
from ptmoe_serve.adapters.create import fit_to_length, init_from_text
from ptmoe_serve.disk import write_atomically
from ptmoe_serve.train.data import Example, load_examples
from ptmoe_serve.train.module import PtMoePrompt
from ptmoe_serve.train.spec import TrainSettings

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"


def batch_inputs(examples: list[Example], prompts: torch.Tensor, embed: torch.nn.Module):
    """Right-padded inputs_embeds [B, S, H], attention mask and labels (answer tokens only)."""
    t = prompts.shape[1]
    rows, labels = [], []
    for example, prompt in zip(examples, prompts):
        ids = torch.tensor(example.prompt_ids + example.answer_ids, device=prompts.device)
        rows.append(torch.cat([prompt, embed(ids)]))
        labels.append([-100] * (t + len(example.prompt_ids)) + example.answer_ids)
    length = max(len(r) for r in rows)
    hidden = rows[0].shape[1]
    inputs = torch.zeros(len(rows), length, hidden, device=prompts.device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=prompts.device)
    target = torch.full((len(rows), length), -100, dtype=torch.long, device=prompts.device)
    for i, (row, label) in enumerate(zip(rows, labels)):
        inputs[i, : len(row)] = row
        mask[i, : len(row)] = 1
        target[i, : len(label)] = torch.tensor(label, device=prompts.device)
    return inputs, mask, target


def _optimizer(module: torch.nn.Module, settings: TrainSettings):
    """AdamW over the trainable parameters; linear warmup, then a constant rate."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, settings.warmup_steps)))
    return optimizer, schedule


def answer_scores(model, embed, module: PtMoePrompt, examples: list[Example]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean loss on the answer tokens (the model's own loss, shifted); for each answer
    token, whether it is the model's most likely next token there, and its example's row.
    Logits are computed at the answer positions alone: the vocabulary projection of every
    prompt position is a fifth of a step's time, for nothing."""
    with torch.no_grad():
        device = embed.weight.device
        routed = [torch.tensor(e.prompt_ids[: e.route_tokens], device=device) for e in examples]
        means = torch.stack([embed(ids).float().mean(0) for ids in routed])
    inputs, mask, labels = batch_inputs(examples, module(means), embed)
    hidden = model.get_decoder()(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    answer = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][answer]).float()
    picked = logits.detach().argmax(-1) == targets[answer]
    return torch.nn.functional.cross_entropy(logits, targets[answer]), picked, \
        answer.nonzero()[:, 0]


class Progress:
    """What `on_step` is told after each step (`step`, `train_loss`,
    `train_mean_token_accuracy`), and what it may ask of the prompt as it stands."""

    def __init__(self, model, embed, module: PtMoePrompt, batch_size: int):
        self.model, self.embed, self.module, self.batch_size = model, embed, module, batch_size
        self.step, self.train_loss, self.train_mean_token_accuracy = 0, 0.0, 0.0

    def adapter(self) -> PtMoeAdapter:
        return self.module.to_adapter()

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> dict:
        """Loss and token accuracy over every answer token of `examples`, and the share of
        examples whose whole answer (its end included) is what greedy decoding writes:
        with every answer token the most likely one after the tokens before it, greedy
        decoding writes exactly the answer, so one forward pass tells."""
        was_training = self.module.training
        self.module.eval()  # no routing noise: the prompt as served
        loss = tokens = correct = exact = 0.0
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start:start + self.batch_size]
            batch_loss, picked, rows = answer_scores(self.model, self.embed, self.module, batch)
            loss += batch_loss.item() * len(picked)
            tokens, correct = tokens + len(picked), correct + picked.sum().item()
            wrong = torch.zeros(len(batch), device=rows.device).index_add_(
                0, rows, (~picked).float())
            exact += (wrong == 0).sum().item()
        self.module.train(was_training)
        return {"valid_loss": loss / tokens, "valid_mean_token_accuracy": correct / tokens,
                "valid_exact_match": exact / len(examples)}


class TrainingStopped(Exception):
    """`should_stop` said so (a cancelled job, a worker stopping): the last checkpoint stays,
    no adapter is written."""


def train(settings: TrainSettings, on_step: Callable[[Progress], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> dict:
    """`on_step(progress)` is told of each step done; `should_stop()` is asked before
    each."""
    if settings.method == "lora":
        return train_lora(settings)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    examples = load_examples(settings.data, tokenizer, settings.route_scope)
    model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    config = settings.adapter_config(settings.base_name, embed.weight.shape[1])
    text_ids = fit_to_length(tokenizer.encode(settings.task_text), settings.prompt_length)
    with torch.no_grad():
        module = PtMoePrompt(init_from_text(embed(torch.tensor(text_ids)), config),
                             settings.noise_std)
    model.to(settings.device)
    module.to(settings.device)
    optimizer, schedule = _optimizer(module, settings)

    settings.output.mkdir(parents=True, exist_ok=True)
    start = _load_checkpoint(settings.output, module, optimizer, schedule) if settings.resume else 0
    losses = []
    progress = Progress(model, embed, module, settings.batch_size)
    module.train()
    bar = tqdm(range(start, settings.steps), desc="train", initial=start, total=settings.steps)
    for step in bar:
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped before step {step + 1}")
        rng = random.Random(settings.seed * 1_000_003 + step)
        torch.manual_seed(settings.seed * 1_000_003 + step)
        optimizer.zero_grad()
        total, picked = 0.0, []
        for _ in range(settings.grad_accum):
            batch = [examples[rng.randrange(len(examples))] for _ in range(settings.batch_size)]
            loss, batch_picked, _ = answer_scores(model, embed, module, batch)
            (loss / settings.grad_accum).backward()
            total += loss.item() / settings.grad_accum
            picked.append(batch_picked)
        optimizer.step()
        schedule.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            _save_checkpoint(settings.output, module, optimizer, step + 1)
        if on_step is not None:
            progress.step, progress.train_loss = step + 1, total
            progress.train_mean_token_accuracy = torch.cat(picked).float().mean().item()
            on_step(progress)
    module.eval()
    write_adapter(module.to_adapter(), settings.output)
    summary = {"steps": settings.steps, "losses": losses, "settings": {
        k: str(v) for k, v in settings.model_dump().items()}}
    (settings.output / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_lora(settings: TrainSettings) -> dict:
    """The baseline the paper compares against: LoRA on the same data, steps and budget, of
    about the PT-MoE adapter's parameter count, saved by `peft` in its own format (which
    vLLM's multi-LoRA serves)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    examples = load_examples(settings.data, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32)
    hidden = base.config.hidden_size
    per_rank = sum(m.in_features + m.out_features for name, m in base.named_modules()
                   if name.split(".")[-1] in settings.lora_targets)
    ptmoe_parameters = settings.adapter_config(settings.base_name, hidden).num_parameters
    rank = settings.lora_rank or max(1, round(ptmoe_parameters / per_rank))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=list(settings.lora_targets)))
    embed = model.get_input_embeddings()
    optimizer, schedule = _optimizer(model, settings)
    params = optimizer.param_groups[0]["params"]
    no_prompt = torch.zeros(settings.batch_size, 0, hidden)
    losses = []
    bar = tqdm(range(settings.steps), desc="train lora")
    for step in bar:
        rng = random.Random(settings.seed * 1_000_003 + step)
        optimizer.zero_grad()
        total = 0.0
        for _ in range(settings.grad_accum):
            batch = [examples[rng.randrange(len(examples))] for _ in range(settings.batch_size)]
            inputs, mask, labels = batch_inputs(batch, no_prompt, embed)
            loss = model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
            (loss / settings.grad_accum).backward()
            total += loss.item() / settings.grad_accum
        optimizer.step()
        schedule.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
    model.save_pretrained(settings.output)
    summary = {"steps": settings.steps, "losses": losses, "lora_rank": rank,
               "parameters": sum(p.numel() for p in params),
               "ptmoe_parameters": ptmoe_parameters,
               "settings": {k: str(v) for k, v in settings.model_dump().items()}}
    (settings.output / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save_checkpoint(folder: Path, module: PtMoePrompt, optimizer, step: int) -> None:
    """Parameters and AdamW moments in safetensors, the step in its metadata: one file,
    written whole and flushed before it replaces the last (disk.py), so a process killed or a
    disk filled while saving leaves the previous checkpoint whole and no partial file. No
    pickle."""
    tensors = {f"param.{name}": p for name, p in module.named_parameters()}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = value.reshape(-1) if key == "step" else value
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    write_atomically(folder / CHECKPOINT, save(tensors, metadata={"step": str(step)}))


def _load_checkpoint(folder: Path, module: PtMoePrompt, optimizer, schedule) -> int:
    """The step the checkpoint in `folder` was saved at, its state loaded; 0 where there is
    none, or none that reads whole (training then starts again, said in the log)."""
    if not (folder / CHECKPOINT).exists():
        return 0
    try:
        with safe_open(folder / CHECKPOINT, "pt", device=str(module.experts_a.device)) as f:
            step = int(f.metadata()["step"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        missing = {f"param.{name}" for name, _ in module.named_parameters()} - tensors.keys()
        if missing:
            raise ValueError(f"no {sorted(missing)[0]}")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("the checkpoint %s does not read whole (%s): training starts again",
                       folder / CHECKPOINT, e)
        return 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(tensors[f"param.{name}"])
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        state = {key.split(".", 2)[2]: value for key, value in tensors.items()
                 if key.startswith(f"adam.{i}.")}
        if state:
            state["step"] = state["step"].reshape(())
            optimizer.state[p] = state
    for _ in range(step):
        schedule.step()
    return step
