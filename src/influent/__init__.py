"""influent: influence functions for NLP models.

Sign convention (see README): ``score(z_train, z_query) = g_query^T (H + damping I)^-1 g_train``.
Positive = proponent (up-weighting ``z_train`` lowers the query loss); negative = opponent.
``loss_change = score / n`` is the predicted change of the query loss when ``z_train`` is removed.
"""

__version__ = "0.1.0"
