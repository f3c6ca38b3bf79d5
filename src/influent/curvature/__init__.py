"""Curvature of the training objective and inverse-curvature-vector products."""
