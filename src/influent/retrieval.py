"""Candidate filtering (Grosse et al. 2023): keep the training texts most related to a query before scoring.

``tfidf``: cosine similarity of scikit-learn TF-IDF vectors (word unigrams, sublinear tf, l2-normalised rows,
fitted on the training texts); ``bm25``: Okapi BM25 from the ``bm25s`` package (its defaults: Lucene
variant, k1 = 1.5, b = 0.75, no stop words); ``all``: no filter. Ties are broken by corpus position (lower
first), so the result is deterministic.

Each index is built once per :class:`CandidateFilter` and, with ``cache_dir``, once per corpus: it is kept
under ``<cache_dir>/retrieval/<method>-<key>/`` (``index.safetensors``: the sparse matrix as CSR / CSC arrays,
plus the idf vector for TF-IDF; ``index.json``: the vocabulary and settings, pinning the checksum of the
tensors file; atomic, checksummed writes through :mod:`influent.store`, nothing pickled). The key is a
fingerprint of the training texts, the method's settings and the library version. A cache entry that cannot
be read is rebuilt with a one-line warning, never used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from influent import store
from influent.errors import CacheCorruptError, UserError

METHODS = ("tfidf", "bm25", "all")
INDEX_FORMAT = 1
TENSORS_FILE = "index.safetensors"
MANIFEST_FILE = "index.json"
TFIDF_SETTINGS = {"sublinear_tf": True}


def build_tfidf(texts: Sequence[str]):
    """``(fitted TfidfVectorizer, CSR matrix [n, vocabulary])``, or ``(None, None)`` for an empty vocabulary."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(**TFIDF_SETTINGS)
    try:
        return vectorizer, vectorizer.fit_transform(list(texts))
    except ValueError:  # empty vocabulary (only stop words / punctuation)
        return None, None


def build_bm25(texts: Sequence[str]):
    """A ``bm25s.BM25`` index of ``texts`` (its default settings)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(texts), stopwords=None, show_progress=False), show_progress=False)
    return retriever


def _tfidf_to_store(index) -> tuple[dict, dict]:
    vectorizer, matrix = index
    if vectorizer is None:
        return {"empty": torch.zeros(0)}, {"empty": True}
    tensors = {"data": torch.from_numpy(matrix.data), "indices": torch.from_numpy(matrix.indices.astype(np.int64)),
               "indptr": torch.from_numpy(matrix.indptr.astype(np.int64)), "idf": torch.from_numpy(vectorizer.idf_)}
    meta = {"empty": False, "shape": list(matrix.shape),
            "vocabulary": {term: int(i) for term, i in vectorizer.vocabulary_.items()}}
    return tensors, meta


def _tfidf_from_store(tensors: dict, meta: dict):
    from scipy.sparse import csr_matrix
    from sklearn.feature_extraction.text import TfidfVectorizer

    if meta["empty"]:
        return None, None
    matrix = csr_matrix((tensors["data"].numpy(), tensors["indices"].numpy(), tensors["indptr"].numpy()),
                        shape=tuple(meta["shape"]))
    vectorizer = TfidfVectorizer(**TFIDF_SETTINGS, vocabulary=meta["vocabulary"])
    vectorizer.idf_ = tensors["idf"].numpy()
    return vectorizer, matrix


def _bm25_to_store(retriever) -> tuple[dict, dict]:
    scores = retriever.scores
    tensors = {k: torch.from_numpy(np.ascontiguousarray(scores[k])) for k in ("data", "indices", "indptr")}
    params = {"k1": retriever.k1, "b": retriever.b, "delta": retriever.delta, "method": retriever.method,
              "idf_method": retriever.idf_method, "dtype": retriever.dtype, "int_dtype": retriever.int_dtype}
    return tensors, {"params": params, "num_docs": int(scores["num_docs"]), "vocabulary": retriever.vocab_dict}


def _bm25_from_store(tensors: dict, meta: dict):
    import bm25s

    retriever = bm25s.BM25(**meta["params"])
    if retriever.method in retriever.methods_requiring_nonoccurrence:
        raise CacheCorruptError(f"BM25 variant {retriever.method} is not cached")
    retriever.vocab_dict = dict(meta["vocabulary"])
    retriever.unique_token_ids_set = set(retriever.vocab_dict.values())
    retriever.scores = {**{k: v.numpy() for k, v in tensors.items()}, "num_docs": meta["num_docs"]}
    retriever.nonoccurrence_array = None
    return retriever


_FORMATS = {"tfidf": (_tfidf_to_store, _tfidf_from_store), "bm25": (_bm25_to_store, _bm25_from_store)}


def index_key(texts: Sequence[str], method: str) -> str:
    """Fingerprint of the corpus, the method's settings and the library that builds its index."""
    if method == "tfidf":
        import sklearn

        settings = {**TFIDF_SETTINGS, "sklearn": sklearn.__version__}
    else:
        import bm25s

        settings = {"bm25s": bm25s.__version__, "stopwords": None}
    return store.fingerprint(INDEX_FORMAT, method, settings, list(texts))


