"""Local training and evaluation, shared by centralized runs and federated clients.

Only parameters with `requires_grad` reach the optimizer, so the same loop trains an adapter on a
frozen base, a head alone, or a fully unfrozen model. An optional proximal term mu/2 * ||w - w_ref||^2
keeps local weights near a reference (FedProx's global model, Ditto's personal pull).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapters.model import head_parameter_names

AMP_MODES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("adamw", "sgd")


class DeviceError(ValueError):
    """A device that does not exist here; the message names what does."""


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; any torch device string is accepted."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """Mixed precision on GPUs (bf16 where supported, else fp16); full precision on CPU unless asked."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; valid: {', '.join(AMP_MODES)}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


@dataclass
class Optimization:
    """Hyperparameters of local training shared by centralized and federated configs (TOML tables)."""

    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 3e-3
    # The task head's own learning rate; 0 = lr. With SGD the head's gradients are ~100x the adapters', so a
    # single lr either overshoots the head or starves the adapters.
    head_lr: float = 0.0
    optimizer: str = "adamw"
    # AdamW's epsilon: gradients far below it get SGD-sized steps (lr / epsilon x gradient) instead of full
    # normalised ones. torch's 1e-8 turns even a ~0 gradient (a one-label client under logit adjustment) into a
    # step of size lr; SGD ignores it.
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    device: str = "auto"
    amp: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} and {self.eval_batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.head_lr < 0:
            raise ValueError(f"head_lr must be >= 0 (0 = the same as lr), got {self.head_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.adam_epsilon <= 0:  # 0 divides by zero for a parameter whose gradient is still 0
            raise ValueError(f"adam_epsilon must be > 0 (torch's default is 1e-8), got {self.adam_epsilon}")
        if self.max_grad_norm < 0:  # a negative norm flips the gradient: training would ascend
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {self.warmup_ratio}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown amp mode {self.amp!r}; valid: {', '.join(AMP_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")

    def train_kwargs(self) -> dict:
        """The keyword arguments of `train` that this table sets."""
        return dict(lr=self.lr, head_lr=self.head_lr or None, optimizer=self.optimizer, adam_epsilon=self.adam_epsilon,
                    weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio, max_grad_norm=self.max_grad_norm,
                    device=self.device, amp=self.amp)


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over all steps
    steps: int
    examples: int
    seconds: float
    # The lr schedule's factors summed over the steps taken: a parameter's total step size is its peak lr times
    # this (SCAFFOLD turns a client's drift into its control variate with it).
    schedule_sum: float = 0.0

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: float = 1.0,
    max_steps: int | None = None,
    lr: float = 1e-3,
    head_lr: float | None = None,
    optimizer: str = "adamw",
    adam_epsilon: float = 1e-8,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    max_grad_norm: float | None = 1.0,
    prox_mu: float = 0.0,
    prox_reference: dict[str, torch.Tensor] | None = None,
    schedule_start: int = 0,
    schedule_steps: int | None = None,
    logit_adjustment: torch.Tensor | None = None,
    grad_correction: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    device: str | torch.device = "auto",
    amp: str = "auto",
    progress: bool = False,
) -> TrainStats:
    """AdamW (or SGD) with linear warmup and decay over `max_steps` (or `epochs` passes) of `loader`.

    By default the warmup/decay curve spans this call. A federated client can instead run one slice of a
    longer curve — `schedule_steps` in all, entered at `schedule_start` — so that successive rounds continue
    one schedule rather than each warming up and decaying again. `logit_adjustment` (one value per class, see
    `label_prior_adjustment`) is added to the logits inside the training loss only. `head_lr` gives the task
    head (`head_parameter_names`) its own peak learning rate; the schedule scales both alike.
    `grad_correction` (parameter name -> tensor) is added to those parameters' gradients after clipping, at
    every step: SCAFFOLD's c - c_i. `optimizer_state` (in and out, "<parameter>/<state key>" -> tensor) lets
    the optimizer continue where an earlier call left it (a federated client's AdamW moments across its rounds):
    its entries are loaded before the first step and replaced by the state after the last.

    SGD's step shrinks with the gradient, so a client whose data the model already fits (a one-label client
    once it predicts that label) stops moving; AdamW's normalised step keeps its size, which under label skew
    turns every such client into a full-sized push toward its label — unless `adam_epsilon` lies well above
    such a client's gradients, which then get SGD-sized steps.
    """
    device = resolve_device(device)
    model.to(device).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters; add an adapter or unfreeze a head first")
    if max_steps is None and epochs <= 0:
        raise ValueError(f"epochs must be > 0 (or give max_steps), got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    total_steps = planned_steps(loader, epochs, max_steps)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    parameters = _parameter_groups(model, named, head_lr)
    step_rule = (torch.optim.AdamW(parameters, lr=lr, eps=adam_epsilon, weight_decay=weight_decay) if optimizer == "adamw"
                 else torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay))
    if optimizer_state:
        _load_optimizer_state(step_rule, named, optimizer_state)
    span = schedule_steps or total_steps
    warmup = int(warmup_ratio * span)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        step_rule, lambda step: _linear_schedule(schedule_start + step, warmup, span))
    reference = _proximal_reference(named, prox_reference, device) if prox_mu > 0 else None
    adjustment = logit_adjustment.to(device) if logit_adjustment is not None else None
    correction = _gradient_correction(named, grad_correction, device) if grad_correction else None
    dtype = autocast_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    loss_sum, examples, step, schedule_sum = 0.0, 0, 0, 0.0
    start = time.perf_counter()
    bar = _progress(total_steps, "train", progress)
    for batch in _cycle(loader, total_steps):
        batch = {k: v.to(device) for k, v in batch.items()}
        if loss_weight(batch) == 0:  # a language model's batch of one-token texts: nothing to predict, loss 0/0
            continue  # (no step taken: `steps` counts the optimizer's)
        with _autocast(device, dtype):
            task_loss = _training_loss(model, batch, adjustment)
        loss = task_loss
        if reference is not None:  # trains toward the reference; reported is the task's loss alone
            loss = task_loss + 0.5 * prox_mu * sum(((p - reference[n]) ** 2).sum() for n, p in named)
        step_rule.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if max_grad_norm or correction:
            scaler.unscale_(step_rule)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], max_grad_norm)
        if correction:
            for param, value in correction:
                param.grad = value.clone() if param.grad is None else param.grad.add_(value)
        schedule_sum += _linear_schedule(schedule_start + step, warmup, span)
        scaler.step(step_rule)
        scaler.update()
        scheduler.step()
        loss_sum += float(task_loss.detach())
        examples += int(batch["input_ids"].shape[0])
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / step:.4f}")
    if bar is not None:
        bar.close()
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update({f"{name}/{key}": value.detach().cpu().clone()
                                for name, param in named for key, value in step_rule.state.get(param, {}).items()})
    return TrainStats(loss_sum / max(step, 1), step, examples, time.perf_counter() - start, schedule_sum)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, *, device: str | torch.device = "auto", amp: str = "auto", progress: bool = False
) -> dict[str, float]:
    """Mean loss and, for classification, accuracy and macro-F1; for language models, perplexity."""
    device = resolve_device(device)
    model.to(device).eval()
    dtype = autocast_dtype(device, amp)
    loss_sum, weight_sum, count = 0.0, 0, 0
    predictions, labels = [], []
    bar = _progress(len(loader), "eval", progress)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, dtype):
            output = model(**batch)
        size = int(batch["input_ids"].shape[0])
        weight = loss_weight(batch)
        if weight:  # (a batch with nothing to predict has loss 0/0)
            loss_sum += float(output.loss) * weight
            weight_sum += weight
        count += size
        if batch["labels"].dim() == 1:
            predictions.append(output.logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    metrics = {"loss": loss_sum / max(weight_sum, 1), "num_examples": float(count)}
    if labels:
        y_pred, y_true = torch.cat(predictions), torch.cat(labels)
        num_classes = int(getattr(model.config, "num_labels", 0) or int(y_true.max()) + 1)
        metrics["accuracy"] = float((y_pred == y_true).float().mean())
        metrics["macro_f1"] = macro_f1(y_pred, y_true, num_classes)
    else:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


def loss_weight(batch: dict[str, torch.Tensor]) -> int:
    """What a batch's loss is a mean over: its examples (classification) or the tokens it predicts (a language
    model: every labelled token after the first), so that perplexity is per token over a whole set."""
    labels = batch["labels"]
    return int(labels.shape[0]) if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all `num_classes` classes (absent classes score 0)."""
    scores = []
    for c in range(num_classes):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes


def label_prior_adjustment(labels: Sequence[int], num_classes: int, tau: float) -> torch.Tensor:
    """τ · log p(y) of a client's own labels (add-one smoothed), to add to its logits while it trains.

    With the client's prior in the logits, the loss is already low where its label skew alone explains its
    labels, so its gradient carries what separates the classes rather than how often they occur locally
    (logit adjustment, Menon et al. 2021; FedLC, Zhang et al. 2022). Evaluation uses the plain logits. With
    AdamW the normalised step hides the smaller gradient: pair it with `optimizer = "sgd"`.
    """
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).float() + 1.0
    return tau * torch.log(counts / counts.sum())


def planned_steps(loader: DataLoader, epochs: float, max_steps: int | None) -> int:
    """The optimizer steps `train` takes: `max_steps`, or `epochs` passes over `loader` (at least one)."""
    return max_steps if max_steps is not None else max(1, math.ceil(epochs * len(loader)))


def _training_loss(model: nn.Module, batch: dict[str, torch.Tensor], adjustment: torch.Tensor | None) -> torch.Tensor:
    if adjustment is None:
        return model(**batch).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return nn.functional.cross_entropy(logits.float() + adjustment, batch["labels"])


def _gradient_correction(named: list[tuple[str, nn.Parameter]], correction: dict[str, torch.Tensor],
                         device: torch.device) -> list[tuple[nn.Parameter, torch.Tensor]]:
    params = dict(named)
    unknown = sorted(set(correction) - set(params))
    if unknown:
        raise ValueError(f"grad_correction names parameters that do not train here: {unknown[:3]}")
    return [(params[name], value.to(device, params[name].dtype)) for name, value in correction.items()]


def _parameter_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]], head_lr: float | None) -> list[dict]:
    """One optimizer group of every trainable parameter, or two when the head has its own learning rate."""
    if head_lr is None:
        return [{"params": [p for _, p in named]}]
    head = set(head_parameter_names(model))
    groups = [{"params": [p for n, p in named if n not in head]},
              {"params": [p for n, p in named if n in head], "lr": head_lr}]
    return [g for g in groups if g["params"]]


class OptimizerStateError(ValueError):
    """Saved optimizer state that does not fit the model being trained."""


def _load_optimizer_state(step_rule: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]],
                          saved: dict[str, torch.Tensor]) -> None:
    """Puts saved per-parameter state back through `load_state_dict`, which places each tensor as the
    optimizer expects (moments on the parameter's device, AdamW's step count on the CPU)."""
    current = step_rule.state_dict()
    index = {id(p): i for i, p in enumerate(p for group in step_rule.param_groups for p in group["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, param in named:
        entries = {key.rpartition("/")[2]: value for key, value in saved.items() if key.rpartition("/")[0] == name}
        for key, value in entries.items():
            if value.dim() and value.shape != param.shape:
                raise OptimizerStateError(f"saved optimizer state {name}/{key} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(param.shape)}: it belongs to another model or adapter")
        if entries:
            state[index[id(param)]] = entries
    step_rule.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _linear_schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _proximal_reference(
    named: list[tuple[str, nn.Parameter]], reference: dict[str, torch.Tensor] | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """The anchor of the proximal term: given tensors, or the trainable weights as they are at the start."""
    if reference is None:
        return {n: p.detach().clone() for n, p in named}
    missing = [n for n, _ in named if n not in reference]
    if missing:
        raise ValueError(f"prox_reference lacks trainable parameter(s) {missing[:3]}; give one tensor per trainable parameter")
    return {n: reference[n].detach().to(device) for n, _ in named}


def _cycle(loader: Iterable, steps: int) -> Iterator:
    """Batches from `loader`, restarting it, until `steps` batches were given."""
    given = 0
    while given < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            given += 1
            if given == steps:
                return
        if empty:
            raise ValueError("the data loader is empty: there is nothing to train on")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices) so that a run repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
