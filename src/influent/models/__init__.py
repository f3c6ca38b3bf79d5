"""Models: frozen text encoders with pooling and an embedding cache, classifier heads, language models."""

from influent.models.encoder import (
    DEFAULT_ENCODER,
    EmbeddingCache,
    TextEncoder,
    load_encoder,
    pool,
    resolve_encoder_path,
)

__all__ = [
    "DEFAULT_ENCODER",
    "EmbeddingCache",
    "TextEncoder",
    "load_encoder",
    "pool",
    "resolve_encoder_path",
]
