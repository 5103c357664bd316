"""The MLP site: the router state behind spt::mlp_site (mlp_op.py) and how a call runs.

The first projection's weight identifies a layer's site (registry.py). Each call it reads the run-time
options, then either runs every block (inside disable(), with sparse_ffn=False, with ffn_active ==
ffn_blocks, or during the first `calibration_steps` calls) or lets the router pick `ffn_active`
blocks per token (hard routing, weight 1) and runs only those.

The router lives here, not in the user's model (their optimizer must not need to know about it): a
ridge regression from the MLP input to each block's output norm, fitted on tokens seen during
calibration (where every block runs, so the norms come for free) and refitted online from small
token samples on training calls (PROBE_EVERY). The same samples measure how much of the dense MLP
output the chosen blocks capture. A probe draws its tokens on the device and reads its figures and
samples back in one transfer (one sync every PROBE_EVERY calls). Under exact_forward no training call
routes, so the refit waits for the first call that does (sparse inference) or for state_dict(): the
same router, without the host's fit in the training step (distributed runs still refit at the probe,
where every rank takes part).

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
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from spt_compile.context import resolve
from spt_compile.distributed import sync
from spt_compile.fitting.balance import fit_balance
from spt_compile.fitting.clustering import cluster_neurons
from spt_compile.fitting.compensation import fit_compensation
from spt_compile.fitting.ffn_budget import block_flops, error_curve
from spt_compile.fitting.router import choose_blocks, fit_router, router_scores
from spt_compile.options import Options
from spt_compile.real_rows import rows_of
from spt_compile.registry import REGISTRY, SITE_TYPES, CallPlan, Site, SiteTemplate, SptStateError
from spt_compile.sparse_ops.routed_mlp import (
    MlpSpec, MlpWeights, block_outputs, compensation, exact_mlp_forward, permute_hidden, score_weights,
    unit_importance,
)

from . import mask_memo
from .meta import MlpMeta, MlpRun
from .mlp_impl import LazyPermuted, grouped_choice, kernel_impl_unused, run_impl, takes_torch_path
from .row_counts import row_counts

# exact_forward's score of a (token, block) pair for the backward (routed_mlp.IMPORTANCES). "jacobian" by
# measurement: GSM8K probe (docs/quality.md) held-out loss 1.1594 against 1.1517 for the exact block output
# norms, within seed noise, and it needs no extra GEMM.
BACKWARD_IMPORTANCE = "jacobian"

TOKENS_PER_CALL = 512  # tokens added to the router's sample buffer per calibration call
ROUTER_BUFFER = 2048  # tokens kept for (re)fitting the router
PROBE_TOKENS = 64  # tokens per probe on training calls (every block runs for them)
PROBE_EVERY = 25  # training calls between probes / refits; the first routed call always probes


@dataclass
class _Call:
    """One call's inputs, as MlpSite.forward hands them to the way the call runs."""

    x: Tensor  # [*, d_in], as the op received it
    x2: Tensor  # [T, d_in]
    weights: MlpWeights
    spec: MlpSpec
    options: Options
    plan: CallPlan
    training: bool
    seed: int
    loss_rows: Optional[Tensor]  # [T] bool on x's device, or None
    real: Optional[Tensor]  # [T] bool: the real (not padding) rows; None: all are
    saved: list = field(default_factory=list)  # what backward reads, in the layout the run wrote

    @property
    def T(self) -> int:
        return self.x2.shape[0]


@dataclass
class _Ran:
    """What a call computed and how, for the op's outputs and its backward."""

    y: Tensor  # [T, d_out]
    block_mask: Tensor  # [T, nb] bool: the (token, block) pairs the backward keeps
    run: MlpRun
    perm: Optional[Tensor] = None  # the clustering's unit order the call ran in, on x's device
    whole: bool = False  # `saved` holds every pair as [T, F] per projection
    natural_order: bool = False  # it ran in the units' own order, though the site has a clustering
    comp: Optional[tuple] = None  # ffn_compensate's (U, V, M) on x's device, when the call added it


