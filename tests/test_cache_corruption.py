"""A flipped byte, an emptied or a truncated file in each cache influent keeps for a model (head, split,
fine-tuned checkpoint), end to end: the result equals the clean run's (recomputed, with a one-line
warning) or the run stops with one line (exit 2 through the CLI), never a traceback or a silent change."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from influent import store
from influent.cli import main
from influent.errors import UserError
from influent.pipeline import prepare_finetuned, prepare_head


@pytest.fixture()
def head_kwargs(tiny_encoder_dir, reviews_csv, tmp_path):
    return {"data": str(reviews_csv), "text_column": "review", "label_column": "sentiment",
            "encoder": str(tiny_encoder_dir), "cache_dir": tmp_path / "cache", "l2": 0.01, "progress": False}


def _flip(path, where: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(where * (len(raw) - 1))] ^= 0x04
    path.write_bytes(bytes(raw))


def _damage(path, how: str) -> None:
    if how == "flip":
        _flip(path, 0.9 if path.suffix == ".safetensors" else 0.5)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _warnings(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert all("\n" not in line for line in lines)
    return lines


@pytest.mark.parametrize("name", ["head.safetensors", "head.json"])
@pytest.mark.parametrize("how", ["flip", "empty", "truncate"])
def test_damaged_head_is_retrained_to_the_clean_head(head_kwargs, caplog, name, how):
    clean = prepare_head(**head_kwargs)
    _damage(clean.folder / name, how)
    with caplog.at_level(logging.WARNING):
        again = prepare_head(**head_kwargs)
    assert any("retraining the head" in w for w in _warnings(caplog))
    for a, b in zip(clean.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert again.info["test_accuracy"] == clean.info["test_accuracy"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_head(**head_kwargs)
    assert not _warnings(caplog)  # the retrained head was saved again


def test_head_weights_from_another_save_are_not_used(head_kwargs, caplog):
    clean = prepare_head(**head_kwargs)
    other = prepare_head(**{**head_kwargs, "l2": 0.5})
    (other.folder / "head.safetensors").replace(clean.folder / "head.safetensors")  # intact, but not its own
    with caplog.at_level(logging.WARNING):
        again = prepare_head(**head_kwargs)
    assert torch.equal(again.model.linear.weight, clean.model.linear.weight)
    assert any("not the file its manifest lists" in w for w in _warnings(caplog))


def _split_file(cache):
    (path,) = (cache / "splits").glob("*.json")
    return path


def test_damaged_split_file_is_remade_or_stops_in_one_line(head_kwargs, caplog):
    clean = prepare_head(**head_kwargs)
    path = _split_file(head_kwargs["cache_dir"])
    text = path.read_text()
    path.write_text(text.replace('"train_ids"', '"train_idz"'))  # structure damaged: remade from the seed
    with caplog.at_level(logging.WARNING):
        again = prepare_head(**head_kwargs)
    assert (again.train_idx == clean.train_idx).all() and (again.test_idx == clean.test_idx).all()
    assert any("making the seeded split again" in w for w in _warnings(caplog))
    path.write_text(text[: len(text) // 2])  # truncated: remade
    assert (prepare_head(**head_kwargs).test_idx == clean.test_idx).all()
    body = json.loads(path.read_text())
    first = body["test_ids"][0]
    path.write_text(path.read_text().replace(first, first[:-1] + ("0" if first[-1] != "0" else "1"), 1))
    with pytest.raises(UserError, match="ids not in the corpus") as err:  # an id damaged: cannot guess it
        prepare_head(**head_kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda b: {**b, "test_ids": []}, "test side is empty"),
        (lambda b: {**b, "train_ids": []}, "train side is empty"),
        (lambda b: {**b, "test_ids": b["test_ids"] + b["train_ids"][:3]}, "3 ids are on both sides"),
    ],
    ids=["empty-test", "empty-train", "overlap"],
)
def test_invalid_hand_edited_split_is_one_line(head_kwargs, edit, needle):
    prepare_head(**head_kwargs)
    path = _split_file(head_kwargs["cache_dir"])
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(UserError, match=needle) as err:
        prepare_head(**head_kwargs)
    assert "\n" not in str(err.value)


def test_too_few_examples_to_split_is_one_line(tmp_path, tiny_encoder_dir, capsys):
    data = tmp_path / "two.csv"
    data.write_text("review,sentiment\ngood film,pos\nbad film,neg\n")
    code = main(["train", "--data", str(data), "--text-column", "review", "--label-column", "sentiment",
                 "--encoder", str(tiny_encoder_dir), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "too few" in err and len(err.strip().splitlines()) == 1, err
    # before: "test accuracy nan on 0"


def test_queries_do_not_grow_the_corpus_cache(head_kwargs):
    setup = prepare_head(**head_kwargs)
    root = head_kwargs["cache_dir"] / "embeddings"
    (manifest,) = root.glob("*/manifest.json")
    before = manifest.read_bytes()
    queries = [f"a great film number {i}" for i in range(20)]
    first = torch.cat([setup.embed([q]) for q in queries])
    assert manifest.read_bytes() == before and len(list(manifest.parent.glob("shard-*"))) == 1
    assert torch.allclose(setup.embed(queries), first)  # served by the query cache, same values
    (query_manifest,) = (head_kwargs["cache_dir"] / "query-embeddings").glob("*/manifest.json")
    assert len(store.read_json(query_manifest)["shards"]) <= 16


def test_damaged_embedding_shard_through_the_cli(capsys, caplog, head_kwargs, tmp_path):
    args = ["explain", "--test-index", "2", "--json", "--quiet", "--data", head_kwargs["data"], "--text-column",
            "review", "--label-column", "sentiment", "--encoder", head_kwargs["encoder"], "--cache-dir",
            str(head_kwargs["cache_dir"]), "--l2", "0.01"]
    assert main(args) == 0
    clean = json.loads(capsys.readouterr().out)
    (shard,) = (head_kwargs["cache_dir"] / "embeddings").glob("*/shard-0000.safetensors")
    _flip(shard, 0.95)
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == clean  # before: scores silently changed
    assert "Traceback" not in err and any("recomputed" in w for w in _warnings(caplog))


@pytest.fixture()
def finetuned_kwargs(head_kwargs):
    kw = {k: v for k, v in head_kwargs.items() if k != "l2"}
    return {**kw, "last_k": None, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 16}


FINETUNED_FILES = ["model/model.safetensors", "model/config.json", "tokenizer/tokenizer.json", "metrics.json",
                   "settings.json"]


def test_damaged_finetuned_checkpoint_stops_in_one_line_unless_retrain(finetuned_kwargs):
    clean = prepare_finetuned(**finetuned_kwargs)
    weights = [p.detach().clone() for p in clean.model.parameters()]  # the loaded model maps the file
    for name in FINETUNED_FILES:
        path = clean.folder / name
        original = path.read_bytes()
        for how in ("flip", "truncate"):
            _damage(path, how)
            with pytest.raises(UserError, match="--retrain") as err:
                prepare_finetuned(**finetuned_kwargs)
            assert "\n" not in str(err.value) and name.split("/")[-1] in str(err.value), (name, how)
            path.write_bytes(original)
    (clean.folder / "model" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors missing"):
        prepare_finetuned(**finetuned_kwargs)
    again = prepare_finetuned(**finetuned_kwargs, retrain=True)  # the user allows it: same seeded training
    for a, b in zip(weights, again.model.parameters()):
        assert torch.equal(a, b)
    timing = {"seconds", "seconds_per_example_step"}
    reloaded = prepare_finetuned(**finetuned_kwargs).metrics  # saved intact again
    assert {k: v for k, v in reloaded.items() if k not in timing} == {
        k: v for k, v in clean.metrics.items() if k not in timing
    }
