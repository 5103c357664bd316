"""Statistical fits behind the sparse state: pure functions of tensors, each tested on its own
(tests/fitting). The sites (spt_compile/sites/) own the state and call these at calibration and refits.

    router.py        ridge router: MLP input -> each block's output norm; top-k routing
    balance.py       per-block bias that evens out the router's block shares (ffn_balance)
    compensation.py  rank-r predictors of the skipped blocks' outputs (ffn_compensate)
    clustering.py    co-active hidden units into the same block (ffn_cluster)
    ffn_budget.py    per-layer active-block counts from calibration error curves (ffn_budget)
    pq_codebooks.py  k-means codebooks of the keys for token selection
"""
