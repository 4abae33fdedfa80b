"""Data reading, tokenization and batching; TOML configuration files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import datasets
import pytest
from conftest import tiny_config

from fed_adapters.configuration import ConfigError, apply_override, from_mapping, load_toml, to_toml
from fed_adapters.federated.config import DataSection
from fed_adapters.federated import task  # its test_data, imported bare, would be collected as a test
from fed_adapters.data import DATA_ROOT_ENV, DataError, TextColumns, load_split, make_loader, tokenize_dataset
from fed_adapters.modeling import load_tokenizer

ROWS = [
    {"text": "a fine film", "other": "indeed", "label": 1},
    {"text": "dull and far too long for what it has to say", "other": "no", "label": 0},
    {"text": "great", "other": "yes", "label": 1},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()  # the packaged MiniLM tokenizer: no Hub access needed


def _write(directory, fmt: str, split: str = "train") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    frame = datasets.Dataset.from_list(ROWS)
    path = directory / f"{split}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        frame.to_csv(str(path), index=False)
    else:
        frame.to_parquet(str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_folders_and_files_in_every_format(tmp_path, fmt: str) -> None:
    _write(tmp_path / "set", fmt)
    by_folder = load_split(str(tmp_path / "set"), "train")
    by_file = load_split(str(tmp_path / "set" / f"train.{fmt}"), "ignored-for-files")
    assert by_folder["text"] == by_file["text"] == [r["text"] for r in ROWS]
    assert by_folder["label"] == [1, 0, 1]


def test_data_root_from_argument_and_environment(tmp_path, monkeypatch) -> None:
    _write(tmp_path / "root" / "mine", "jsonl", split="validation")
    assert len(load_split("mine", "validation", data_root=tmp_path / "root")) == 3
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "root"))
    assert len(load_split("mine", "validation")) == 3


def test_missing_split_unknown_type_and_unreachable_hub_are_clear(tmp_path) -> None:
    _write(tmp_path / "set", "jsonl")
    with pytest.raises(DataError, match="no file for split 'test' in .*set; it holds \\['train.jsonl'\\]"):
        load_split(str(tmp_path / "set"), "test")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        load_split(str(tmp_path / "data.txt"), "train")
    with pytest.raises(DataError, match="cannot load data set 'nobody/nothing'.*set the data root"):
        load_split("nobody/nothing", "train")


def test_tokenization_pairs_labels_and_dynamic_padding(tokenizer) -> None:
    dataset = datasets.Dataset.from_list(ROWS)
    single = tokenize_dataset(dataset, tokenizer, TextColumns(), max_length=32, num_labels=2)
    pair = tokenize_dataset(dataset, tokenizer, TextColumns(text_pair="other"), max_length=32, num_labels=2)
    assert single.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert single["labels"] == [1, 0, 1]
    assert all(p.count(tokenizer.sep_token_id) == 2 for p in pair["input_ids"])
    assert all(s.count(tokenizer.sep_token_id) == 1 for s in single["input_ids"])
    assert max(len(ids) for ids in tokenize_dataset(dataset, tokenizer, max_length=4)["input_ids"]) == 4
    batches = list(make_loader(single, tokenizer, batch_size=2))
    lengths = [len(ids) for ids in single["input_ids"]]
    assert batches[0]["input_ids"].shape == (2, max(lengths[:2]))  # padded to the longest in the batch
    assert batches[1]["input_ids"].shape == (1, lengths[2])


def test_tokenized_cache_is_keyed_by_every_setting(tmp_path, tokenizer) -> None:
    """A file-backed set's tokenization is cached on disk under our fingerprint: a changed setting must miss it."""
    _write(tmp_path / "set", "jsonl")
    dataset = load_split(str(tmp_path / "set"), "train")
    long, again = (tokenize_dataset(dataset, tokenizer, max_length=32) for _ in range(2))
    short = tokenize_dataset(dataset, tokenizer, max_length=4)
    pair = tokenize_dataset(dataset, tokenizer, TextColumns(text_pair="other"), max_length=32)
    assert long._fingerprint == again._fingerprint and long.cache_files  # cached, and found again
    assert len({long._fingerprint, short._fingerprint, pair._fingerprint}) == 3
    assert max(map(len, short["input_ids"])) == 4 < max(map(len, long["input_ids"])) < max(map(len, pair["input_ids"]))


def test_shuffling_is_seeded(tokenizer) -> None:
    dataset = tokenize_dataset(datasets.Dataset.from_list(ROWS * 10), tokenizer)
    order = lambda seed: [b["input_ids"][0].tolist() for b in make_loader(dataset, tokenizer, 1, shuffle=True, seed=seed)]
    assert order(3) == order(3) and order(3) != order(4)


