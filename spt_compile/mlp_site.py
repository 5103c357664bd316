"""The op the MLP pass emits, and the router state behind it.

`spt::mlp_site(x, <12 weight slots>, template, spec, training)` replaces one matched MLP; the first
projection's weight identifies its layer's site (registry.py). Each call it reads the run-time
options, then either runs every block (inside disable(), with sparse_ffn=False, with ffn_active ==
ffn_blocks, or during the first `calibration_steps` calls) or lets the router pick `ffn_active`
blocks per token (hard routing, weight 1) and runs only those.

The router lives here, not in the user's model (their optimizer must not need to know about it): a
ridge regression from the MLP input to each block's output norm, fitted on tokens seen during
calibration (where every block runs, so the norms come for free) and refitted online from small
token samples on training calls (PROBE_EVERY). The same samples measure how much of the dense MLP
output the chosen blocks capture.

With `ffn_cluster` (default), calibration also groups hidden units that fire together into the same
block (clustering.py): the site keeps a permutation of the units and applies it to the weights it
reads, so the user's weights, LoRA adapters and checkpoints keep their order, and running every block
is still exactly the dense MLP.

With `ffn_dense_first` = k > 0 (run-time, default off), the first k positions of each row (the
input's [batch, seq] dims; a flattened [tokens, d] input has none) get every block: [CLS] in an
encoder, the attention sink in a decoder, tokens every later one reads.

With `ffn_balance` > 0 (run-time, default off), a per-block bias is subtracted from the router's scores
before the top-k: fitted on the buffered tokens (fit_balance) so that each block's share of the
selections moves toward ffn_active / ffn_blocks, refitted whenever the router changes, saved with the
state. Off, the scores are used as they are.

With `ffn_compensate` = r > 0 (run-time), each block a token skips is stood in for by a rank-r linear
prediction of its output, x U_b V_b + m_b (fit_compensation: reduced-rank ridge regression on the
buffered tokens that skip the block, with the current weights, LoRA included), added to the routed
output. The predictors are frozen state like the router: fitted lazily, dropped when the router
changes, saved with the state. Backward: d(x) gets the two GEMMs' transpose
(compensation_input_grad); nothing flows to the predictors, nor through them to the weights. The term
is dense and added beside the routed blocks, so every ffn_impl (Triton included) serves it.

Outputs: y [*, d_out], block_mask [T, n_blocks] bool, perm [F] int64 (hidden units in block order),
pre (the routed blocks' pre-activations, flat: an unbacked size; backward rebuilds the hidden layer
from them instead of recomputing the projections; empty for the reference impl), meta [5 + n_blocks]
int64 on the CPU (mode, dropout seed, whether perm applies, the implementation that ran (IMPL_CODES),
the Triton compute dtype (DTYPE_CODES), tokens per block: backward runs the same implementation and
needs no host sync for the counts), comp (ffn_compensate's U and V, flat, in x's dtype; empty when
nothing was added).

Implementation (`ffn_impl`, resolve_ffn_impl): the Triton kernels (routed_mlp_triton.py), the torch
path (routed_mlp.py) or the per-token reference. Calls the kernels cannot serve run the torch path:
LoRA dropout > 0, and dense calibration calls (they measure each block's output norm on the way).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor

from .context import resolve
from .ffn_budget import block_flops, error_curve
from .options import Options
from .real_rows import rows_of
from .registry import REGISTRY, SITE_TYPES, CallPlan, Site, SiteTemplate, SptStateError

from spt_compile.triton_ops.clustering import cluster_neurons
from spt_compile.triton_ops.reference import routed_mlp_reference
from spt_compile.triton_ops.routed_mlp import (
    MlpSpec,
    MlpWeights,
    block_outputs,
    compensation,
    compensation_input_grad,
    exact_mlp_forward,
    permute_hidden,
    resolve_ffn_impl,
    routed_mlp_backward_saved,
    routed_mlp_forward,
    join_fused,
    split_fused,
    unit_importance,
    unpermute_grads,
)

# meta[0]: DENSE (every block, no routing), ROUTED (only the routed blocks ran), EXACT (exact_forward:
# every block ran forward; backward keeps the chosen pairs, replaying dropout drawn for every token).
DENSE, ROUTED, EXACT = 0, 1, 2
# exact_forward's score of a (token, block) pair for the backward (routed_mlp.IMPORTANCES). "jacobian" by
# measurement: GSM8K probe (docs/quality.md) held-out loss 1.1594 against 1.1517 for the exact block output
# norms, within seed noise, and it needs no extra GEMM.
BACKWARD_IMPORTANCE = "jacobian"
# meta[3]: the implementation that ran forward (backward runs the same one).
IMPL_CODES = {"torch": 0, "triton": 1, "reference": 2}
IMPL_NAMES = {v: k for k, v in IMPL_CODES.items()}
# meta[4]: the dtype the Triton GEMMs ran in (0: x's own; autocast's otherwise), so that backward, which
# usually runs outside the autocast region, computes in the same one.
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPES = {v: k for k, v in DTYPE_CODES.items()}
# mode, seed, permuted, impl, compute dtype, whole (exact_mlp_forward kept every pair and saved the
# pre-activations as [T, F] per projection); then the tokens per block (n_blocks values)
META_FIXED = 6
TOKENS_PER_CALL = 512  # tokens added to the router's sample buffer per calibration call
ROUTER_BUFFER = 2048  # tokens kept for (re)fitting the router
PROBE_TOKENS = 64  # tokens per probe on training calls (every block runs for them)
PROBE_EVERY = 25  # training calls between probes / refits; the first routed call always probes
RIDGE = 1e-3  # ridge strength, relative to the mean feature energy
# The compensation's ridge strength, relative to the mean feature energy (x^2, uncentred, as RIDGE).
# Stronger than the router's by measurement: fitted on 2048 tokens (the buffer), SmolLM2's 4-of-2
# predictors err by 0.393 (rank 64) / 0.388 (rank 16) at 1e-3, 0.338 / 0.373 at 0.1, 0.351 / 0.380
# at 1.0 (benchmarks/research/ffn_compensation.py --fit-tokens 2048 --ridge ...; 0.457 uncompensated).
COMP_RIDGE = 0.1
BALANCE_ITERS = 200  # dual-ascent steps of fit_balance (2048 buffered tokens: a few ms per site)


def fit_router(x: Tensor, norms: Tensor) -> Tensor:
    """Ridge regression from features [x, 1] to block output norms: x [n, d], norms [n, nb]
    -> weights [d + 1, nb] (fp32). Solved in fp64 on the CPU; the bias is not regularised."""
    X = torch.cat([x.double().cpu(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    G = X.T @ X
    d = x.shape[1]
    lam = RIDGE * G.diagonal()[:d].mean().clamp(min=1e-12)
    G[:d, :d] += lam * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(G, X.T @ norms.double().cpu()).float()


def router_scores(x: Tensor, router: Tensor) -> Tensor:
    """x [T, d] -> predicted block output norms [T, nb]."""
    return x.float() @ router[:-1] + router[-1]


def choose_blocks(scores: Tensor, active: int) -> Tensor:
    """Hard top-k routing: [T, nb] scores -> [T, nb] bool mask with `active` True per row."""
    top = scores.topk(active, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def _top_right_vectors(Fm: Tensor, r: int, iters: int = 4) -> Tensor:
    """The top-r right singular vectors of Fm [n, d], as rows [r', d] (r' = min(r, n, d)). For r well
    below the rank, a randomized range finder (Halko et al.: `iters` power steps on r + 8 columns from
    a fixed seed, then an eigendecomposition of size r + 8): a full one of Fm's smaller Gram matrix
    took 2 s per block at d 576 on this CPU, most of a fit."""
    n, d = Fm.shape
    k = r + 8
    if k >= min(n, d):
        if n < d:  # through the smaller Gram matrix
            top = Fm.T @ torch.linalg.eigh(Fm @ Fm.T)[1][:, -r:]
            return (top / top.norm(dim=0).clamp(min=1e-30)).T
        return torch.linalg.eigh(Fm.T @ Fm)[1][:, -r:].T
    gen = torch.Generator(device=Fm.device).manual_seed(0)
    Q = torch.randn(d, k, generator=gen, device=Fm.device, dtype=Fm.dtype)
    for _ in range(iters):
        Q = torch.linalg.qr(Fm.T @ (Fm @ Q)).Q
    B = Fm @ Q  # [n, k]
    return (Q @ torch.linalg.eigh(B.T @ B)[1][:, -r:]).T


def fit_compensation(x: Tensor, outs: Tensor, skipped: Tensor, rank: int,
                     ridge: float = COMP_RIDGE) -> tuple[Tensor, Tensor, Tensor]:
    """Per block, a rank-`rank` linear predictor of its output from x, fitted on the tokens that skip
    it (what it must stand in for there, not on average): x [n, d_in], outs [n, nb, d_out] (each
    block's output), skipped [n, nb] bool -> U [d_in, nb r], V [nb r, d_out], M [nb, d_out] (fp32, CPU;
    routed_mlp.compensation's layout), r = min(rank, d_in, d_out).

    Reduced-rank ridge regression, in fp32 on outs' device (the ridge bounds the condition number
    by about 10 d_in): the ridge solution W from [x, 1] (the bias unregularised, as fit_router;
    strength `ridge`), projected on the top-r right singular vectors of its centred fitted values;
    M keeps the fitted mean. A block no token skips gets zeros (never used)."""
    n, nb, d_out = outs.shape
    d = x.shape[1]
    r = min(rank, d, d_out)
    dev = outs.device
    U = torch.zeros(d, nb * r, device=dev)
    V = torch.zeros(nb * r, d_out, device=dev)
    M = torch.zeros(nb, d_out, device=dev)
    x = x.to(device=dev, dtype=torch.float32)
    skipped = skipped.to(dev)
    for b in range(nb):
        rows = skipped[:, b].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xb, yb = x[rows], outs[rows, b].float()
        mean = xb.mean(0)
        xc = xb - mean
        G = xc.T @ xc
        lam = ridge * (xb * xb).sum(0).mean().clamp(min=1e-12)  # as fit_router's: uncentred energy
        G.diagonal().add_(lam)
        A = torch.linalg.solve(G, xc.T @ (yb - yb.mean(0)))  # [d, d_out]; centring = an unregularised bias
        Vr = _top_right_vectors(xc @ A, r)  # [r', d_out]; r' < r when fewer tokens than r skip the block
        k = Vr.shape[0]
        U[:, b * r : b * r + k] = A @ Vr.T
        V[b * r : b * r + k] = Vr
        M[b] = yb.mean(0) - mean @ U[:, b * r : b * r + k] @ Vr
    return U.cpu(), V.cpu(), M.cpu()


def fit_balance(scores: Tensor, active: int, strength: float, iters: int = BALANCE_ITERS) -> Tensor:
    """Per-block bias c [nb] (fp32) for load balancing: top-`active` of (scores - c) over these tokens
    gives block b a share of the selections moved `strength` of the way from its unbiased share
    toward active / nb. scores [n, nb] (the router's, on its buffered tokens).

    Dual ascent on the counts: a block picked too often has its bias raised, one picked too rarely
    lowered, in steps of the scores' spread that shrink geometrically; the bias with the smallest
    worst miss is kept (counts are integers, so the targets are met only up to a token or so)."""
    S = scores.detach().double().cpu()
    n, nb = S.shape
    c = torch.zeros(nb, dtype=torch.float64)
    if n == 0 or strength <= 0 or active >= nb:
        return c.float()
    counts = choose_blocks(S, active).sum(0).double()
    fair = n * active / nb
    target = (1 - strength) * counts + strength * fair
    spread = S.std(dim=0).mean().clamp(min=1e-12)
    best, best_miss = c.clone(), float((counts - target).abs().max())
    for i in range(iters):
        step = spread * 0.5 * (0.02 ** (i / max(iters - 1, 1)))  # 0.5 -> 0.01 of the spread
        c += step * (counts - target) / fair
        counts = choose_blocks(S - c, active).sum(0).double()
        miss = float((counts - target).abs().max())
        if miss < best_miss:
            best, best_miss = c.clone(), miss
    return (best - best.mean()).float()  # a common shift changes no choice


class MlpSite(Site):
    kind = "mlp"

    def __init__(self, template: SiteTemplate, anchor: Optional[Tensor]):
        super().__init__(template, anchor)
        (self.d_in,) = template.shape
        self.n_blocks = template.options.ffn_blocks
        self.router: Optional[Tensor] = None  # [d_in + 1, n_blocks]
        self.buffer_x = torch.zeros(0, self.d_in)  # router samples (CPU, fp32), oldest first
        self.buffer_y = torch.zeros(0, self.n_blocks)
        self.perm: Optional[Tensor] = None  # [F] hidden units in block order (None: contiguous blocks)
        # ffn_balance: the per-block bias subtracted from the router's scores, and the (strength,
        # active blocks) it was fitted for. Fitted lazily on the buffered tokens at the first routed call
        # that needs it, dropped whenever the router changes.
        self.balance: Optional[Tensor] = None  # [n_blocks]
        self.balance_for: Optional[tuple[float, int]] = None
        # ffn_compensate: (U, V, M) of routed_mlp.compensation and the (rank, active blocks, balance)
        # they were fitted for; fitted lazily like the balance bias, dropped whenever the router changes.
        self.comp: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self.comp_for: Optional[tuple[int, int, float]] = None
        # ffn_budget: the relative squared output error at k = 0 .. n_blocks blocks per token (ffn_budget.py)
        # and one block's matmul FLOPs per token, measured when the routing is fitted. Set at once rather
        # than staged: only the allocation reads them, and a call's plan records the allocation it used.
        self.err_curve: Optional[Tensor] = None  # [n_blocks + 1] fp64
        self.block_flops: Optional[float] = None

    def _fit_routing(self, weights: MlpWeights, spec: MlpSpec, options: Options, seed: int):
        """From the buffered tokens: the unit clustering (if asked) and the router fitted to the
        block output norms of the blocks it defines. Returns (perm, buffer_y, router), or None
        while the buffer holds no token (every one so far was padding-free but empty, or NaN/inf).
        Sets the ffn_budget error curve of that routing on the way (one dense MLP on the buffer)."""
        bx = self.buffer_x
        if bx.shape[0] == 0:
            return None
        perm, by = None, self.buffer_y
        x = bx.to(device=weights.in_w.device, dtype=weights.in_w.dtype)
        if options.ffn_cluster and spec.n_blocks > 1:
            perm = cluster_neurons(unit_importance(x, weights, spec), spec.n_blocks,
                                   generator=torch.Generator().manual_seed(seed))
            outs = block_outputs(x, permute_hidden(weights, spec, perm.to(weights.in_w.device)), spec).float()
            by = outs.norm(dim=-1).cpu()
        else:
            outs = block_outputs(x, weights, spec).float()
        router = fit_router(bx, by)
        self.err_curve = error_curve(outs, router_scores(x, router.to(x.device)))
        self.block_flops = block_flops(self.d_in, outs.shape[-1], spec.hidden, spec.n_blocks, spec.gated)
        REGISTRY.budget_changed()
        return perm, by, router

    def _set_routing(self, perm, by, router) -> None:
        self.perm, self.buffer_y = perm, by
        self._set_router(router)

    def _set_router(self, router) -> None:
        self.router = router
        self.balance, self.balance_for = None, None  # fitted to the old router's scores
        self.comp, self.comp_for = None, None  # to its choices (and to older weights)

    def begin(self, options: Options, dense_forced: bool) -> CallPlan:
        """As Site.begin, with ffn_budget's allocation for this layer written into the plan's ffn_active:
        the call runs with it, and a forward re-run inside backward replays it."""
        plan = super().begin(options, dense_forced)
        if plan.recompute or options.ffn_budget is None or self.err_curve is None:
            return plan
        active = REGISTRY.ffn_allocation(options.ffn_budget).get(self)
        if active is not None and active != options.active_blocks:
            plan = replace(plan, options=replace(options, ffn_active=active))
            self._last = plan
        return plan

    def balance_bias(self, options: Options) -> Optional[Tensor]:
        """The ffn_balance bias for these options (None when off), fitted on the buffered tokens the
        first time a (strength, active) pair is asked for since the router last changed. A forward
        re-run inside backward asks with the same options, so it reuses the same bias."""
        strength, active = float(options.ffn_balance), options.active_blocks
        if strength == 0 or self.router is None:
            return None
        if self.balance_for != (strength, active):
            self.balance = fit_balance(router_scores(self.buffer_x, self.router), active, strength)
            self.balance_for = (strength, active)
        return self.balance

    def compensation_terms(self, options: Options, weights: Callable[[], MlpWeights], spec: MlpSpec):
        """(U, V, M) of the ffn_compensate predictors for these options (None when off), fitted on the
        buffered tokens, with the weights `weights()` returns (already permuted, LoRA included; called
        only when a fit is due, so a permuted copy is made only then), the first time a (rank,
        active, balance) is asked for since the router last changed. The router is refitted every
        PROBE_EVERY training calls, so the predictors follow the LoRA weights at that pace. Cost per
        fit: every block on the buffered tokens (a dense MLP on ROUTER_BUFFER tokens) and nb ridge
        solves of size d_in."""
        rank = options.ffn_compensate
        if rank == 0 or self.router is None or self.buffer_x.shape[0] == 0:
            return None
        key = (rank, options.active_blocks, float(options.ffn_balance))
        if self.comp_for != key:
            weights = weights()
            bx = self.buffer_x.to(device=weights.in_w.device, dtype=weights.in_w.dtype)
            outs = block_outputs(bx, weights, spec).float()
            self.comp = fit_compensation(bx, outs, ~self.route(bx, options), rank)
            self.comp_for = key
        return self.comp

    def loss_rows_only(self, options: Options, loss_rows: Optional[Tensor], real: Optional[Tensor]) -> Optional[Tensor]:
        """The backward's mask when ffn_loss_rows="dense" leaves nothing to rank: every real row
        carries a loss (LM tuning), so the loss rows keep every block and the others (padding) none;
        [T, nb] bool, else None. Saves the scores' cost where they would change nothing."""
        if options.ffn_loss_rows != "dense" or loss_rows is None or options.ffn_dense_first:
            return None
        others = ~loss_rows if real is None else real & ~loss_rows
        if bool(others.any()):  # one sync, on a [T] mask
            return None
        return loss_rows[:, None].expand(loss_rows.numel(), self.n_blocks).clone()

    def backward_mask(self, scores: Tensor, options: Options, lead: tuple = (),
                      loss_rows: Optional[Tensor] = None, real: Optional[Tensor] = None) -> Tensor:
        """exact_forward's choice of (token, block) pairs for backward, [T, nb] bool, from the exact
        forward's scores [T, nb] (routed_mlp.IMPORTANCES): the batch's highest-scoring pairs, ffn_active
        per real token on average (a token with much in play gets more blocks, one with little fewer).
        Padding rows (not `real`, the graph's spt::real_rows operand) get none: nothing reads them and
        no loss is on them, so their d(y) is exactly 0.
        Rows that carry a loss (loss_rows [T] bool, the graph's operand) come first: under
        ffn_loss_rows="dense" they keep every block, beyond the budget if need be (what is left of it
        goes to the other rows); under "first" they fill the budget and no more. ffn_dense_first
        positions keep every block.

        Global rather than per token by measurement (GSM8K probe, docs/quality.md): held-out loss 1.1517
        against 1.1607 at 2 of 4 blocks; loss rows first at the same budget 1.1348 (dense 1.1261)."""
        T = scores.shape[0]
        real = rows_of(real, T)
        mode = options.ffn_loss_rows
        if mode == "off" or loss_rows is None or loss_rows.numel() != T:
            loss_rows = None
        s = scores if real is None else scores.masked_fill(~real[:, None], float("-inf"))
        budget = options.active_blocks * (T if real is None else int(real.sum()))  # one sync, as real_rows
        if loss_rows is not None:  # ranked above every other pair, by their own scores
            s = torch.where(loss_rows[:, None], s + 1e30, s)
            if mode == "dense":  # every pair of theirs, whatever the budget; what is left goes to the others
                budget = max(budget, int(loss_rows.sum()) * scores.shape[1])
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if budget:
            mask.view(-1)[s.reshape(-1).topk(min(budget, s.numel())).indices] = True
        if real is not None:
            mask &= real[:, None]
        if options.ffn_dense_first and len(lead) >= 2:
            mask.view(*lead, mask.shape[-1])[..., : options.ffn_dense_first, :] = True
        return mask

    def route(self, x2: Tensor, options: Options, lead: tuple = ()) -> Tensor:
        """The routed call's block mask [T, nb]: top-ffn_active of the router's scores, less the
        ffn_balance bias when that is on; with `lead` (the input's [batch, seq] dims) the first
        ffn_dense_first positions of each sequence get every block."""
        scores = router_scores(x2, self.router.to(x2.device))
        bias = self.balance_bias(options)
        if bias is not None:
            scores = scores - bias.to(scores.device)
        mask = choose_blocks(scores, options.active_blocks)
        if options.ffn_dense_first and len(lead) >= 2:
            mask.view(*lead, mask.shape[-1])[..., : options.ffn_dense_first, :] = True
        return mask

    # --- router statistics --------------------------------------------------------------------
    def _add_samples(self, x: Tensor, norms: Tensor) -> None:
        """Tokens whose input or block norms hold NaN/inf are dropped: one would turn the router
        into NaN for good (the copy to the CPU syncs anyway, so the test costs no extra sync)."""
        x, norms = x.detach().float().cpu(), norms.detach().float().cpu()
        ok = torch.isfinite(x).all(-1) & torch.isfinite(norms).all(-1)
        if not bool(ok.all()):
            x, norms = x[ok], norms[ok]
        self.buffer_x = torch.cat([self.buffer_x, x])[-ROUTER_BUFFER:]
        self.buffer_y = torch.cat([self.buffer_y, norms])[-ROUTER_BUFFER:]

    def _sample_rows(self, T: int, n: int, seed: int, device, real: Optional[Tensor] = None) -> Tensor:
        """n of the T rows at random (all if fewer): of the real tokens only where the attention mask
        before this MLP marks padding (real: [T] bool, the spt::real_rows operand)."""
        gen = torch.Generator().manual_seed(seed)
        real = rows_of(real, T)
        if real is not None:
            idx = real.nonzero().squeeze(1).cpu()  # one sync, on calls that sample (calibration, probes)
            if idx.numel():
                return idx[torch.randperm(idx.numel(), generator=gen)[:n]].to(device)
        return torch.randperm(T, generator=gen)[:n].to(device)

    def _probe(self, x2, weights, spec, block_mask, seed, comp=None, real: Optional[Tensor] = None) -> None:  # weights: permuted
        """Run every block on a few tokens: their norms feed the router; the routed share of the
        dense output (with the compensation, if on) is the quality figure (1.0 = nothing lost)."""
        rows = self._sample_rows(x2.shape[0], PROBE_TOKENS, seed + 1, x2.device, real)
        outs = block_outputs(x2[rows], weights, spec).float()  # [S, nb, d_out]
        dense = outs.sum(1)
        routed = (outs * block_mask[rows, :, None]).sum(1)
        if comp is not None:
            routed = routed + compensation(x2[rows].float(), ~block_mask[rows], *comp)
        captured = ((routed * dense).sum() / (dense * dense).sum().clamp(min=1e-30)).item()
        rel_err = ((routed - dense).norm() / dense.norm().clamp(min=1e-30)).item()
        self.note_quality(captured=captured, rel_error=rel_err)
        self._add_samples(x2[rows], outs.norm(dim=-1))

    # --- the call -----------------------------------------------------------------------------
    def forward(self, x: Tensor, weights: MlpWeights, spec: MlpSpec, options: Options, training: bool,
                loss_rows: Optional[Tensor] = None, real_rows: Optional[Tensor] = None):
        """loss_rows, real_rows: [T] bool operands (the rows that carry a loss; the rows that are real
        tokens, empty when none is padding), or None."""
        options, dense_forced = resolve(options)
        plan = self.begin(options, dense_forced)
        options = plan.options  # with ffn_budget's allocation; a recompute's are its forward's
        self.check_finite(plan, x=x)
        seed = self.call_seed(plan.index)
        x2 = x.reshape(-1, x.shape[-1])
        T = x2.shape[0]
        real = rows_of(None if real_rows is None else real_rows.to(x.device), T)
        nb = spec.n_blocks
        calibrating = self.calibrating(plan)
        inference_exact = not training and not options.sparse_inference
        routed = not (plan.dense_forced or not options.sparse_ffn or calibrating or options.active_blocks >= nb
                      or T == 0 or inference_exact)
        exact = routed and training and options.exact_forward  # exact forward, sparse backward
        mode = (EXACT if exact else ROUTED) if routed else DENSE
        self.count_run(plan, "calibration" if calibrating else "exact_forward" if exact else "routed" if routed
                       else "exact_inference" if inference_exact and options.sparse_ffn and T else "dense")
        perm = None
        whole = False  # exact_mlp_forward saved every pair as [T, F] per projection
        comp = None  # ffn_compensate's (U, V, M) on x's device, when this call adds it
        saved: list = []  # the routed blocks' pre-activations, for backward
        with torch.no_grad():
            if routed and self.router is None:  # calibration_steps == 0, or calibration kept no token
                rows = self._sample_rows(T, TOKENS_PER_CALL, seed, x.device, real)
                self._add_samples(x2[rows], block_outputs(x2[rows], weights, spec).float().norm(dim=-1))
                fitted = self._fit_routing(weights, spec, options, seed)
                if fitted is None:  # nothing finite to fit on: this call runs every block
                    routed = False
                else:
                    self._set_routing(*fitted)
            if not routed:
                block_mask = torch.ones(T, nb, dtype=torch.bool, device=x.device)
                collect = calibrating and plan.updates_state
                if collect:  # the torch path, measuring each block's output norm on the way (the router's target)
                    y, _, norms, whole = exact_mlp_forward(x2, weights, spec, lambda s: torch.ones_like(s, dtype=torch.bool),
                                                           seed, saved, None, "block_output")
                    impl_meta = (IMPL_CODES["torch"], 0, ())
                    self._calibrate(x2, norms, weights, spec, plan, seed, real)
                elif _torch_path(options.ffn_impl, x2, spec):
                    # exact_forward's code with every block kept, in the clustered block order when there is
                    # one: the same sums in the same order as its training calls, so disable() reproduces
                    # their forward bit for bit.
                    perm = None if self.perm is None else self.perm.to(x.device)
                    y, _, _, whole = exact_mlp_forward(x2, weights, spec, lambda s: torch.ones_like(s, dtype=torch.bool),
                                                       seed, saved, perm, BACKWARD_IMPORTANCE)
                    impl_meta = (IMPL_CODES["torch"], 0, ())
                else:
                    y, impl_meta = _run_impl(x2, weights, spec, block_mask, seed, options.ffn_impl, saved)
            elif exact:
                perm = None if self.perm is None else self.perm.to(x.device)
                lead = tuple(x.shape[:-1])
                rows = None if loss_rows is None else loss_rows.to(x.device)
                preset = self.loss_rows_only(options, rows, real)  # no pair to rank: no scores to compute
                y, block_mask, _, whole = exact_mlp_forward(
                    x2, weights, spec, (lambda s: preset) if preset is not None else (
                        lambda s: self.backward_mask(s, options, lead, rows, real)), seed, saved, perm,
                    None if preset is not None else BACKWARD_IMPORTANCE)
                impl_meta = (IMPL_CODES["torch"], 0, ())
                if plan.updates_state and (self.train_calls % PROBE_EVERY == 0 or "captured" not in self.quality):
                    # captured / rel_error: what the backward's blocks hold of the exact output
                    self._probe(x2, permute_hidden(weights, spec, perm), spec, block_mask, seed, None, real)
                    bx, by = self.buffer_x, self.buffer_y
                    if bx.shape[0]:  # the router still serves calls without gradient (sparse inference)
                        self.stage(lambda: self._set_router(fit_router(bx, by)))
            else:
                perm = None if self.perm is None else self.perm.to(x.device)
                block_mask = self.route(x2, options, tuple(x.shape[:-1]))
                if training and options.ffn_loss_rows == "dense" and loss_rows is not None and loss_rows.numel() == T:
                    # rows that carry a loss run every block; not without gradients: an evaluation that
                    # passes labels must still measure the sparse forward
                    block_mask |= loss_rows.to(x.device)[:, None]
                wp = _LazyPermuted(weights, spec, perm)  # copied only if a refit or a probe needs it
                terms = self.compensation_terms(options, wp.get, spec)
                if terms is not None:  # a dense term beside the routed blocks: any ffn_impl
                    comp = tuple(t.to(device=x.device, dtype=x.dtype) for t in terms)
                y, impl_meta = _run_impl(x2, weights, spec, block_mask, seed, options.ffn_impl, saved, perm, comp)
                if plan.updates_state and training and (
                        self.train_calls % PROBE_EVERY == 0 or "captured" not in self.quality):
                    self._probe(x2, wp.get(), spec, block_mask, seed,
                                None if terms is None else tuple(t.to(x.device) for t in terms), real)
                    bx, by = self.buffer_x, self.buffer_y
                    if bx.shape[0]:
                        self.stage(lambda: self._set_router(fit_router(bx, by)))
        self.end(plan, training)
        impl_code, dtype_code, counts = impl_meta
        counts = list(counts) or [0] * nb
        meta = torch.tensor([mode, seed, int(perm is not None), impl_code, dtype_code, int(whole), *counts],
                            dtype=torch.int64)
        perm_out = perm if perm is not None else torch.arange(spec.hidden, device=x.device)
        # U and V, flat, for backward's d(x) (M is a constant): empty when nothing was added
        comp_out = torch.cat([comp[0].reshape(-1), comp[1].reshape(-1)]) if comp is not None else x.new_empty(0)
        if len(saved) == 1 and saved[0]._base is None:
            pre = saved[0]  # the Triton path's flat buffer: no copy
        else:
            pre = torch.cat(saved) if saved else x.new_empty(0)
        return y.view(*x.shape[:-1], y.shape[-1]), block_mask, perm_out, pre, meta, comp_out

    def _calibrate(self, x2: Tensor, norms: Tensor, weights, spec, plan: CallPlan, seed: int,
                   real: Optional[Tensor] = None) -> None:
        rows = self._sample_rows(x2.shape[0], TOKENS_PER_CALL, seed, x2.device, real)
        self._add_samples(x2[rows], norms[rows])
        if plan.index == plan.options.calibration_steps - 1:  # last calibration call
            fitted = self._fit_routing(weights, spec, plan.options, seed)
            if fitted is not None:
                self.stage(lambda: self._set_routing(*fitted))

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self):
        out = super().state_dict()
        if self.router is not None:
            out["router"] = self.router
        out["buffer_x"] = self.buffer_x
        out["buffer_y"] = self.buffer_y
        if self.perm is not None:
            out["perm"] = self.perm
        if self.balance is not None:
            out["balance"] = self.balance
            out["balance_for"] = torch.tensor(self.balance_for, dtype=torch.float64)
        if self.comp is not None:
            out["comp_u"], out["comp_v"], out["comp_m"] = self.comp
            out["comp_for"] = torch.tensor(self.comp_for, dtype=torch.float64)
        if self.err_curve is not None:
            out["err_curve"] = self.err_curve
            out["block_flops"] = torch.tensor(self.block_flops, dtype=torch.float64)
        return out

    def load_state_dict(self, state):
        router = state.get("router")
        if router is not None and tuple(router.shape) != (self.d_in + 1, self.n_blocks):
            raise SptStateError(
                f"saved router of MLP site {self.name} has shape {tuple(router.shape)}, this compile needs "
                f"{(self.d_in + 1, self.n_blocks)}: compile with the ffn_blocks the state was saved with")
        super().load_state_dict(state)
        self.router = None if router is None else router.float().clone()
        self.buffer_x = state.get("buffer_x", torch.zeros(0, self.d_in)).float().clone()
        self.buffer_y = state.get("buffer_y", torch.zeros(0, self.n_blocks)).float().clone()
        perm = state.get("perm")
        if perm is not None and not torch.equal(perm.sort().values, torch.arange(perm.numel())):
            raise SptStateError(f"saved unit permutation of MLP site {self.name} is not a permutation")
        self.perm = None if perm is None else perm.long().clone()
        balance, balance_for = state.get("balance"), state.get("balance_for")
        if balance is not None and (balance_for is None or tuple(balance.shape) != (self.n_blocks,)):
            raise SptStateError(f"saved ffn_balance bias of MLP site {self.name} has shape {tuple(balance.shape)} "
                                f"(or lacks balance_for), this compile needs ({self.n_blocks},)")
        self.balance = None if balance is None else balance.float().clone()
        self.balance_for = None if balance is None else (float(balance_for[0]), int(balance_for[1]))
        comp = [state.get(k) for k in ("comp_u", "comp_v", "comp_m", "comp_for")]
        if any(t is not None for t in comp):
            U, V, M, key = comp
            if any(t is None for t in comp) or not (
                    U.dim() == V.dim() == M.dim() == 2 and U.shape[0] == self.d_in and U.shape[1] == V.shape[0]
                    and U.shape[1] % self.n_blocks == 0 and M.shape == (self.n_blocks, V.shape[1])):
                raise SptStateError(f"saved ffn_compensate predictors of MLP site {self.name} do not fit: U "
                                    f"{None if U is None else tuple(U.shape)}, V {None if V is None else tuple(V.shape)}, "
                                    f"M {None if M is None else tuple(M.shape)}; this compile needs U [{self.d_in}, "
                                    f"{self.n_blocks} r], M [{self.n_blocks}, d_out]")
            self.comp = (U.float().clone(), V.float().clone(), M.float().clone())
            self.comp_for = (int(key[0]), int(key[1]), float(key[2]))
        else:
            self.comp, self.comp_for = None, None
        curve, flops = state.get("err_curve"), state.get("block_flops")
        if curve is not None and (flops is None or tuple(curve.shape) != (self.n_blocks + 1,)):
            raise SptStateError(f"saved ffn_budget error curve of MLP site {self.name} has shape {tuple(curve.shape)} "
                                f"(or lacks block_flops), this compile needs ({self.n_blocks + 1},)")
        self.err_curve = None if curve is None else curve.double().clone()
        self.block_flops = None if curve is None else float(flops)
        REGISTRY.budget_changed()

    def describe(self):
        out = super().describe()
        if self._last is not None and self._last.options.ffn_budget is not None:
            out["ffn_active"] = self._last.options.active_blocks  # this layer's share under ffn_budget
        if self.balance_for is not None:
            out["balance"] = self.balance_for[0]
        if self.comp_for is not None:
            out["compensate"] = self.comp_for[0]
        return out


