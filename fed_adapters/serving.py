"""Multi-adapter serving: one frozen base, many clients' adapters and heads, a mixed batch in one pass.

Each client's adapter is a named adapter on the shared base; per-example routing (the adapter core's
batched matmuls over stacked adapter weights) sends every request through its own client's adapter, and
the clients' heads are stacked so each pooled vector meets its own head in one batched matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .adapters import (AdapterStateError, adapter_routing, add_adapter, delete_adapter, load_adapter_state_dict,
                       set_active_adapter)
from .adapters.state import base_differences, read_single_adapter
from .modeling import PooledClassifier


class AdapterServer:
    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> None:
        if not isinstance(model, PooledClassifier):
            raise TypeError("AdapterServer serves pooled classifiers (load_model(..., pooling='mean' or 'cls'))")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.clients: dict[str, int] = {}  # client -> row of the head tables
        self._head_weights: list[torch.Tensor] = []
        self._head_biases: list[torch.Tensor] = []
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_client(self, client: str, adapter_dir: str | Path) -> None:
        """Loads a client's adapter (a `save_adapter` file or a single-adapter set) and its head."""
        if client in self.clients:
            raise ValueError(f"client {client!r} is already loaded")
        config, signature, adapter, head = read_single_adapter(adapter_dir)
        differences = base_differences(signature, self.model, includes_head=True)  # each client brings its head
        if differences:
            raise AdapterStateError(f"the adapter in {adapter_dir} was made for another base, label count or pooling "
                                    f"({signature['name_or_path']}): {'; '.join(differences)}")
        weight, bias = head.get("classifier.weight"), head.get("classifier.bias")
        if weight is None or bias is None:
            raise AdapterStateError(f"the adapter in {adapter_dir} holds no classification head, and no other head "
                                    "fits it; save it again with save_adapter or save_adapter_set, which keep the head")
        name = _adapter_name(client)
        add_adapter(self.model, config, name)
        try:
            load_adapter_state_dict(self.model, adapter, name, include_head=False)
        except AdapterStateError:
            delete_adapter(self.model, name)
            raise
        finally:
            set_active_adapter(self.model, None)
        self.clients[client] = len(self._head_weights)
        self._head_weights.append(weight.to(self.model.device))
        self._head_biases.append(bias.to(self.model.device))
        self._stacked = None

    def _check_request(self, texts: Sequence[str], clients: Sequence[str]) -> None:
        if not texts:
            raise ValueError("no texts to predict; give at least one text and its client id")
        if len(texts) != len(clients):
            raise ValueError(f"{len(texts)} texts but {len(clients)} client ids; give one client per text")
        unknown = sorted(set(clients) - set(self.clients))
        if unknown:
            raise KeyError(f"client(s) {unknown} not loaded; loaded: {sorted(self.clients) or 'none (add_client first)'}")

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in batch.items()}

    @torch.no_grad()
    def predict(self, texts: Sequence[str], clients: Sequence[str]) -> torch.Tensor:
        """Class probabilities for requests from any mix of loaded clients, in one forward pass."""
        self._check_request(texts, clients)
        if self._stacked is None:
            self._stacked = (torch.stack(self._head_weights), torch.stack(self._head_biases))
        weights, biases = self._stacked
        rows = torch.tensor([self.clients[c] for c in clients], device=weights.device)
        with adapter_routing(self.model, [_adapter_name(c) for c in clients]):
            pooled = self.model.features(**self._tokenize(texts))
        logits = torch.bmm(weights[rows], pooled.to(weights.dtype).unsqueeze(-1)).squeeze(-1) + biases[rows]
        return logits.softmax(-1)

    @torch.no_grad()
    def predict_one_client_at_a_time(self, texts: Sequence[str], clients: Sequence[str]) -> torch.Tensor:
        """The same answers by switching adapters: one forward pass per client in the batch (the baseline)."""
        self._check_request(texts, clients)
        out = torch.empty(len(texts), self._head_weights[0].shape[0], device=self.model.device)
        for client in dict.fromkeys(clients):
            index = [i for i, c in enumerate(clients) if c == client]
            set_active_adapter(self.model, _adapter_name(client))
            pooled = self.model.features(**self._tokenize([texts[i] for i in index]))
            row = self.clients[client]
            logits = pooled.to(self._head_weights[row].dtype) @ self._head_weights[row].T + self._head_biases[row]
            out[index] = logits.softmax(-1)
        set_active_adapter(self.model, None)
        return out


def _adapter_name(client: str) -> str:
    return f"client-{client}"
