"""Local training and evaluation helpers on tiny models."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
import transformers as tf
from conftest import EOS, VOCAB, disable_dropout, recorded_learning_rates, tiny_model
from torch.utils.data import DataLoader

from fed_adapters.adapters import AdapterConfig, add_adapter, freeze_base
from fed_adapters.modeling import ModelConfigError, build_model, load_model, load_tokenizer
from fed_adapters.training import (
    autocast_dtype, evaluate, label_prior_adjustment, macro_f1, resolve_device, seed_everything, train,
)


def _keyword_task(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Label 1 iff token 5 occurs: learnable by any model that can see its input."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(6, VOCAB, (8,), generator=generator)
        label = i % 2
        if label:
            ids[int(torch.randint(0, 7, (1,), generator=generator))] = 5
        ids[-1] = EOS
        examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(label)})
    return examples


def test_adapter_learns_a_learnable_task() -> None:
    seed_everything(0)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    model = build_model(config, num_labels=2, pooling="mean")
    add_adapter(model, AdapterConfig.preset("houlsby", bottleneck_size=16))
    train_loader = DataLoader(_keyword_task(256, 0), batch_size=32, shuffle=True)
    test_loader = DataLoader(_keyword_task(128, 1), batch_size=64)
    before = evaluate(model, test_loader, device="cpu")
    stats = train(model, train_loader, epochs=15, lr=1e-2, device="cpu")
    after = evaluate(model, test_loader, device="cpu")
    assert stats.steps == 15 * 8 and stats.examples == 15 * 256 and stats.seconds > 0
    assert after["accuracy"] >= 0.8 and after["accuracy"] > before["accuracy"] + 0.2
    assert after["loss"] < before["loss"] and after["macro_f1"] >= 0.8 and after["num_examples"] == 128


def test_a_call_can_run_one_slice_of_a_longer_schedule() -> None:
    model = tiny_model("bert", num_labels=2)
    add_adapter(model, AdapterConfig(bottleneck_size=8))
    loader = DataLoader(_keyword_task(64, 0), batch_size=16)
    whole = recorded_learning_rates(lambda: train(model, loader, max_steps=4, lr=1.0, warmup_ratio=0.0, device="cpu"))
    second_half = recorded_learning_rates(lambda: train(model, loader, max_steps=4, lr=1.0, warmup_ratio=0.0, device="cpu",
                                                        schedule_start=4, schedule_steps=8))
    assert whole == pytest.approx([1.0, 0.75, 0.5, 0.25])  # its own decay to zero
    assert second_half == pytest.approx([0.5, 0.375, 0.25, 0.125])  # steps 4..7 of an 8-step decay


def test_kept_optimizer_state_makes_two_calls_one_run() -> None:
    """Two one-epoch calls that carry AdamW's state (and one schedule) end where one two-epoch call does;
    without the state the second call's AdamW starts afresh and ends elsewhere."""
    loader = DataLoader(_keyword_task(48, 0), batch_size=16)
    schedule = dict(lr=1e-2, warmup_ratio=0.0, device="cpu")

    def trained(split: bool, keep: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("bert", num_labels=2)
        add_adapter(model, AdapterConfig(bottleneck_size=8))
        disable_dropout(model)
        if split:
            state: dict[str, torch.Tensor] | None = {} if keep else None
            train(model, loader, epochs=1, schedule_steps=6, optimizer_state=state, **schedule)
            if keep:
                names = [n for n, p in model.named_parameters() if p.requires_grad]
                assert sorted(state) == sorted(f"{n}/{k}" for n in names for k in ("exp_avg", "exp_avg_sq", "step"))
                assert all(float(state[f"{n}/step"]) == 3 for n in names)
            train(model, loader, epochs=1, schedule_start=3, schedule_steps=6, optimizer_state=state, **schedule)
        else:
            train(model, loader, epochs=2, **schedule)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, kept, fresh = trained(False, False), trained(True, True), trained(True, False)
    assert all(torch.allclose(whole[n], kept[n], atol=1e-6) for n in whole)
    assert max(float((whole[n] - fresh[n]).abs().max()) for n in whole) > 1e-3
    other = tiny_model("bert", num_labels=2)
    add_adapter(other, AdapterConfig(bottleneck_size=4))
    with pytest.raises(ValueError, match="saved optimizer state .* has shape .* belongs to another model or adapter"):
        train(other, loader, epochs=1, optimizer_state={f"{n}/exp_avg": v for n, v in kept.items()}, **schedule)


def test_label_prior_adjustment_is_tau_times_the_smoothed_log_prior() -> None:
    # counts 3, 0, 1 -> add-one smoothed 4, 1, 2 of 7
    assert label_prior_adjustment([0, 2, 0, 0], 3, 0.5).tolist() == pytest.approx([0.5 * math.log(p) for p in (4 / 7, 1 / 7, 2 / 7)])


def test_sgd_steps_are_the_learning_rate_times_the_gradient() -> None:
    model = tiny_model("bert", num_labels=2)
    freeze_base(model, train_head=True)
    disable_dropout(model)
    batch = next(iter(DataLoader(_keyword_task(8, 0), batch_size=8)))
    model(**batch).loss.backward()
    expected = model.classifier.bias.detach() - 0.5 * model.classifier.bias.grad
    train(model, [batch], max_steps=1, lr=0.5, optimizer="sgd", weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=None, device="cpu")
    assert torch.allclose(model.classifier.bias.detach(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; valid: adamw, sgd"):
        train(model, [batch], max_steps=1, optimizer="lion", device="cpu")


def test_adam_epsilon_shrinks_adamws_first_step_for_small_gradients() -> None:
    """AdamW's first step is lr * g / (|g| + eps) per element: a full lr-sized step for any g >> eps."""
    from fed_adapters.training import Optimization

    batch = next(iter(DataLoader(_keyword_task(8, 0), batch_size=8)))
    for epsilon in (1e-8, 1.0):
        seed_everything(0)
        model = tiny_model("bert", num_labels=2)
        freeze_base(model, train_head=True)
        disable_dropout(model)
        model(**batch).loss.backward()
        gradient = model.classifier.bias.grad.clone()
        expected = model.classifier.bias.detach() - 0.1 * gradient / (gradient.abs() + epsilon)
        settings = Optimization(lr=0.1, adam_epsilon=epsilon, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=0.0, device="cpu")
        train(model, [batch], max_steps=1, **settings.train_kwargs())
        assert torch.allclose(model.classifier.bias.detach(), expected, atol=1e-6), epsilon
    assert float(gradient.abs().max()) < 0.5  # so that epsilon 1 made the step several times smaller than lr


def test_head_lr_gives_the_head_its_own_sgd_step() -> None:
    model = tiny_model("bert", num_labels=2)
    add_adapter(model, AdapterConfig(bottleneck_size=4))
    disable_dropout(model)
    batch = next(iter(DataLoader(_keyword_task(8, 0), batch_size=8)))
    model(**batch).loss.backward()
    adapter_name, adapter_param = max(((n, p) for n, p in model.named_parameters() if "adapter" in n and p.grad is not None),
                                      key=lambda item: float(item[1].grad.abs().sum()))
    assert float(adapter_param.grad.abs().sum()) > 0
    expected_head = model.classifier.weight.detach() - 0.1 * model.classifier.weight.grad
    expected_adapter = adapter_param.detach() - 2.0 * adapter_param.grad
    train(model, [batch], max_steps=1, lr=2.0, head_lr=0.1, optimizer="sgd", weight_decay=0.0, warmup_ratio=0.0,
          max_grad_norm=None, device="cpu")
    assert torch.allclose(model.classifier.weight.detach(), expected_head, atol=1e-6)
    assert torch.allclose(dict(model.named_parameters())[adapter_name].detach(), expected_adapter, atol=1e-6), adapter_name


def test_proximal_term_pulls_towards_the_reference() -> None:
    drift = {}
    for mu in (0.0, 100.0):
        seed_everything(0)
        model = tiny_model("bert", num_labels=2)
        add_adapter(model, AdapterConfig(bottleneck_size=8))
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train(model, DataLoader(_keyword_task(64, 0), batch_size=16), max_steps=20, lr=1e-2, prox_mu=mu, device="cpu")
        drift[mu] = math.sqrt(sum(((p - start[n]) ** 2).sum().item() for n, p in model.named_parameters() if p.requires_grad))
    assert drift[100.0] < 0.5 * drift[0.0]


def test_the_reported_training_loss_is_the_tasks_not_the_proximal_terms() -> None:
    model = tiny_model("bert", num_labels=2)
    disable_dropout(model)
    add_adapter(model, AdapterConfig(bottleneck_size=4))
    batch = next(iter(DataLoader(_keyword_task(8, 0), batch_size=8)))
    with torch.no_grad():
        task_loss = float(model(**batch).loss)
    far = {n: p.detach() + 1.0 for n, p in model.named_parameters() if p.requires_grad}  # a large proximal term
    stats = train(model, [batch], max_steps=1, lr=1e-9, prox_mu=1.0, prox_reference=far, device="cpu")
    assert stats.loss == pytest.approx(task_loss, rel=1e-4)


def test_a_language_model_batch_with_nothing_to_predict_is_skipped_not_nan() -> None:
    torch.manual_seed(0)
    model = build_model(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2), task="causal_lm")
    add_adapter(model, AdapterConfig.preset("pfeiffer", bottleneck_size=8))
    ids = torch.randint(2, VOCAB, (4, 6))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    one_token = {"input_ids": ids[:, :2], "attention_mask": torch.tensor([[1, 0]] * 4),
                 "labels": torch.tensor([[5, -100]] * 4)}  # one real token per text: nothing after it to predict
    alone = evaluate(model, [full], device="cpu")
    both = evaluate(model, [full, one_token], device="cpu")
    assert both["loss"] == pytest.approx(alone["loss"]) and both["num_examples"] == 8
    stats = train(model, [one_token, full], max_steps=2, lr=1e-2, device="cpu")
    assert math.isfinite(stats.loss) and stats.steps == 1  # the batch with nothing to predict took no step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_settings_that_would_train_wrongly_are_refused() -> None:
    from fed_adapters.training import Optimization

    for settings, message in (({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
                              ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
                              ({"adam_epsilon": 0.0}, "adam_epsilon must be > 0"),
                              ({"warmup_ratio": 1.5}, "warmup_ratio must lie in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=message):
            Optimization(**settings)
    model = tiny_model("bert", num_labels=2)
    add_adapter(model, AdapterConfig(bottleneck_size=4))
    loader = DataLoader(_keyword_task(8, 0), batch_size=4)
    with pytest.raises(ValueError, match="epochs must be > 0 \\(or give max_steps\\), got 0"):
        train(model, loader, epochs=0, device="cpu")
    with pytest.raises(ValueError, match="max_steps must be >= 1, got 0"):
        train(model, loader, max_steps=0, device="cpu")


def test_proximal_reference_must_cover_trainable_parameters() -> None:
    model = tiny_model("bert", num_labels=2)
    add_adapter(model, AdapterConfig(bottleneck_size=4))
    with pytest.raises(ValueError, match="prox_reference lacks trainable parameter"):
        train(model, DataLoader(_keyword_task(8, 0), batch_size=4), max_steps=1, prox_mu=1.0, prox_reference={}, device="cpu")


def test_head_only_training_changes_only_the_head() -> None:
    model = tiny_model("bert", num_labels=2)
    freeze_base(model, train_head=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, DataLoader(_keyword_task(16, 0), batch_size=8), max_steps=2, lr=1e-2, device="cpu")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_nothing_trainable_or_empty_loader_are_errors() -> None:
    model = tiny_model("bert", num_labels=2)
    freeze_base(model, train_head=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, DataLoader(_keyword_task(4, 0), batch_size=2), max_steps=1, device="cpu")
    freeze_base(model, train_head=True)
    with pytest.raises(ValueError, match="data loader is empty"):
        train(model, DataLoader([], batch_size=2), max_steps=1, device="cpu")


def test_macro_f1_matches_hand_computation() -> None:
    predictions = torch.tensor([0, 0, 1, 1, 2, 0])
    labels = torch.tensor([0, 1, 1, 1, 2, 2])
    # class 0: tp1 fp2 fn0 -> 2/4; class 1: tp2 fp0 fn1 -> 4/5; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(predictions, labels, 3) == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)


def test_causal_lm_evaluation_reports_perplexity() -> None:
    torch.manual_seed(0)
    model = build_model(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2), task="causal_lm")
    add_adapter(model, AdapterConfig.preset("pfeiffer", bottleneck_size=8))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "bottleneck_adapters" not in n)
    ids = torch.randint(0, VOCAB, (8, 10))
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    before = evaluate(model, DataLoader(data, batch_size=4), device="cpu")
    train(model, DataLoader(data, batch_size=4), epochs=20, lr=1e-2, device="cpu")
    after = evaluate(model, DataLoader(data, batch_size=4), device="cpu")
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert after["perplexity"] < before["perplexity"] and "accuracy" not in after

    # Per token over the whole set: batches of unequal length (padding labelled -100) weigh by their tokens.
    lengths = [10, 3, 9, 2, 10, 4, 6, 2]
    data = [{"input_ids": i, "attention_mask": (torch.arange(10) < n).long(),
             "labels": torch.where(torch.arange(10) < n, i, -100)} for i, n in zip(ids, lengths)]
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in data:
            logits = model(**{k: v[None] for k, v in row.items()}).logits[0, :-1]
            targets = row["labels"][1:]
            keep = targets != -100
            nll += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            tokens += int(keep.sum())
    measured = evaluate(model, DataLoader(data, batch_size=4), device="cpu")
    assert measured["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert measured["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_device_and_precision_selection() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp16") == torch.float16
    with pytest.raises(ValueError, match="unknown amp mode 'fp8'"):
        autocast_dtype(torch.device("cpu"), "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_a_model_that_cannot_be_loaded_is_one_clear_error(tmp_path) -> None:
    """Not transformers' traceback or its "invalid repo id" for a mistyped path: which files, and what to give."""
    with pytest.raises(ModelConfigError, match="model '/no/such/model': no such directory; give a local model directory"):
        load_model("/no/such/model")
    with pytest.raises(ModelConfigError, match="model directory .* has no config.json"):
        load_model(str(tmp_path))
    config_only = tmp_path / "config-only"
    tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(config_only)
    with pytest.raises(ModelConfigError, match="cannot load the weights of model .*config-only.*: Error no file named "
                                               "model.safetensors.* Give a local model directory"):
        load_model(str(config_only))
    with pytest.raises(ModelConfigError, match="cannot load the tokenizer of model"):
        load_tokenizer(str(tmp_path))


def test_model_builder_errors() -> None:
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ModelConfigError, match="unknown task 'ner'"):
        build_model(config, task="ner")
    with pytest.raises(ModelConfigError, match="unknown pooling 'max'"):
        build_model(config, pooling="max")
    with pytest.raises(ModelConfigError, match="num_labels must be an integer >= 2"):
        build_model(config, num_labels=1)
    t5 = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ModelConfigError, match="use pooling='model'"):
        build_model(t5, pooling="mean")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_classifier_head_is_the_only_head(pooling: str) -> None:
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = build_model(config, num_labels=4, pooling=pooling)
    add_adapter(model, AdapterConfig(bottleneck_size=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} < trainable
    assert all(n.startswith("classifier.") or "bottleneck_adapters" in n for n in trainable)
    ids = torch.randint(2, VOCAB, (3, 5))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 3]))
    assert out.logits.shape == (3, 4) and out.loss.ndim == 0
    if pooling == "mean":  # padding does not change a mean-pooled example
        model.eval()
        short = model(input_ids=ids[:1, :3], attention_mask=mask[:1, :3]).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:1], short, atol=1e-5, rtol=0)


