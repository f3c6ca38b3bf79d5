"""A gradient index (LoGra): projected per-example training gradients on disk, queried in one product.

:func:`build_index` writes it (:mod:`influent.index.build`), :class:`GradientIndex` answers queries with a
streaming top-k (:mod:`influent.index.query`), :func:`rerank` rescores the candidates with the unprojected
factored engine. See :mod:`influent.index.projection` for the projection and
:mod:`influent.index.precondition` for the EK-FAC fitted in the projected space.
"""

from influent.index.build import IndexConfig, build_index
from influent.index.query import GradientIndex, TopK, merge_top, rerank

__all__ = ["GradientIndex", "IndexConfig", "TopK", "build_index", "merge_top", "rerank"]
