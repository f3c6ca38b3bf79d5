"""Candidate filtering (Grosse et al. 2023): keep the training texts most related to a query before scoring.

``tfidf``: cosine similarity of scikit-learn TF-IDF vectors (the vectoriser is fitted on the training texts
once per :class:`CandidateFilter` and kept); ``bm25``: Okapi BM25 from the ``bm25s`` package (index built
once); ``all``: no filter. Ties are broken by corpus position (lower first), so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from influent.errors import UserError

METHODS = ("tfidf", "bm25", "all")


class CandidateFilter:
    """Ranks a fixed list of training texts by lexical relevance to a query text.

    Args:
        texts: the training texts (position = index returned).
    """

    def __init__(self, texts: Sequence[str]):
        if not texts:
            raise UserError("no training texts to filter", field="data")
        self.texts = list(texts)
        self._tfidf = None
        self._bm25 = None

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
        from sklearn.feature_extraction.text import TfidfVectorizer

        if self._tfidf is None:
            vectorizer = TfidfVectorizer(sublinear_tf=True)
            try:
                matrix = vectorizer.fit_transform(self.texts)
            except ValueError:  # empty vocabulary (only stop words / punctuation)
                vectorizer, matrix = None, None
            self._tfidf = (vectorizer, matrix)
        vectorizer, matrix = self._tfidf
        if vectorizer is None:
            return np.zeros(len(self.texts))
        q = vectorizer.transform([query])
        return np.asarray((matrix @ q.T).toarray()).ravel().astype(np.float64)  # rows are L2-normalised

    def _bm25_scores(self, query: str) -> np.ndarray:
        import bm25s

        if self._bm25 is None:
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(self.texts, stopwords=None, show_progress=False), show_progress=False)
            self._bm25 = retriever
        tokens = bm25s.tokenize([query], stopwords=None, show_progress=False, return_ids=False)[0]
        if not tokens:
            return np.zeros(len(self.texts))
        return np.asarray(self._bm25.get_scores(tokens), dtype=np.float64)