def test_missing_columns_and_bad_labels(tokenizer) -> None:
    dataset = datasets.Dataset.from_list(ROWS)
    with pytest.raises(DataError, match="column\\(s\\) \\['sentence'\\] not in the data set; it has \\['text', 'other', 'label'\\]"):
        tokenize_dataset(dataset, tokenizer, TextColumns(text="sentence"))
    with pytest.raises(DataError, match="labels \\[1\\] in column 'label' are outside \\[0, 1\\)"):
        tokenize_dataset(dataset, tokenizer, num_labels=1)
    with_gap = [{**row, "text": None if i == 1 else row["text"]} for i, row in enumerate(ROWS)]
    with pytest.raises(DataError, match="text column 'text' has 1 missing value\\(s\\) .* fill them"):
        tokenize_dataset(datasets.Dataset.from_list(with_gap), tokenizer, num_labels=2)
    assert len(tokenize_dataset(datasets.Dataset.from_list(with_gap).select([0]), tokenizer, num_labels=2)) == 1
    numbers = [{**row, "text": i} for i, row in enumerate(ROWS)]
    with pytest.raises(DataError, match="text column 'text' holds Value\\('int64'\\), not text"):
        tokenize_dataset(datasets.Dataset.from_list(numbers), tokenizer, num_labels=2)
    for labels, shown in (([True, False], "True, False"), ([1.0, 0.0], "1.0, 0.0"), (["pos", "neg"], "'pos', 'neg'")):
        rows = [{**row, "label": value} for row, value in zip(ROWS, labels * len(ROWS))]
        with pytest.raises(DataError, match=f"labels in column 'label' must be integer class ids 0..1, got {shown}; map"):
            tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, num_labels=2)


@dataclass
class _Inner:
    lr: float = 0.1
    steps: int = 3


@dataclass
class _Outer:
    name: str
    inner: _Inner = field(default_factory=_Inner)
    items: list[_Inner] = field(default_factory=list)
    optional: int | None = None


def test_config_keys_and_types_are_checked_with_their_path(tmp_path) -> None:
    assert from_mapping(_Outer, {"name": "x", "inner": {"lr": 1}}).inner.lr == 1.0
    with pytest.raises(ConfigError, match="unknown key 'inner.step' \\(did you mean 'steps'\\?\\)"):
        from_mapping(_Outer, {"name": "x", "inner": {"step": 2}})
    with pytest.raises(ConfigError, match="inner.steps must be int, got str 'many'"):
        from_mapping(_Outer, {"name": "x", "inner": {"steps": "many"}})
    with pytest.raises(ConfigError, match="items\\[1\\].lr must be float, got bool True"):
        from_mapping(_Outer, {"name": "x", "items": [{}, {"lr": True}]})
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        from_mapping(_Outer, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "absent.toml", _Outer)
    (tmp_path / "bad.toml").write_text("name = [")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml(tmp_path / "bad.toml", _Outer)


def test_overrides_and_toml_round_trip(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "a"\n[inner]\nlr = 0.5\n')
    config = load_toml(path, _Outer, ["inner.steps=7", "name=b c", "optional=4"])
    assert (config.name, config.inner.lr, config.inner.steps, config.optional) == ("b c", 0.5, 7, 4)
    # A string field takes the text as written, even where it reads as a number, a bool or a date.
    for text in ("2024", "true", "2024-01-01", "1.5"):
        assert load_toml(path, _Outer, [f"name={text}"]).name == text
    with pytest.raises(ConfigError, match="inner.steps must be int, got str 'many'"):
        load_toml(path, _Outer, ["inner.steps=many"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_override({}, "inner.steps")
    import dataclasses

    text = to_toml(dataclasses.asdict(_Outer(name='q"x', items=[_Inner(), _Inner(lr=2.0)])))
    path.write_text(text)
    assert load_toml(path, _Outer) == _Outer(name='q"x', items=[_Inner(), _Inner(lr=2.0)])


def test_a_held_out_subset_is_a_fixed_random_sample_not_the_first_rows(tmp_path) -> None:
    """A split stored in order (one domain or label after another) still gives a held-out subset of every kind,
    the same one for every run seed."""
    rows = [{"text": f"review {i}", "label": int(i >= 50)} for i in range(100)]  # label 0 first, then label 1
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = replace(tiny_config(tmp_path, tmp_path, tmp_path), data=DataSection(source=str(tmp_path), test_size=20))
    subset = task.test_data(config)
    assert len(subset) == 20 and 5 <= sum(subset["label"]) <= 15
    assert task.test_data(replace(config, seed=7))["text"] == subset["text"]
    assert len(task.test_data(replace(config, data=replace(config.data, test_size=0)))) == 100
