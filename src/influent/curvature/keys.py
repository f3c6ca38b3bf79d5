"""Names of the tensors stored in a factor file and in a fit's partial sums (``"<module>::<what>"``).

Every reader and writer of fitted factors and cached token factors (:mod:`influent.curvature.strategies`,
:mod:`influent.curvature.factors`, :mod:`influent.curvature.passes`, :mod:`influent.curvature.token_cache`)
goes through :func:`tensor_key` and these constants, so a stored name is spelled once.
"""

from __future__ import annotations

# fitted factors (factors.safetensors, eigen.safetensors)
UNIT = "unit"  # identity: a placeholder so every module has an entry
DIAG = "diag"  # diagonal: mean squared per-example gradient, [d_out, d_in(+1)]
EIGVEC_A = "eigvec_a"  # K-FAC / EK-FAC: eigenvectors of the activation covariance A, [d_in(+1), d_in(+1)]
EIGVEC_S = "eigvec_s"  # eigenvectors of the output-gradient covariance S, [d_out, d_out]
EIGVAL_A = "eigval_a"  # eigenvalues of A, [d_in(+1)]
EIGVAL_S = "eigval_s"  # eigenvalues of S, [d_out]
LAMBDA = "lambda"  # EK-FAC: corrected eigenvalues, [d_out, d_in(+1)]

# partial sums of a pass (stage-*.safetensors, partial-*.safetensors)
DIAG_SUM = "diag_sum"
A_SUM = "a_sum"
S_SUM = "s_sum"
LAMBDA_SUM = "lambda_sum"
N_TOKENS = "n_tokens"
N_EXAMPLES = "n_examples"
BATCHES_DONE = "__batches_done__"  # in a partial checkpoint: batches summed so far
ORDER = "__order__"  # in a partial checkpoint: the example order of the pass's batches

# training token cache (train-tokens/<key>/batch-*.safetensors)
TOKENS_A = "a"  # activations in the factors' basis, [B, T, d_in(+1)] (stored once for modules sharing them)
TOKENS_G = "g"  # output gradients in the factors' basis, [B, T, d_out]

SEPARATOR = "::"


def tensor_key(module: str, what: str) -> str:
    """The stored name of ``what`` (one of the constants above) for tracked module ``module``."""
    return f"{module}{SEPARATOR}{what}"


def is_key_of(key: str, what: str) -> bool:
    """Whether stored name ``key`` is a ``what`` entry (of any module)."""
    return key.endswith(SEPARATOR + what)