def test_a_decoders_own_head_pads_with_its_end_of_sequence_token() -> None:
    """pooling='model' on a decoder without a pad id: it reads the last real token, as the tokenizer pads with EOS."""
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, eos_token_id=EOS, bos_token_id=EOS)
    assert config.pad_token_id is None
    torch.manual_seed(0)
    model = build_model(config, num_labels=2, pooling="model")
    assert model.config.pad_token_id == EOS
    ids = torch.tensor([[5, 6, 7, EOS], [8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    padded = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[:1], model(input_ids=ids[:1, :3]).logits, atol=1e-5, rtol=0)


def test_a_half_precision_checkpoint_gets_a_float32_head(tmp_path) -> None:
    """transformers loads a bf16 checkpoint in bf16; the architecture's own head must still train and travel."""
    from fed_adapters.adapters import to_ndarrays
    from fed_adapters.modeling import load_model

    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=48, pad_token_id=0)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), num_labels=2, pooling="model")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the base stays as loaded
    assert model.score.weight.dtype == torch.float32
    add_adapter(model, AdapterConfig(bottleneck_size=4))
    assert {a.dtype for a in to_ndarrays(model)} == {np.dtype("float32")}
    batch = {"input_ids": torch.randint(2, VOCAB, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    before = model.score.weight.detach().clone()
    train(model, [batch], max_steps=1, lr=1e-2, device="cpu")
    assert not torch.equal(model.score.weight.detach(), before)
    assert model(**batch).logits.dtype == torch.float32


def test_a_language_models_output_projection_is_base_not_head() -> None:
    """Untied (Llama) or tied (GPT-2), the LM head stays frozen and never travels, whatever train_head says."""
    from fed_adapters.adapters import adapter_state_keys

    for family in ("llama", "gpt2"):
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=48, tie_word_embeddings=False) if family == "llama" else \
            tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)
        model = build_model(config, task="causal_lm")
        add_adapter(model, AdapterConfig(bottleneck_size=4, train_head=True))
        assert model.get_output_embeddings().weight.requires_grad is False
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("bottleneck_adapters" in n for n in trainable), family
        assert not any(k.startswith("head.") for k in adapter_state_keys(model)), family


