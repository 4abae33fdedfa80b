"""Tiny random-init models of every supported family, and batches that fit them."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from fed_adapters.modeling import build_model  # noqa: E402

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
