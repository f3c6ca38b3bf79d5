"""Former home of the factored curvature, kept so that code written against it still imports.

The factored curvature now lives by concern: :mod:`influent.curvature.config` (:class:`FactorConfig`),
:mod:`influent.curvature.strategies` (identity / diagonal / K-FAC / EK-FAC as classes),
:mod:`influent.curvature.fitting` (:func:`fit_factors`, cache, resumable passes in
:mod:`influent.curvature.passes`), :mod:`influent.curvature.factors` (:class:`Factors`, preconditioning),
:mod:`influent.curvature.eigh` and :mod:`influent.curvature.fingerprints`. Consumers use
:class:`influent.factored_influence.FactoredInfluence`; new code should not import this module.
"""

from influent.curvature.config import FISHER_TYPES, FactorConfig
from influent.curvature.eigh import robust_eigh
from influent.curvature.factors import Factors
from influent.curvature.fingerprints import data_fingerprint, model_fingerprint, tensor_fingerprint
from influent.curvature.fitting import FORMAT_VERSION, fit_factors
from influent.curvature.strategies import strategy_names

STRATEGIES = strategy_names()

__all__ = [
    "FISHER_TYPES",
    "FORMAT_VERSION",
    "STRATEGIES",
    "FactorConfig",
    "Factors",
    "data_fingerprint",
    "fit_factors",
    "model_fingerprint",
    "robust_eigh",
    "tensor_fingerprint",
]