def test_gradient_correction_is_added_to_each_step_and_the_schedule_is_summed() -> None:
    model = tiny_model("bert", num_labels=2)
    disable_dropout(model)
    batch = next(iter(DataLoader(_keyword_task(8, 0), batch_size=8)))
    model(**batch).loss.backward()
    correction = torch.full_like(model.classifier.bias, 0.25)
    expected = model.classifier.bias.detach() - 0.5 * (model.classifier.bias.grad + correction)
    stats = train(model, [batch], max_steps=1, lr=0.5, optimizer="sgd", weight_decay=0.0, warmup_ratio=0.0,
                  max_grad_norm=None, grad_correction={"classifier.bias": correction}, device="cpu")
    assert torch.allclose(model.classifier.bias.detach(), expected, atol=1e-6)
    assert stats.schedule_sum == pytest.approx(1.0)
    # Linear decay over 4 steps without warmup: factors 1, 3/4, 1/2, 1/4.
    assert train(model, [batch], max_steps=4, lr=0.1, warmup_ratio=0.0, device="cpu").schedule_sum == pytest.approx(2.5)
    with pytest.raises(ValueError, match="do not train here: \\['classifier.scale'\\]"):
        train(model, [batch], max_steps=1, grad_correction={"classifier.scale": correction}, device="cpu")
