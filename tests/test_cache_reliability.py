"""Caches that cannot lie (issue #10): checksums on every file, concurrent writers, exact keys, bounded
query cache, read-only caches, checkpoints and interrupts, and the encoder's input checks.

The truth each test checks against is independent of the cache: the encoder run with no cache, a clean
first run, or the value each writer put in.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time

import numpy as np
import pytest
import torch

from influent import store
from influent.data.corpus import text_id
from influent.errors import CacheCorruptError, UserError
from influent.models.encoder import EmbeddingCache, TextEncoder, content_id, load_encoder

TEXTS = ["the movie was good", "a very long and boring film", "great", "the actor is not good", "bad film"]
WORDS = ["the", "a", "movie", "film", "is", "was", "good", "bad", "great", "very", "long", "and", "boring",
         "actor", "not", "we", "will", "cut", "taxes", "apple", "Apple"]
FULL_WIDTH = sorted(set("ｗｅｗｉｌｌｃｕｔｔａｘｅｓ"))


def _bert_folder(folder, words, lower: bool, positions: int = 64):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=lower)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=positions)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cased_dir(tmp_path_factory):
    """A tiny cased BERT whose vocabulary holds both 'Apple' and 'apple' and the full-width letters."""
    extra = [*FULL_WIDTH, *(f"##{c}" for c in FULL_WIDTH)]
    return _bert_folder(tmp_path_factory.mktemp("cased"), WORDS + extra, lower=False)


@pytest.fixture()
def encoder(cased_dir):
    return TextEncoder(str(cased_dir), max_length=32, batch_size=2)


def _forwards(encoder: TextEncoder) -> list[int]:
    calls = [0]
    encoder.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _flip(path, where: float = 0.5) -> None:
    """Flip one bit of the byte at relative position ``where`` of ``path``."""
    raw = bytearray(path.read_bytes())
    raw[int(where * (len(raw) - 1))] ^= 0x04
    path.write_bytes(bytes(raw))


def _one_line(caplog_or_msg) -> None:
    text = str(caplog_or_msg)
    assert "\n" not in text.strip() and "Traceback" not in text, text


# -- store ------------------------------------------------------------------------------------------


def test_every_flipped_byte_of_a_tensor_file_is_caught(tmp_path):
    path = tmp_path / "t.safetensors"
    store.write_tensors(path, {"x": torch.randn(4, 3), "y": torch.arange(5)}, {"ids": ["a", "b"]})
    clean = path.read_bytes()
    for i in range(len(clean)):
        damaged = bytearray(clean)
        damaged[i] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(CacheCorruptError, match="t.safetensors") as err:
            store.read_tensors(path)
        _one_line(err.value)
    for cut in (0, 7, len(clean) // 2, len(clean) - 1):
        path.write_bytes(clean[:cut])
        with pytest.raises(CacheCorruptError):
            store.read_tensors(path)


def test_json_checksum_catches_value_changes_and_allows_formatting(tmp_path):
    path = tmp_path / "c.json"
    store.write_json(path, {"dim": 384, "ids": ["a", "b"], "x": 0.1})
    body = json.loads(path.read_text())
    path.write_text(json.dumps(body))  # reformatted, same values: still verified
    assert store.read_json(path) == {"dim": 384, "ids": ["a", "b"], "x": 0.1}
    for change in ({"dim": 385}, {"ids": ["a"]}, {"x": 0.10000001}):
        path.write_text(json.dumps({**body, **change}))
        with pytest.raises(CacheCorruptError, match="checksum mismatch"):
            store.read_json(path)
    for damaged in ("", "{", '{"dim": 384}'):
        path.write_text(damaged)
        with pytest.raises(CacheCorruptError, match="c.json"):
            store.read_json(path)


# -- concurrency ------------------------------------------------------------------------------------


def _writer(root: str, worker: int, n: int, barrier) -> None:
    cache = EmbeddingCache(root)
    barrier.wait()
    for i in range(n):
        j = (i // 10) % 5  # every worker also writes the same 5 ids shared-0..4, with the same values
        ids = [f"w{worker}-{i}"] if i % 10 else [f"w{worker}-{i}", f"shared-{j}"]
        rows = torch.tensor([[float(worker), float(i), 1.0]]) if i % 10 else torch.tensor(
            [[float(worker), float(i), 1.0], [-1.0, float(j), 2.0]]
        )
        cache.put(ids, rows, "key")


def test_concurrent_writers_lose_nothing_and_never_mix_rows(tmp_path):
    workers, n = 4, 50
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, n, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ids = [f"w{w}-{i}" for w in range(workers) for i in range(n)] + [f"shared-{j}" for j in range(5)]
    found, rows = EmbeddingCache(tmp_path).get(ids, "key")
    assert found.all()  # before the lock: 40 of 300 lost in the run
    expected = torch.tensor([[w, i, 1.0] for w in range(workers) for i in range(n)] + [[-1.0, j, 2.0] for j in range(5)])
    assert torch.equal(rows, expected)  # before: 10 ids returned another text's embedding
    manifest = store.read_json(EmbeddingCache(tmp_path).folder("key") / "manifest.json")
    listed = [i for s in manifest["shards"] for i in s["ids"]]
    assert len(listed) == len(set(listed)) == len(ids)  # each id stored once


# -- exact keys -------------------------------------------------------------------------------------


def test_full_width_and_case_get_their_own_entries_and_embeddings(encoder, tmp_path):
    full, plain = "ｗｅ ｗｉｌｌ ｃｕｔ ｔａｘｅｓ", "we will cut taxes"
    assert text_id(full) == text_id(plain)  # the corpus id still de-duplicates them
    assert content_id(full) != content_id(plain) and content_id("Apple") != content_id("apple")
    cache = EmbeddingCache(tmp_path)
    for first, second in ((full, plain), ("Apple pie", "apple pie")):
        truth = encoder.embed([first, second], progress=False)  # no cache
        assert not torch.allclose(truth[0], truth[1])
        a = encoder.embed([first], cache=cache, progress=False)  # the order of the report
        b = encoder.embed([second], cache=cache, progress=False)
        assert torch.allclose(a[0], truth[0], atol=1e-6) and torch.allclose(b[0], truth[1], atol=1e-6)
        again = encoder.embed([second, first], cache=cache, progress=False)
        assert torch.equal(again[0], b[0]) and torch.equal(again[1], a[0])


def test_key_follows_the_weights_exactly(cased_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    twin = tmp_path / cased_dir.name
    shutil.copytree(cased_dir, twin)
    assert TextEncoder(str(twin), max_length=32).key() == TextEncoder(str(cased_dir), max_length=32).key()
    weights = twin / "model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-6  # one weight, one ulp-scale change
    save_file(state, str(weights), metadata={"format": "pt"})
    assert TextEncoder(str(twin), max_length=32).key() != TextEncoder(str(cased_dir), max_length=32).key()


# -- corruption of embedding caches -----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip-shard", "truncate-shard", "flip-manifest", "empty-manifest",
                                    "manifest-without-shards", "manifest-wrong-dim", "delete-shard"])
def test_damaged_embedding_cache_gives_the_clean_embeddings(encoder, tmp_path, caplog, damage):
    cache = EmbeddingCache(tmp_path)
    clean = encoder.embed(TEXTS, cache=cache, progress=False)
    folder = cache.folder(encoder.key())
    shard, manifest = folder / "shard-0000.safetensors", folder / "manifest.json"
    body = json.loads(manifest.read_text())
    if damage == "flip-shard":
        _flip(shard, 0.9)  # inside the embeddings
    elif damage == "truncate-shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "flip-manifest":
        _flip(manifest, 0.5)
    elif damage == "empty-manifest":
        manifest.write_text("")
    elif damage == "manifest-without-shards":
        manifest.write_text(json.dumps({k: v for k, v in body.items() if k != "shards"}))
    elif damage == "manifest-wrong-dim":
        manifest.write_text(json.dumps({**body, "dim": body["dim"] + 1}))
    else:
        shard.unlink()
    calls = _forwards(encoder)
    with caplog.at_level(logging.WARNING):  # a fresh cache object, as a new process would have
        out = encoder.embed(TEXTS, cache=EmbeddingCache(tmp_path), progress=False)
    assert torch.allclose(out, clean, atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and all("\n" not in w for w in warnings)
    manifest_only = damage in ("flip-manifest", "empty-manifest", "manifest-without-shards", "manifest-wrong-dim")
    assert calls[0] == (0 if manifest_only else 3)  # a manifest is rebuilt from the intact shards
    calls[0] = 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(encoder.embed(TEXTS, cache=EmbeddingCache(tmp_path), progress=False), out)
    assert calls[0] == 0 and not caplog.records  # repaired on disk: no warning, nothing recomputed


def test_shard_holding_other_ids_is_not_believed(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path)
    first = encoder.embed(TEXTS[:2], cache=cache, progress=False)
    encoder.embed(TEXTS[2:4], cache=cache, progress=False)
    folder = cache.folder(encoder.key())
    # another process's shard file under this shard's name (what the unlocked cache of the issue produced)
    (folder / "shard-0001.safetensors").replace(folder / "shard-0000.safetensors")
    out = encoder.embed(TEXTS[:2], cache=EmbeddingCache(tmp_path), progress=False)
    assert torch.allclose(out, first, atol=1e-6)


# -- query cache, read-only caches, checkpoints, interrupts ------------------------------------------


def test_query_cache_is_bounded(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path, max_rows=12, max_shards=4)
    queries = [f"{w} film" for w in WORDS[:20]]
    for q in queries:
        encoder.embed([q], cache=cache, progress=False)
    manifest = store.read_json(cache.folder(encoder.key()) / "manifest.json")
    assert len(manifest["shards"]) <= 4
    kept = [i for s in manifest["shards"] for i in s["ids"]]
    assert len(kept) <= 12 and kept[-1] == content_id(queries[-1])
    assert len(list(cache.folder(encoder.key()).glob("shard-*"))) == len(manifest["shards"])
    found, rows = cache.get([content_id(q) for q in queries], encoder.key())
    truth = encoder.embed([q for q, f in zip(queries, found) if f], progress=False)
    assert torch.allclose(rows, truth, atol=1e-6)


def test_read_only_cache_serves_reads_and_warns_once(encoder, tmp_path, monkeypatch, caplog):
    import influent.models.embedding_cache as ec

    cache = EmbeddingCache(tmp_path)
    clean = encoder.embed(TEXTS, cache=cache, progress=False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ec, "write_tensors", refuse)
    monkeypatch.setattr(ec, "write_json", refuse)
    monkeypatch.setattr(ec.FileLock, "acquire", refuse)
    ro = EmbeddingCache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(encoder.embed(TEXTS, cache=ro, progress=False), clean)
        assert not attempts and not caplog.records  # all cached: no write attempted
        new = encoder.embed(["great film", "bad actor"], cache=ro, progress=False)
        more = encoder.embed(["very good", "not bad"], cache=ro, progress=False)
    assert torch.allclose(new, encoder.embed(["great film", "bad actor"], progress=False), atol=1e-6)
    assert more.shape == (2, encoder.dim)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "not writable" in warnings[0]


def test_checkpoint_by_time_and_truthful_interrupt(encoder, tmp_path, caplog):
    cache = EmbeddingCache(tmp_path)
    encoder.save_every, encoder.save_seconds = 10_000, 0.0  # count never reached: time decides
    real = encoder._embed_batch
    calls = [0]

    def interrupted(texts):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(texts)

    encoder._embed_batch = interrupted
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        encoder.embed(TEXTS, cache=cache, progress=False)
    message = caplog.records[-1].getMessage()
    assert "4 of 5 embeddings are saved" in message and "the other 1" in message
    manifest = store.read_json(cache.folder(encoder.key()) / "manifest.json")
    assert len(manifest["shards"]) == 2  # one checkpoint per batch (save_seconds = 0)
    encoder._embed_batch = real
    forwards = _forwards(encoder)
    out = encoder.embed(TEXTS, cache=cache, progress=False)
    assert forwards[0] == 1  # the rerun embeds only the one text not saved
    assert torch.allclose(out, encoder.embed(TEXTS, progress=False), atol=1e-6)


def test_interrupt_without_cache_says_nothing_saved(encoder, caplog, monkeypatch):
    def interrupt(texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(encoder, "_embed_batch", interrupt)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        encoder.embed(TEXTS, progress=False)
    assert "nothing saved" in caplog.records[-1].getMessage()


# -- encoder input checks ---------------------------------------------------------------------------


def test_unknown_encoder_fails_at_once_in_one_line(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match="unknown model name or path: no-such-org/no-such-model-xyz") as err:
        load_encoder("no-such-org/no-such-model-xyz")  # no HF_HUB_OFFLINE: must not retry the hub
    assert time.perf_counter() - start < 10  # before: about 25 s (52 s on this machine) of retries
    _one_line(err.value)
    assert err.value.field == "encoder"
    with pytest.raises(UserError, match="no such folder"):
        load_encoder(str(tmp_path / "not" / "here"))


def test_max_length_beyond_positions_is_a_user_error(cased_dir):
    with pytest.raises(UserError, match="max_length 65 is more than") as err:
        TextEncoder(str(cased_dir), max_length=65)  # a 64-position encoder
    assert err.value.field == "max_length"
    assert TextEncoder(str(cased_dir), max_length=64).max_length == 64


def test_texts_without_real_tokens_are_rejected_with_their_rows(encoder):
    with pytest.raises(UserError, match="query text has no content") as err:
        encoder.embed(["\u200b\u200b \u200b"], progress=False, what="query text")
    _one_line(err.value)
    with pytest.raises(UserError, match="no content"):
        encoder.embed(["\U0001f600"], progress=False)  # a lone emoji: [UNK] only
    with pytest.raises(UserError, match=r"2 corpus texts have no content .*corpus texts 2, 4 ") as err:
        encoder.embed(["good film", "\u200b", "bad", "\U0001f600"], progress=False, what="corpus text")
    _one_line(err.value)
    assert encoder.embed(["\U0001f600 good"], progress=False).shape == (1, encoder.dim)  # some content: fine


def test_found_mask_matches_what_was_stored(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put(["a", "b"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "k")
    found, rows = cache.get(["b", "x", "a"], "k")
    assert found.tolist() == [True, False, True]
    assert torch.equal(rows, torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    assert np.array_equal(cache.get([], "k")[0], np.zeros(0, bool))


def test_contentless_corpus_texts_are_named_by_their_file_rows(encoder, tmp_path):
    from influent.data import load_corpus

    # data rows 1..7: row 2 has no label (dropped) and row 4 repeats row 1 (dropped), so the contentless
    # texts sit at corpus positions 3 and 5 but at file rows 5 and 7
    lines = ["text,label", "good film,1", "no label here,", "bad film,0", "good film,1", "\u200b,0", "bad,1",
             "\U0001f600,0"]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "d.csv"))
    assert corpus.rows == [1, 3, 5, 6, 7]
    assert corpus.subset([4, 0]).rows == [7, 1]
    for cache in (None, EmbeddingCache(tmp_path / "cache")):  # with a cache too: its reads must not mix in
        with pytest.raises(UserError, match=r"2 corpus texts have no content .*rows 5, 7 ") as err:
            encoder.embed(corpus.texts, cache=cache, progress=False, what="corpus text", source_rows=corpus.rows)
        _one_line(err.value)
