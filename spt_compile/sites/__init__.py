"""The sites: per-layer sparse state and the spt:: ops the passes emit.

    attention.py, attention_op.py  AttentionSite (calibration, selection, probes) and spt::attention_site
    attention_graphed.py           spt::attention_graphed: the same for CUDA graphs (fixed shapes, no state)
    mlp.py, mlp_impl.py, mlp_op.py MlpSite (router, clustering, compensation, budgets), the routed MLP's
                                   implementation choice, and spt::mlp_site
    meta.py                        how a call ran, as the forward op tells its backward

Importing this package registers both ops and both site types (registry.SITE_TYPES).
"""

from . import attention, attention_graphed, attention_op, mlp, mlp_op  # noqa: F401