def cached_index(texts: Sequence[str], method: str, cache_dir: str | Path | None):
    """The ``method`` index of ``texts``: read from ``cache_dir`` when there, else built (and written)."""
    build = build_tfidf if method == "tfidf" else build_bm25
    if cache_dir is None:
        return build(texts)
    to_store, from_store = _FORMATS[method]
    folder = Path(cache_dir) / "retrieval" / f"{method}-{index_key(texts, method)}"
    if (folder / MANIFEST_FILE).exists():
        try:
            meta = store.read_json(folder / MANIFEST_FILE)
            tensors = store.read_tensors_with_metadata(folder / TENSORS_FILE, expect_sha256=meta["tensors_sha256"])[0]
            return from_store(tensors, meta)
        except (CacheCorruptError, OSError, KeyError, ValueError, TypeError) as exc:
            warnings.warn(f"candidate index {folder} is damaged ({type(exc).__name__}); rebuilding", stacklevel=2)
    index = build(texts)
    tensors, meta = to_store(index)
    meta["tensors_sha256"] = store.write_tensors(folder / TENSORS_FILE, tensors)
    store.write_json(folder / MANIFEST_FILE, meta)  # written last: marks a complete entry
    return index


class CandidateFilter:
    """Ranks a fixed list of training texts by lexical relevance to a query text.

    Args:
        texts: the training texts (position = index returned).
        cache_dir: cache root of the indexes (None: built in memory, not kept).
    """

    def __init__(self, texts: Sequence[str], cache_dir: str | Path | None = None):
        if not texts:
            raise UserError("no training texts to filter", field="data")
        self.texts = list(texts)
        self.cache_dir = cache_dir
        self._index: dict[str, object] = {}

    def index(self, method: str):
        """The ``tfidf`` or ``bm25`` index (built, or read from the cache, on first use)."""
        if method not in self._index:
            self._index[method] = cached_index(self.texts, method, self.cache_dir)
        return self._index[method]

    def relevance(self, query: str, method: str) -> np.ndarray:
        """Relevance of every training text to ``query`` (``[n]`` float64; larger = more related)."""
        if method == "tfidf":
            return self._tfidf_scores(query)
        if method == "bm25":
            return self._bm25_scores(query)
        if method == "all":
            return np.zeros(len(self.texts))
        raise UserError(f"unknown candidates method {method!r} (expected one of {', '.join(METHODS)})",
                        field="candidates_method")

    def top(self, query: str, k: int, method: str) -> np.ndarray:
        """Indices of the ``k`` most relevant training texts, most relevant first (``all``: every index).

        Raises:
            UserError: (field ``candidates``) ``k`` below 1 or above the number of training texts.
        """
        n = len(self.texts)
        if not 1 <= k <= n:
            raise UserError(f"candidates must be between 1 and the {n} training sequences, got {k}",
                            field="candidates")
        if method == "all":
            self.relevance(query, method)
            return np.arange(n)
        scores = self.relevance(query, method)
        order = np.lexsort((np.arange(n), -scores))  # by score descending, then position
        return order[:k]

    def _tfidf_scores(self, query: str) -> np.ndarray:
        vectorizer, matrix = self.index("tfidf")
        if vectorizer is None:
            return np.zeros(len(self.texts))
        q = vectorizer.transform([query])
        return np.asarray((matrix @ q.T).toarray()).ravel().astype(np.float64)  # rows are L2-normalised

    def _bm25_scores(self, query: str) -> np.ndarray:
        import bm25s

        retriever = self.index("bm25")
        tokens = bm25s.tokenize([query], stopwords=None, show_progress=False, return_ids=False)[0]
        if not tokens:
            return np.zeros(len(self.texts))
        return np.asarray(retriever.get_scores(tokens), dtype=np.float64)