def draw_rows(T: int, n: int, seed: int, device, real: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """min(n, T) of T rows at random, drawn on the device: (rows [S], valid [S] bool). With real ([T]
    bool) the real rows rank first, and a padding row is drawn only where fewer than n are real (valid
    marks which drawn rows are real). No host read: no sync."""
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(T, generator=gen, device=device)  # [T] in [0, 1)
    if real is not None:
        u = u.masked_fill(~real, -1.0)
    drawn, rows = u.topk(min(n, T))
    return rows, drawn >= 0


def on_device(t: Optional[Tensor], device, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """t (site state: the router, the clustering's permutation, ffn_compensate's predictors, the balance
    bias, fitted on the host) on x's device and dtype. A copy per call from pageable host memory would
    make CUDA drain the stream before it (a sync per layer and call); the copy is kept with t
    (mask_memo) and made again only when t is replaced or changed in place."""
    if t is None or (t.device == torch.device(device) and (dtype is None or t.dtype == dtype)):
        return t
    return mask_memo.memo(t, ("on device", str(device), dtype), lambda: t.to(device=device, dtype=dtype))


class MlpSite(Site):
    kind = "mlp"

    def __init__(self, template: SiteTemplate, anchor: Optional[Tensor]):
        super().__init__(template, anchor)
        (self.d_in,) = template.shape
        self.n_blocks = template.options.ffn_blocks
        self.router: Optional[Tensor] = None  # [d_in + 1, n_blocks]
        self.buffer_x = torch.zeros(0, self.d_in)  # router samples (CPU, fp32), oldest first
        self.buffer_y = torch.zeros(0, self.n_blocks)
        # Probes added samples since the router was last fitted. Under exact_forward no training call
        # routes, so the fit (about 30 ms on the host per layer) waits for a call that does, or for
        # state_dict(); the router is the same as a fit at the probe would have made.
        self.router_stale = False
        self.perm: Optional[Tensor] = None  # [F] hidden units in block order (None: contiguous blocks)
        self.impls: dict[str, int] = {}  # calls per implementation that ran them (report())
        self.grouped_off: Optional[str] = None  # why ffn_impl="grouped" could not serve this layer
        # exact_forward's training calls: how many ranked the backward's pairs, and how many kept every real
        # row whole because ranking would leave out too little to pay (ffn_skip_min)
        self.backward_choice = {"ranked": 0, "whole_rows": 0}
        self.backward_why = ""  # the last such call's choice and its reason
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

    def refit_router(self, bx: Tensor, by: Tensor) -> None:
        """Stages a router fitted on the buffered tokens (applied at the next call). Under
        torch.distributed it is fitted now and rank 0's is kept, so that every rank stages the same."""
        if not sync.active():
            self.stage(lambda: self._set_router(fit_router(bx, by)))
            return
        router, = sync.from_rank0(self, "router", fit_router(bx, by))
        self.stage(lambda: self._set_router(router))

    def _refresh_router(self) -> None:
        """Fits the router now if probes added samples since its last fit (router_stale)."""
        if self.router_stale:
            self.router_stale = False
            self._set_router(fit_router(self.buffer_x, self.buffer_y))

    def _agreed_routing(self, fitted):
        """_fit_routing's result, with rank 0's router, unit order and error curve on every rank."""
        if fitted is None or not sync.active():
            return fitted
        perm, by, router = fitted
        perm, router, self.err_curve = sync.from_rank0(self, "routing", perm, router, self.err_curve)
        return perm, by, router

    def _set_routing(self, perm, by, router) -> None:
        self.perm, self.buffer_y = perm, by
        self._set_router(router)

    def _set_router(self, router) -> None:
        self.router = router
        self.balance, self.balance_for = None, None  # fitted to the old router's scores
        self.comp, self.comp_for = None, None  # to its choices (and to older weights)

    def begin(self, options: Options, dense_forced: bool, training: bool = True) -> CallPlan:
        """As Site.begin, with ffn_budget's allocation for this layer written into the plan's ffn_active:
        the call runs with it, and a forward re-run inside backward replays it."""
        plan = super().begin(options, dense_forced, training)
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

    def backward_skipped(self, options: Options, T: int, loss_rows: Optional[Tensor], real: Optional[Tensor],
                         lead: tuple) -> Optional[float]:
        """The share of the real rows' (token, block) pairs exact_forward's ranked backward would leave out
        (host counts: row_counts, one sync per step shared by every layer); None where ffn_dense_first
        makes it depend on the choice."""
        kept = self.backward_pairs(options, T, loss_rows, real, lead)
        if kept is None:
            return None
        labelled = loss_rows if loss_rows is not None and loss_rows.numel() == T else None
        full = row_counts(T, real, labelled).real * self.n_blocks
        return max(0.0, (full - kept) / full) if full else 0.0

    def whole_rows(self, options: Options, T: int, loss_rows: Optional[Tensor], real: Optional[Tensor],
                   device, skipped: Optional[float]) -> Optional[tuple[Tensor, int]]:
        """The backward's mask when ranking pairs would not pay, [T, nb] bool: every real row (and every row
        that carries a loss) keeps every block; with its number of pairs. None: rank.
        Ranking scores every pair and gathers the kept ones, which costs more than it saves unless it
        leaves out more than ffn_skip_min of the real rows' pairs (`skipped`, backward_skipped;
        docs/quality.md, "When ranking pays"); in LM tuning it would leave out only each sequence's last
        token, whose gradient is zero anyway."""
        if skipped is None or skipped > options.ffn_skip_min:
            return None
        labelled = loss_rows if loss_rows is not None and loss_rows.numel() == T else None
        n = row_counts(T, real, labelled)
        rows = real if real is not None else torch.ones(T, dtype=torch.bool, device=device)
        if labelled is not None:
            rows = rows | labelled  # a padding row with a label still carries a loss
        return rows[:, None].expand(T, self.n_blocks).clone(), (n.real + n.loss - n.loss_real) * self.n_blocks

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
        real, loss_rows = rows_of(real, T), self._ranked_loss_rows(options, loss_rows, T)
        s = scores if real is None else scores.masked_fill(~real[:, None], float("-inf"))
        budget = self.backward_budget(options, T, loss_rows, real)
        if loss_rows is not None:  # ranked above every other pair, by their own scores
            s = torch.where(loss_rows[:, None], s + 1e30, s)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if budget:
            mask.view(-1)[s.reshape(-1).topk(min(budget, s.numel())).indices] = True
        if real is not None:
            mask &= real[:, None]
        if options.ffn_dense_first and len(lead) >= 2:
            mask.view(*lead, mask.shape[-1])[..., : options.ffn_dense_first, :] = True
        return mask

    @staticmethod
    def _ranked_loss_rows(options: Options, loss_rows: Optional[Tensor], T: int) -> Optional[Tensor]:
        """The loss rows backward_mask ranks first (None: ffn_loss_rows is off, or they do not fit)."""
        return None if options.ffn_loss_rows == "off" or loss_rows is None or loss_rows.numel() != T else loss_rows

    def backward_budget(self, options: Options, T: int, loss_rows: Optional[Tensor], real: Optional[Tensor]) -> int:
        """How many (token, block) pairs backward_mask picks: ffn_active per real row; under
        ffn_loss_rows="dense" at least every pair of the loss rows. Host counts (row_counts: one sync
        per step, not per layer)."""
        n = row_counts(T, real, loss_rows)
        budget = options.active_blocks * n.real
        if loss_rows is not None and options.ffn_loss_rows == "dense":
            budget = max(budget, n.loss * self.n_blocks)
        return budget

    def backward_pairs(self, options: Options, T: int, loss_rows: Optional[Tensor], real: Optional[Tensor],
                       lead: tuple) -> Optional[int]:
        """The number of pairs backward_mask keeps, known on the host (None: ffn_dense_first adds pairs
        that depend on the choice). The top `budget` pairs never include a padding row's (ranked last,
        at -inf) unless the budget exceeds the real rows' pairs, and those are dropped after."""
        if options.ffn_dense_first and len(lead) >= 2:
            return None
        real, loss_rows = rows_of(real, T), self._ranked_loss_rows(options, loss_rows, T)
        n_real = row_counts(T, real, loss_rows).real
        return min(self.backward_budget(options, T, loss_rows, real), n_real * self.n_blocks)

    def score_weights(self, weights: MlpWeights, spec: MlpSpec, perm: Optional[Tensor]) -> tuple:
        """What the backward's pair scores weight each unit's value by (exact.score_weights: the base
        weights' per-unit norms, as one [F, nb] matrix per term), kept with the weights (mask_memo on the
        out projection's, keyed by the others and the clustering's permutation): frozen base weights
        give the same matrices every call, so they are built once, not per call (3 reductions over the
        weights in fp32 copies, 2 products, 2 block_diag). A weight changed in place (trained base
        weights: its version moves) is read again."""
        ident = tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t._version)
                      for t in (weights.in_w, weights.gate_w, weights.out_w))  # out_w's too: the op may
        # get an alias of it each call, whose end would leave the memo nothing to check the version by
        order = None if self.perm is None else (self.perm.data_ptr(), self.perm._version)
        return mask_memo.memo(weights.out_w, ("score_weights", ident, order, spec, BACKWARD_IMPORTANCE),
                              lambda: score_weights(weights, spec, perm, BACKWARD_IMPORTANCE))

    def routed_pairs(self, options: Options, T: int, lead: tuple, dense_rows: Optional[Tensor]) -> Optional[int]:
        """The number of pairs of route()'s mask, with dense_rows' rows (when given) running every block:
        known on the host unless ffn_dense_first adds pairs that depend on the choice."""
        if options.ffn_dense_first and len(lead) >= 2:
            return None
        n_dense = 0 if dense_rows is None else row_counts(T, None, dense_rows).loss
        return n_dense * self.n_blocks + (T - n_dense) * options.active_blocks

    def route(self, x2: Tensor, options: Options, lead: tuple = ()) -> Tensor:
        """The routed call's block mask [T, nb]: top-ffn_active of the router's scores, less the
        ffn_balance bias when that is on; with `lead` (the input's [batch, seq] dims) the first
        ffn_dense_first positions of each sequence get every block."""
        scores = router_scores(x2, on_device(self.router, x2.device))
        bias = self.balance_bias(options)
        if bias is not None:
            scores = scores - on_device(bias, scores.device)
        mask = choose_blocks(scores, options.active_blocks)
        if options.ffn_dense_first and len(lead) >= 2:
            mask.view(*lead, mask.shape[-1])[..., : options.ffn_dense_first, :] = True
        return mask

    # --- router statistics --------------------------------------------------------------------
    def _add_samples(self, x: Tensor, norms: Tensor, what: str = "calibration samples") -> None:
        """Tokens whose input or block norms hold NaN/inf are dropped: one would turn the router
        into NaN for good (the copy to the CPU syncs anyway, so the test costs no extra sync)."""
        x, norms = x.detach().float().cpu(), norms.detach().float().cpu()
        ok = torch.isfinite(x).all(-1) & torch.isfinite(norms).all(-1)
        if not bool(ok.all()):
            x, norms = x[ok], norms[ok]
        x, norms = sync.gather_rows(self, what, x, norms)  # every rank's, in rank order
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
        dense output (with the compensation, if on) is the quality figure (1.0 = nothing lost).
        The tokens are drawn on the device, and the figures and the samples come back in one
        transfer: one sync per probe (every PROBE_EVERY training calls)."""
        rows, valid = draw_rows(x2.shape[0], PROBE_TOKENS, seed + 1, x2.device, real)  # [S], [S]
        xs = x2[rows].float()  # [S, d_in]
        outs = block_outputs(x2[rows], weights, spec).float()  # [S, nb, d_out]
        dense = outs.sum(1)
        routed = (outs * block_mask[rows, :, None]).sum(1)
        if comp is not None:
            routed = routed + compensation(xs, ~block_mask[rows], *comp)
        w = valid.float()  # padding drawn (fewer real rows than PROBE_TOKENS) counts nowhere
        dd = (dense * dense).sum(-1) @ w
        captured = ((routed * dense).sum(-1) @ w) / dd.clamp(min=1e-30)
        rel_err = (((routed - dense) ** 2).sum(-1) @ w).sqrt() / dd.sqrt().clamp(min=1e-30)
        S, nb = outs.shape[:2]
        host = torch.cat([torch.stack([captured, rel_err]), w, xs.flatten(), outs.norm(dim=-1).flatten()]).cpu()
        ok = host[2 : 2 + S] > 0
        samples = host[2 + S : 2 + S + xs.numel()].view(S, -1)[ok]
        norms = host[2 + S + xs.numel():].view(S, nb)[ok]
        nan = float("nan")  # no real row drawn: nothing measured
        self.note_quality(captured=float(host[0]) if ok.any() else nan, rel_error=float(host[1]) if ok.any() else nan)
        self._add_samples(samples, norms, "probe samples")

    # --- the call -----------------------------------------------------------------------------
    def forward(self, x: Tensor, weights: MlpWeights, spec: MlpSpec, options: Options, training: bool,
                loss_rows: Optional[Tensor] = None, real_rows: Optional[Tensor] = None):
        """loss_rows, real_rows: [T] bool operands (the rows that carry a loss; the rows that are real
        tokens, empty when none is padding), or None. Returns spt::mlp_site's outputs (mlp_op.py)."""
        options, dense_forced = resolve(options)
        plan = self.begin(options, dense_forced, training)
        options = plan.options  # with ffn_budget's allocation; a recompute's are its forward's
        self.check_finite(plan, x=x)
        x2 = x.reshape(-1, x.shape[-1])
        call = _Call(x, x2, weights, spec, options, plan, training, self.call_seed(plan.index),
                     None if loss_rows is None else loss_rows.to(x.device),
                     rows_of(None if real_rows is None else real_rows.to(x.device), x2.shape[0]))
        grouped, grouped_off = grouped_choice(options.ffn_impl, call.x2, weights, spec)  # for routed calls
        calibrating = self.calibrating(plan)
        inference_exact = not training and not options.sparse_inference
        routed = not (plan.dense_forced or not options.sparse_ffn or calibrating or options.active_blocks >= spec.n_blocks
                      or call.T == 0 or inference_exact)
        exact = routed and training and options.exact_forward  # exact forward, sparse backward
        self.count_run(plan, "calibration" if calibrating else "exact_forward" if exact else "routed" if routed
                       else "exact_inference" if inference_exact and options.sparse_ffn and call.T else "dense")
        with torch.no_grad():
            if routed and not self._has_router(call):
                routed = exact = False
            if not routed:
                out = self._every_block(call, collect=calibrating and plan.updates_state)
            elif exact:
                out = self._exact_forward(call, grouped)
            else:
                out = self._routed(call, grouped)
        self.end(plan, training)
        if not plan.recompute:
            self.impls[out.run.impl] = self.impls.get(out.run.impl, 0) + 1
            self.grouped_off = grouped_off
        mode = (MlpMeta.EXACT if exact else MlpMeta.ROUTED) if routed else MlpMeta.DENSE
        # backward reads the saved pre-activations, and draws dropout again, in the order forward used
        meta = MlpMeta(mode, call.seed, out.perm is not None and not out.natural_order, out.run, bool(out.whole),
                       spec.n_blocks).tensor()
        perm_out = out.perm if out.perm is not None else torch.arange(spec.hidden, device=x.device)
        # U and V, flat, for backward's d(x) (M is a constant): empty when nothing was added
        comp = out.comp
        comp_out = torch.cat([comp[0].reshape(-1), comp[1].reshape(-1)]) if comp is not None else x.new_empty(0)
        saved = call.saved
        if len(saved) == 1 and saved[0]._base is None:
            pre = saved[0]  # the Triton path's flat buffer: no copy
        else:
            pre = torch.cat(saved) if saved else x.new_empty(0)
        # y in x's leading shape, not as a view: run eagerly (compiler="eager"), autograd forbids in-place
        # changes to a custom Function's view outputs, and models make them (Falcon: mlp_output += attn)
        y = torch.ops.aten._unsafe_view(out.y, (*x.shape[:-1], out.y.shape[-1]))
        return y, out.block_mask, perm_out, pre, meta, comp_out

    def _has_router(self, call: "_Call") -> bool:
        """Whether a routed call has a router to route by, fitting one here where the call may
        (calibration_steps == 0, or calibration kept no token); False: the call runs every block."""
        if self.router is not None:
            return True
        if not call.plan.updates_state:  # no router, and no fitting here
            return False
        x2, weights, spec = call.x2, call.weights, call.spec
        rows = self._sample_rows(call.T, TOKENS_PER_CALL, call.seed, x2.device, call.real)
        self._add_samples(x2[rows], block_outputs(x2[rows], weights, spec).float().norm(dim=-1))
        fitted = self._agreed_routing(self._fit_routing(weights, spec, call.options, call.seed))
        if fitted is None:  # nothing finite to fit on: this call runs every block
            return False
        self._set_routing(*fitted)
        return True

    def _every_block(self, call: "_Call", collect: bool) -> "_Ran":
        """Every block for every token: calibration (collect: each block's output norm measured on the
        way, the router's target), disable(), dense-forced and evaluation calls."""
        x2, weights, spec, seed, T, nb = call.x2, call.weights, call.spec, call.seed, call.T, call.spec.n_blocks
        block_mask = torch.ones(T, nb, dtype=torch.bool, device=x2.device)
        if collect:  # the torch path
            y, _, norms, whole, counts = exact_mlp_forward(
                x2, weights, spec, lambda s: block_mask, seed, call.saved, None, "block_output")
            self._calibrate(x2, norms, weights, spec, call.plan, seed, call.real)
            return _Ran(y, block_mask, MlpRun(counts=tuple(counts)), whole=whole)
        if takes_torch_path(call.options.ffn_impl, x2, spec):
            # exact_forward's code with every block kept, in the units' own order: the same sums in the
            # same order as a training call that keeps whole rows, so disable() reproduces that forward
            # bit for bit. No pair scores: every pair is kept (evaluation calls ran them for nothing,
            # about a fifth of the MLP's time on this CPU).
            y, _, _, whole, _ = exact_mlp_forward(
                x2, weights, spec, lambda s: block_mask, seed, call.saved, None, None, counts=[T] * nb)
            return _Ran(y, block_mask, MlpRun(counts=(T,) * nb), whole=whole)
        y, run = run_impl(x2, weights, spec, block_mask, seed, call.options.ffn_impl, call.saved)
        return _Ran(y, block_mask, run)

    def _exact_forward(self, call: "_Call", grouped: bool) -> "_Ran":
        """A training call under exact_forward: every block forward; the backward keeps whole rows where
        ranking would not pay, else the highest-scoring (token, block) pairs."""
        x, x2, weights, spec, options, seed, T = call.x, call.x2, call.weights, call.spec, call.options, call.seed, call.T
        nb, real, rows = spec.n_blocks, call.real, call.loss_rows
        perm = on_device(self.perm, x.device)
        lead = tuple(x.shape[:-1])
        # No loss rows reach this site (the loss is outside this graph: a graph break before it, a
        # compiled submodule; explain() says why). Under ffn_loss_rows="dense" any real row may carry a
        # loss, so each keeps every block: ranked, an LM's rows would lose blocks that the loss needs
        # (docs/quality.md, "Beyond GSM8K").
        unknown = options.ffn_loss_rows == "dense" and (rows is None or rows.numel() != T)
        skipped = 0.0 if unknown else self.backward_skipped(options, T, rows, real, lead)
        whole_rows = self.whole_rows(options, T, None if unknown else rows, real, x.device,
                                     skipped)  # ranking would not pay
        preset = None if whole_rows is None else whole_rows[0]
        if not call.plan.recompute:
            self.backward_choice["ranked" if preset is None else "whole_rows"] += 1
            self.backward_why = (
                "whole rows: no loss rows reach this site, so every real row keeps every block "
                "(ffn_loss_rows='dense'; 'first' or 'off' ranks them)" if unknown else
                "ranked: ffn_dense_first" if skipped is None else
                f"ranked: leaves out {skipped:.1%} of the real rows' (token, block) pairs" if preset is None
                else f"whole rows: ranking would leave out {skipped:.1%} of the real rows' pairs, "
                     f"not more than ffn_skip_min={options.ffn_skip_min:g}")
        n_pairs = None
        if grouped:  # sized on the host, the call needs no sync
            n_pairs = whole_rows[1] if preset is not None else self.backward_pairs(options, T, rows, real, lead)
        if preset is not None:
            # Whole rows: every kept row keeps every block, so the blocks' unit order means nothing to
            # either pass; the units' own order spares the weights' permutation, forward and backward
            # (the build still puts each LoRA factor beside its weight, which costs less than adding the
            # LoRA deltas apart; benchmarks/research/ab_whole_rows.py). The rows are counted on the
            # host: no sync.
            y, block_mask, _, whole, counts = exact_mlp_forward(
                x2, weights, spec, lambda s: preset, seed, call.saved, None, None, grouped, n_pairs,
                counts=None if grouped else [whole_rows[1] // nb] * nb)
        else:  # ranked pairs: scored per block, in the clustered block order
            y, block_mask, _, whole, counts = exact_mlp_forward(
                x2, weights, spec, lambda s: self.backward_mask(s, options, lead, rows, real), seed,
                call.saved, perm, BACKWARD_IMPORTANCE, grouped, n_pairs, self.score_weights(weights, spec, perm))
        # backward routes by the counts (no second count), or by grouped GEMMs (none needed)
        run = MlpRun("grouped") if grouped and not whole else MlpRun(counts=tuple(counts))
        probe_due = self.train_calls % sync.probe_interval(PROBE_EVERY) == 0
        if call.plan.updates_state and (probe_due or "captured" not in self.quality):
            # captured / rel_error: what the backward's blocks hold of the exact output
            self._probe(x2, permute_hidden(weights, spec, perm), spec, block_mask, seed, None, real)
            bx, by = self.buffer_x, self.buffer_y
            if bx.shape[0] and sync.active():  # ranks fit together, at the same call
                self.refit_router(bx, by)
            elif bx.shape[0]:  # the router serves only routed calls (sparse inference): fit then
                self.router_stale = True
        return _Ran(y, block_mask, run, perm=perm, whole=whole, natural_order=preset is not None)

    def _routed(self, call: "_Call", grouped: bool) -> "_Ran":
        """The routed forward (exact_forward off, or sparse inference): the router's blocks per token,
        every block on rows that carry a loss in training under ffn_loss_rows="dense", and the
        compensation's dense term for the blocks a token skips."""
        x, x2, weights, spec, options, seed, T = call.x, call.x2, call.weights, call.spec, call.options, call.seed, call.T
        loss_rows = call.loss_rows
        perm = on_device(self.perm, x.device)
        if not call.plan.recompute:  # a recompute routes as its forward did
            self._refresh_router()
        block_mask = self.route(x2, options, tuple(x.shape[:-1]))
        dense_loss_rows = (call.training and options.ffn_loss_rows == "dense" and loss_rows is not None
                           and loss_rows.numel() == T)
        if dense_loss_rows:
            # rows that carry a loss run every block; not without gradients: an evaluation that passes
            # labels must still measure the sparse forward
            block_mask |= loss_rows[:, None]
        wp = LazyPermuted(weights, spec, perm)  # copied only if a refit or a probe needs it
        terms = self.compensation_terms(options, wp.get, spec)
        comp = None  # ffn_compensate's (U, V, M) on x's device, when this call adds it
        if terms is not None:  # a dense term beside the routed blocks: any ffn_impl
            comp = tuple(on_device(t, x.device, x.dtype) for t in terms)
        n_pairs = self.routed_pairs(options, T, tuple(x.shape[:-1]), loss_rows if dense_loss_rows else None) \
            if grouped else None  # sized on the host: the grouped call needs no sync
        y, run = run_impl(x2, weights, spec, block_mask, seed, options.ffn_impl, call.saved, perm, comp, grouped,
                          n_pairs)
        if call.plan.updates_state and call.training and (
                self.train_calls % sync.probe_interval(PROBE_EVERY) == 0 or "captured" not in self.quality):
            self._probe(x2, wp.get(), spec, block_mask, seed,
                        None if terms is None else tuple(t.to(x.device) for t in terms), call.real)
            bx, by = self.buffer_x, self.buffer_y
            if bx.shape[0]:
                self.refit_router(bx, by)
        return _Ran(y, block_mask, run, perm=perm, comp=comp)

    def _calibrate(self, x2: Tensor, norms: Tensor, weights, spec, plan: CallPlan, seed: int,
                   real: Optional[Tensor] = None) -> None:
        rows = self._sample_rows(x2.shape[0], TOKENS_PER_CALL, seed, x2.device, real)
        self._add_samples(x2[rows], norms[rows])
        if plan.index == plan.options.calibration_steps - 1:  # last calibration call
            fitted = self._agreed_routing(self._fit_routing(weights, spec, plan.options, seed))
            if fitted is not None:
                self.stage(lambda: self._set_routing(*fitted))

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self):
        out = super().state_dict()
        self._refresh_router()  # the router a fit at the last probe would have made
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
        self.router_stale = False  # a saved router was fitted on the saved buffer
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
        if self.impls:
            out["impl"] = dict(self.impls)  # calls per implementation (dense and calibration calls: torch)
            if self._last is not None and (why := kernel_impl_unused(self._last.options.ffn_impl, self.impls)):
                out["impl_why"] = why
        if any(self.backward_choice.values()):
            out["backward"] = dict(self.backward_choice)
            out["backward_why"] = self.backward_why
        if self.grouped_off:
            out["grouped_off"] = self.grouped_off  # ffn_impl="grouped" asked, the torch path served, and why
        return out


SITE_TYPES["mlp"] = MlpSite
