"""Tiny random-init models of every supported family and batches that fit them; a tiny local BERT, a
learnable keyword task and a run config around them, for real (Ray) federations."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402
import transformers as tf  # noqa: E402

from fed_adapters.configuration import from_mapping  # noqa: E402
from fed_adapters.federated.config import RunConfig  # noqa: E402
from fed_adapters.modeling import build_model, load_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 64
PAD, EOS = 0, 1

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD)
_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, **_COMMON)
_DECODER = dict(_ENCODER, num_key_value_heads=2, eos_token_id=EOS, bos_token_id=EOS)

TINY_CONFIGS = {
    "bert": lambda: tf.BertConfig(**_ENCODER),
    "roberta": lambda: tf.RobertaConfig(**_ENCODER),
    "xlm-roberta": lambda: tf.XLMRobertaConfig(**_ENCODER),
    "electra": lambda: tf.ElectraConfig(embedding_size=32, **_ENCODER),
    "deberta-v2": lambda: tf.DebertaV2Config(**_ENCODER),
    "distilbert": lambda: tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48, **_COMMON),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, eos_token_id=EOS, bos_token_id=EOS, **_COMMON),
    "llama": lambda: tf.LlamaConfig(**_DECODER),
    "mistral": lambda: tf.MistralConfig(**_DECODER),
    "qwen2": lambda: tf.Qwen2Config(**_DECODER),
    "qwen3": lambda: tf.Qwen3Config(head_dim=16, **_DECODER),
    "t5": lambda: tf.T5Config(
        d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2, eos_token_id=EOS, decoder_start_token_id=PAD, **_COMMON
    ),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_model(family: str, num_labels: int = 3, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, width-32 model with the architecture's own classification head, in eval mode."""
    torch.manual_seed(seed)
    return build_model(TINY_CONFIGS[family](), num_labels=num_labels, pooling="model").eval()


def recorded_learning_rates(run) -> list[float]:
    """The learning rate of every optimizer step taken while `run()` trains (a global step hook)."""
    rates: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        run()
    finally:
        handle.remove()
    return rates


def disable_dropout(model: torch.nn.Module) -> None:
    """The same gradient in `train`'s train mode as in a hand-computed backward pass."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def tiny_batch(batch_size: int = 4, length: int = 7, seed: int = 0, labels: int | None = 3) -> dict[str, torch.Tensor]:
    """Random token ids ending in EOS (T5's classification head reads the EOS position)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch_size, length), generator=generator)
    ids[:, -1] = EOS
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        batch["labels"] = torch.randint(0, labels, (batch_size,), generator=generator)
    return batch


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


FILLER = ("the a film movie plot actor scene story music camera light day night city road house table water "
          "green blue small large early late open close slow quick").split()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer, width-32 BERT with random weights and MiniLM's tokenizer, saved as a local model directory."""
    tokenizer = load_tokenizer()
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=64)
    tf.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory) -> Path:
    """Label 1 iff the sentence contains 'excellent': learnable by a frozen random encoder plus adapters."""
    directory = tmp_path_factory.mktemp("keyword")
    rng = random.Random(0)
    for split, n in (("train", 400), ("validation", 120)):
        rows = []
        for i in range(n):
            words = rng.choices(FILLER, k=6)
            if i % 2:
                words.insert(rng.randrange(7), "excellent")
            rows.append({"text": " ".join(words), "label": i % 2, "client_id": f"site-{i % 3}"})
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def tiny_config(tmp_path: Path, base: Path, data: Path, **sections) -> RunConfig:
    raw = {
        "run_name": "tiny", "results_dir": str(tmp_path / "results"), "seed": 0,
        "model": {"name": str(base), "max_length": 16},
        "adapter": {"preset": "houlsby", "bottleneck_size": 8},
        "data": {"source": str(data)},
        "partition": {"method": "iid", "num_clients": 4},
        "strategy": {"num_rounds": 3, "fraction_evaluate": 0.0},
        "train": {"local_epochs": 3, "batch_size": 16, "lr": 1e-2, "device": "cpu"},
        "simulation": {"num_cpus": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return from_mapping(RunConfig, raw)


@pytest.fixture
def message_identity():
    """Messages built outside a run need Flower's task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