# --- implementations ----------------------------------------------------------------------------


class _LazyPermuted:
    """permute_hidden(weights, spec, perm), copied on the first get() (the torch path needs no copy)."""

    def __init__(self, weights: MlpWeights, spec: MlpSpec, perm: Optional[Tensor]):
        self.weights, self.spec, self.perm, self.value = weights, spec, perm, None

    def get(self) -> MlpWeights:
        if self.value is None:
            self.value = permute_hidden(self.weights, self.spec, self.perm)
        return self.value


def _torch_path(option: str, x2: Tensor, spec: MlpSpec) -> bool:
    """Whether a call runs the torch path (ffn_impl, or LoRA dropout, which only it has)."""
    return resolve_ffn_impl(option, x2.device) == "torch" or bool(spec.in_dropout or spec.gate_dropout or spec.out_dropout)


def _run_impl(x2: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor, seed: int, option: str,
              saved: list, perm: Optional[Tensor] = None,
              comp: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> tuple[Tensor, tuple[int, int, tuple]]:
    """y by the chosen implementation, with hidden units reordered by perm (the clustering) if given,
    plus compensation(x2, ~block_mask, *comp) if given; appends what backward needs to `saved` (the
    pre-activations in a layout the Triton path shares; the torch path appends its LoRA inputs).
    Returns (y, (impl code, compute dtype code, tokens per block))."""
    impl = resolve_ffn_impl(option, x2.device)
    if spec.in_dropout or spec.gate_dropout or spec.out_dropout:
        impl = "torch"  # neither the kernels nor the reference have LoRA dropout
    if impl == "torch":  # adds the compensation where its blocks accumulate; puts units in block order itself
        y = routed_mlp_forward(x2, w, spec, block_mask, seed, saved=saved, perm=perm, comp=comp)
        return y, (IMPL_CODES["torch"], 0, ())
    y, meta = _run_kernel_impl(impl, x2, permute_hidden(w, spec, perm), spec, block_mask, saved)
    return (y if comp is None else y + compensation(x2, ~block_mask, *comp).to(y.dtype)), meta


def _run_kernel_impl(impl: str, x2: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor,
                     saved: list) -> tuple[Tensor, tuple[int, int, tuple]]:
    """The Triton kernels or the reference, on weights already in block order."""
    if impl == "triton":
        from spt_compile.triton_ops.routed_mlp_triton import compute_dtype, routed_mlp_forward_triton

        # The traced dtype (autocast, recorded by the pass), else autocast if active here, else x's.
        cd = getattr(torch, spec.compute) if spec.compute else compute_dtype(x2)
        y, pre, counts = routed_mlp_forward_triton(x2, w, spec, block_mask, cd)
        saved.append(pre)
        return y, (IMPL_CODES["triton"], 0 if cd == x2.dtype else DTYPE_CODES[cd], tuple(counts))
    return routed_mlp_reference(x2, w, spec, block_mask), (IMPL_CODES["reference"], 0, ())


def _reference_backward(dy: Tensor, x: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor, needs: list[bool]):
    """Gradients of routed_mlp_reference by torch.func.vjp (recomputes everything: for checks only)."""
    slots = [n for n, t, need in zip(MlpWeights._fields, w, needs[1:]) if t is not None and need]

    def f(xv, *ts):
        return routed_mlp_reference(xv, w._replace(**dict(zip(slots, ts))), spec, block_mask)

    _, vjp = torch.func.vjp(f, x, *[getattr(w, n) for n in slots])
    dx, *gs = vjp(dy)
    got = dict(zip(slots, gs))
    return (dx if needs[0] else None), MlpWeights(**{n: got.get(n) for n in MlpWeights._fields})


# --- the custom ops ---------------------------------------------------------------------------

SITE_TYPES["mlp"] = MlpSite


@torch.library.custom_op("spt::mlp_site", mutates_args=())
def mlp_site(
    x: Tensor,
    in_w: Tensor, in_b: Optional[Tensor], in_a: Optional[Tensor], in_bb: Optional[Tensor],
    gate_w: Optional[Tensor], gate_b: Optional[Tensor], gate_a: Optional[Tensor], gate_bb: Optional[Tensor],
    out_w: Tensor, out_b: Optional[Tensor], out_a: Optional[Tensor], out_bb: Optional[Tensor],
    loss_rows: Optional[Tensor], real_rows: Optional[Tensor], template: int, spec: str, training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss_rows: [T] bool, the rows whose position carries a loss (passes/loss_rows.py), or None.
    real_rows: spt::real_rows of the attention mask before this MLP (empty: none padded), or None."""
    s = MlpSpec.from_str(spec)
    weights = split_fused(MlpWeights(in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a,
                                     out_bb), s)
    # The first projection's weight (gate, else in; a fused gate/up one whole) identifies the layer's site.
    site = REGISTRY.site(template, gate_w if gate_w is not None else in_w)
    return site.forward(x, weights, s, REGISTRY.templates[template].options, training, loss_rows, real_rows)


@mlp_site.register_fake
def _(x, in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a, out_bb,
      loss_rows, real_rows, template, spec, training):
    s = MlpSpec.from_str(spec)
    T = 1
    for n in x.shape[:-1]:
        T = T * n
    d_out = out_w.shape[1] if s.out_layout == "io" else out_w.shape[0]
    ctx = torch.library.get_ctx()
    return (x.new_empty(*x.shape[:-1], d_out), x.new_empty(T, s.n_blocks, dtype=torch.bool),
            x.new_empty(s.hidden, dtype=torch.int64), x.new_empty(ctx.new_dynamic_size()),
            torch.empty(META_FIXED + s.n_blocks, dtype=torch.int64, device="cpu"), x.new_empty(ctx.new_dynamic_size()))


@torch.library.custom_op("spt::mlp_site_backward", mutates_args=())
def mlp_site_backward(
    dy: Tensor, x: Tensor,
    in_w: Tensor, in_b: Optional[Tensor], in_a: Optional[Tensor], in_bb: Optional[Tensor],
    gate_w: Optional[Tensor], gate_b: Optional[Tensor], gate_a: Optional[Tensor], gate_bb: Optional[Tensor],
    out_w: Tensor, out_b: Optional[Tensor], out_a: Optional[Tensor], out_bb: Optional[Tensor],
    block_mask: Tensor, perm: Tensor, pre: Tensor, meta: Tensor, comp: Tensor, spec: str, needs: list[bool],
) -> list[Tensor]:
    """Returns 13 tensors: dx, then one per weight slot; an empty tensor where no grad is needed."""
    s = MlpSpec.from_str(spec)
    weights = split_fused(MlpWeights(in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a,
                                     out_bb), s)
    if s.fused:  # the fused projection's needs stand for both halves
        needs = needs[:1] + needs[5:9] + needs[5:]
    mode, seed, permuted, impl_code, dtype_code, whole, *counts = meta.tolist()
    p = perm if permuted else None
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    impl = IMPL_NAMES[impl_code]
    UV = None
    if comp.numel():  # ffn_compensate: frozen U, V; only x gets a gradient through it
        n = comp.numel() // (x2.shape[1] + dy2.shape[1])  # nb * r
        UV = comp[: x2.shape[1] * n].view(x2.shape[1], n), comp[x2.shape[1] * n :].view(n, dy2.shape[1])
    if impl == "torch":  # un-permutes block by block; adds the compensation's d(x) where d(x) accumulates
        dx, grads = routed_mlp_backward_saved(dy2, x2, weights, s, block_mask, seed, needs[0], MlpWeights(*needs[1:]),
                                              pre, perm=p, comp=UV, exact_forward=mode == EXACT, whole=bool(whole))
    else:
        dx, grads = _permuted_backward(impl, dy2, x2, weights, s, block_mask, needs, pre, counts, dtype_code, p)
        if UV is not None and dx is not None:
            dx = dx + compensation_input_grad(dy2.to(comp.dtype), ~block_mask, *UV).to(dx.dtype)
    grads = join_fused(MlpWeights(*grads), s)
    return ([x.new_empty(0) if dx is None else dx.reshape(x.shape).contiguous()]
            + [x.new_empty(0) if g is None else g.contiguous() for g in grads])


def _permuted_backward(impl: str, dy2, x2, weights: MlpWeights, s: MlpSpec, block_mask, needs, pre, counts,
                       dtype_code: int, perm: Optional[Tensor]):
    """The Triton or reference backward on the permuted weights, gradients un-permuted."""
    wp = permute_hidden(weights, s, perm)
    if impl == "triton":
        from spt_compile.triton_ops.routed_mlp_triton import routed_mlp_backward_triton

        dx, grads = routed_mlp_backward_triton(dy2, x2, wp, s, block_mask, needs[0], MlpWeights(*needs[1:]), pre,
                                               counts, DTYPES.get(dtype_code))
    else:
        dx, grads = _reference_backward(dy2, x2, wp, s, block_mask, needs)
    return dx, unpermute_grads(grads, s, perm)


@mlp_site_backward.register_fake
def _(dy, x, in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a, out_bb,
      block_mask, perm, pre, meta, comp, spec, needs):
    tensors = [x, in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a, out_bb]
    return [t.new_empty(t.shape) if (need and t is not None) else x.new_empty(0) for t, need in zip(tensors, needs)]


def _setup_context(ctx, inputs, output):
    tensors = inputs[:13]  # x and the 12 weight slots; then loss_rows, real_rows, template, spec, training
    ctx.spec = inputs[16]
    y, block_mask, perm, pre, meta, comp = output
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*tensors, block_mask, perm, pre, meta, comp)
    # Only y carries a gradient. Without both lines autograd hands backward a zero-filled d(pre), a
    # memset the size of every routed pre-activation, per layer and step.
    ctx.mark_non_differentiable(block_mask, perm, pre, meta, comp)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dmask, dperm, dpre, dmeta, dcomp):
    *tensors, block_mask, perm, pre, meta, comp = ctx.saved_tensors
    needs = [bool(n) and p for n, p in zip(ctx.needs_input_grad[:13], ctx.present)]
    if dy is None:  # y took no part in the loss (grads are not materialized: see _setup_context)
        return (None,) * 18
    grads = mlp_site_backward(dy.contiguous(), *tensors, block_mask, perm, pre, meta, comp, ctx.spec, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 5


mlp_site.register_autograd(_backward, setup_context=_setup_context)
