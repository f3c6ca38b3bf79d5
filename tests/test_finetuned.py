"""The fine-tuned classifier on a tiny BERT built in code (no download) and its influence Task."""

from __future__ import annotations

import torch

from influent.curvature.config import FactorConfig
from influent.curvature.fitting import fit_factors
from influent.factored_influence import pairwise_scores, self_scores
from influent.models.finetuned import FinetunedTask, load_finetuned, make_batches, train_finetuned

torch.set_num_threads(1)
WORDS = ["good", "great", "fun", "bad", "dull", "awful", "movie", "the", "a", "plot"]


def tiny_encoder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(tokens)})
    cfg = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    folder = tmp_path / "enc"
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def toy_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        y = int(torch.randint(0, 2, (1,), generator=g))
        pool = WORDS[:3] if y else WORDS[3:6]
        k = int(torch.randint(1, 5, (1,), generator=g))
        words = [pool[int(i)] for i in torch.randint(0, 3, (k,), generator=g)] + ["the", "movie"]
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


def test_train_save_load_and_influence(tmp_path):
    enc = tiny_encoder(tmp_path)
    tr_x, tr_y = toy_data(64, 0)
    te_x, te_y = toy_data(32, 1)
    out = tmp_path / "ft"
    model, _tok, metrics = train_finetuned(
        tr_x,
        tr_y,
        te_x,
        te_y,
        out,
        encoder=enc,
        last_k=1,
        epochs=30,
        lr=3e-3,
        batch_size=16,
        max_length=16,
        seed=0,
        progress=False,
    )
    assert metrics["test_accuracy"] >= 0.8, metrics
    assert (out / "settings.json").exists() and list((out / "model").glob("*.safetensors"))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("layer.0" in n for n in frozen) and not any("layer.1" in n for n in frozen)

    loaded, tok2, settings = load_finetuned(out)
    assert settings["last_k"] == 1 and settings["seed"] == 0
    batches = make_batches(tok2, tr_x[:16], tr_y[:16], batch_size=8, max_length=16)
    task = FinetunedTask()
    with torch.no_grad():
        torch.testing.assert_close(
            task.model_output(loaded, batches[0]), task.model_output(model.eval(), batches[0])
        )

    f = fit_factors(loaded, task, batches, FactorConfig(strategy="ekfac", modules="mlp"), progress=False)
    assert len(f.names) == 4
    s = pairwise_scores(loaded, task, f, batches[:1], batches, progress=False)
    assert s.shape == (8, 16) and torch.isfinite(s).all()
    torch.testing.assert_close(
        self_scores(loaded, task, f, batches, progress=False)[:8], s[:, :8].diagonal(), rtol=1e-4, atol=1e-6
    )


def test_training_is_seeded(tmp_path):
    enc = tiny_encoder(tmp_path)
    tr_x, tr_y = toy_data(32, 0)
    kw = {"encoder": enc, "last_k": None, "epochs": 1, "lr": 1e-3, "batch_size": 8, "max_length": 16,
          "seed": 3, "progress": False}
    m1, tok, _ = train_finetuned(tr_x, tr_y, tr_x[:8], tr_y[:8], None, **kw)
    m2, _, _ = train_finetuned(tr_x, tr_y, tr_x[:8], tr_y[:8], None, **kw)
    b = make_batches(tok, tr_x[:8], tr_y[:8], batch_size=8, max_length=16)[0]
    with torch.no_grad():
        torch.testing.assert_close(
            FinetunedTask().model_output(m1.eval(), b), FinetunedTask().model_output(m2.eval(), b)
        )
