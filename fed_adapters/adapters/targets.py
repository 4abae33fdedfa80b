"""Where adapters go in each architecture.

An insertion point is a sublayer (attention or feed-forward) of one transformer layer, described by two
modules: the *output* module, whose output is the sublayer's output before the residual add and
LayerNorm (a sequential adapter transforms it, a parallel adapter adds to it), and the *input* module,
whose first input is the sublayer's input (what a parallel adapter reads).

Each mapping is a regex that full-matches the output module's qualified name, with a named group `layer`
(the layer index) and a group `sublayer` from which the input module's name is expanded. Matching on
names, not classes, keeps task wrappers (`bert.`, `transformer.`, `model.` prefixes) transparent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import AdapterConfig, AdapterConfigError


@dataclass(frozen=True)
class SublayerPattern:
    output: str  # regex over the output module's name, with groups `layer` and `sublayer`
    input: str  # expansion template for the input module's name, e.g. r"\g<sublayer>.self"


_ANY_PREFIX = r"(?:.*\.)?"

_BERT_LIKE = {
    "attention": SublayerPattern(
        rf"(?P<sublayer>{_ANY_PREFIX}layer\.(?P<layer>\d+)\.attention)\.output\.dense", r"\g<sublayer>.self"
    ),
    "ffn": SublayerPattern(rf"(?P<sublayer>{_ANY_PREFIX}layer\.(?P<layer>\d+))\.output\.dense", r"\g<sublayer>.intermediate"),
}
_LLAMA_LIKE = {
    "attention": SublayerPattern(rf"(?P<sublayer>{_ANY_PREFIX}layers\.(?P<layer>\d+)\.self_attn)\.o_proj", r"\g<sublayer>"),
    "ffn": SublayerPattern(rf"(?P<sublayer>{_ANY_PREFIX}layers\.(?P<layer>\d+)\.mlp)\.down_proj", r"\g<sublayer>"),
}
_T5_LIKE = {
    "attention": SublayerPattern(
        rf"(?P<sublayer>{_ANY_PREFIX}block\.(?P<layer>\d+)\.layer\.0\.SelfAttention)\.o", r"\g<sublayer>"
    ),
    "ffn": SublayerPattern(
        rf"(?P<sublayer>{_ANY_PREFIX}block\.(?P<layer>\d+)\.layer\.\d+\.DenseReluDense)\.wo", r"\g<sublayer>"
    ),
}

ARCHITECTURES: dict[str, dict[str, SublayerPattern]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": {
        "attention": SublayerPattern(
            rf"(?P<sublayer>{_ANY_PREFIX}layer\.(?P<layer>\d+)\.attention)\.out_lin", r"\g<sublayer>"
        ),
        "ffn": SublayerPattern(rf"(?P<sublayer>{_ANY_PREFIX}layer\.(?P<layer>\d+)\.ffn)\.lin2", r"\g<sublayer>"),
    },
    "gpt2": {
        "attention": SublayerPattern(rf"(?P<sublayer>{_ANY_PREFIX}h\.(?P<layer>\d+)\.attn)\.c_proj", r"\g<sublayer>"),
        "ffn": SublayerPattern(rf"(?P<sublayer>{_ANY_PREFIX}h\.(?P<layer>\d+)\.mlp)\.c_proj", r"\g<sublayer>"),
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "t5": _T5_LIKE,
    "mt5": _T5_LIKE,
}


@dataclass(frozen=True)
class InsertionPoint:
    output_module: str
    input_module: str
    layer: int
    location: str  # "attention", "ffn" or "custom"


def num_layers(model: nn.Module) -> int:
    """Transformer layers per stack (HF configs alias n_layer / num_layers / n_layers to this name); an
    encoder-decoder whose decoder is deeper (T5's num_decoder_layers) counts the deeper stack's."""
    config = model.config
    return max(int(config.num_hidden_layers), int(getattr(config, "num_decoder_layers", None) or 0))


def find_insertion_points(model: nn.Module, config: AdapterConfig) -> list[InsertionPoint]:
    """The sublayers of `model` that get an adapter under `config`, in module order."""
    names = [name for name, _ in model.named_modules()]
    if config.target_modules is not None:
        points = _explicit_points(names, config.target_modules)
        _check_explicit_targets(model, points)
    else:
        points = _mapped_points(model, names, config.location)
    total = num_layers(model)
    chosen = set(config.layers) if config.layers is not None else set(range(total))
    out_of_range = sorted(i for i in chosen if i >= total)
    if out_of_range:
        raise AdapterConfigError(f"layers {out_of_range} do not exist: the model has {total} layers (0..{total - 1})")
    chosen -= set(range(config.leave_out))
    points = [p for p in points if p.layer in chosen]
    if not points:
        raise AdapterConfigError(
            f"no layer is left for the adapter (layers={config.layers}, leave_out={config.leave_out}, "
            f"{total} layers); lower leave_out or list existing layers"
        )
    return points


def _mapped_points(model: nn.Module, names: list[str], location: str) -> list[InsertionPoint]:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise AdapterConfigError(
            f"no adapter mapping for model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "For any other model, name the sublayer modules to adapt in AdapterConfig(target_modules=[...]), "
            "e.g. target_modules=['mlp'] (a name suffix or a regex over module names)"
        )
    wanted = ("attention", "ffn") if location == "both" else (location,)
    patterns = {loc: re.compile(ARCHITECTURES[model_type][loc].output) for loc in wanted}
    points = []
    for name in names:
        for loc, pattern in patterns.items():
            match = pattern.fullmatch(name)
            if match:
                input_name = match.expand(ARCHITECTURES[model_type][loc].input)
                points.append(InsertionPoint(name, input_name, int(match.group("layer")), loc))
    return points


def _explicit_points(names: list[str], targets: list[str]) -> list[InsertionPoint]:
    """Explicit targets: a module whose output is a sublayer output; its own input feeds parallel adapters."""
    points = []
    for name in names:
        if any(name == t or name.endswith("." + t) or _regex_fullmatch(t, name) for t in targets):
            layer = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
            points.append(InsertionPoint(name, name, int(layer.group(1)) if layer else 0, "custom"))
    if not points:
        raise AdapterConfigError(
            f"target_modules {targets} match no module of this model; module names look like "
            f"{', '.join(n for n in names[1:6])}, ..."
        )
    return points


def _check_explicit_targets(model: nn.Module, points: list[InsertionPoint]) -> None:
    """An adapter reads and writes the hidden state: a matched container never runs (its forward is never
    called), and a projection to another width (BERT's intermediate.dense, Llama's gate_proj) cannot feed one."""
    modules, hidden = dict(model.named_modules()), int(model.config.hidden_size)
    for point in points:
        module = modules[point.output_module]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            raise AdapterConfigError(f"target_modules match {point.output_module!r}, a {type(module).__name__} that never runs "
                                     "as one module; name the sublayers inside it (e.g. 'mlp', 'output')")
        width = getattr(module, "out_features", None) or getattr(module, "nf", None)  # Linear; GPT-2's Conv1D
        if width is not None and int(width) != hidden:
            raise AdapterConfigError(
                f"target module {point.output_module!r} outputs {width} features, not the hidden size {hidden}: adapters "
                "sit on sublayer outputs of the hidden width (e.g. BERT's 'output.dense', Llama's 'down_proj' or 'mlp')")


def _regex_fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False
