"""The backend's options: one dataclass, validated, with help text on every field.

Run-time options are read by each rewritten site every time it runs, so `enable(...)` and
`disable()` change them without recompiling. Structural options take effect when a graph is compiled.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional

from spt_compile.sparse_ops.attention.block_sparse import IMPLS
from spt_compile.sparse_ops.linear_cross_entropy.chunked import LOSS_IMPLS
from spt_compile.sparse_ops.routed_mlp import FFN_IMPLS

NAMED_COMPILERS = ("inductor", "aot_eager", "eager")  # what "auto" may resolve to ($SPT_COMPILER)
COMPILERS = ("auto", *NAMED_COMPILERS)
COMPILER_ENV = "SPT_COMPILER"
SELECTIONS = ("block", "token")


class SptOptionError(ValueError):
    """An spt option has a bad name or value; the message names the option and the fix."""

    def __init__(self, message: str, option: str = ""):
        super().__init__(message)
        self.option = option


def _opt(default, help: str, runtime: bool):
    return field(default=default, metadata={"help": help, "runtime": runtime})


@dataclass(frozen=True)
class Options:
    # --- run-time: read by every site each call ---
    density: float = _opt(1 / 8, "Keys kept per query, as a fraction of the sequence's real (unpadded) "
                          "length; in (0, 1]. 1.0 keeps every allowed key.", True)
    top_l: Optional[int] = _opt(None, "A fixed number of keys per query (>= 1); overrides density.", True)
    # 3 of 4 by measurement (docs/quality.md): SST-2 dev accuracy of the tuned model evaluated dense -1.03 /
    # -0.69 points (seeds 0 / 1) at 2 of 4 against dense LoRA, +0.46 at 3 of 4 (seed 0).
    ffn_active: Optional[int] = _opt(None, "MLP blocks per token (default: 3/4 of ffn_blocks, at least 1): with "
                                     "exact_forward, the backward's budget, on average over the batch's real tokens; "
                                     "without it, each token's blocks in the forward. ffn_active == ffn_blocks is "
                                     "exactly the dense MLP.", True)
    ffn_budget: Optional[float] = _opt(None, "Per-layer MLP budgets: the share of the dense MLPs' matmul FLOPs the "
                                       "routed MLPs may use, in [1/ffn_blocks, 1]; replaces ffn_active where set. Each "
                                       "layer measures its output error at every block count when it fits its router, "
                                       "and the blocks go where they remove the most error per FLOP: a layer may get "
                                       "more than ffn_active, or all (spt_compile/ffn_budget.py). report() shows each "
                                       "layer's share.", True)
    # Off by measurement (docs/ffn.md, "Load balance"): on SmolLM2 (GSM8K, 8 of 16 blocks) 1.0 cuts the
    # spread of tokens per block from 12.7x to 2.4x but costs 0.9 nats of held-out loss without
    # compensation; it pays only once a grouped GEMM makes uneven blocks cost time (not yet).
    ffn_balance: float = _opt(0.0, "Router load balancing, in [0, 1]: a per-block bias subtracted from the "
                              "router's scores, fitted on the router's buffered tokens, moves each block's "
                              "share of the selections this far from its unbiased share toward "
                              "ffn_active / ffn_blocks (0: off, 1: equal shares).", True)
    # 32 by measurement (docs/ffn.md, "Compensating the skipped blocks"): SmolLM2 on GSM8K at 2 of 4 blocks,
    # held-out loss 5.36 -> 2.56 (dense 1.42) for 1.07x the routed MLP's time; rank 64 reached 2.20
    # but cost 1.29x, most of what routing saves.
    ffn_compensate: int = _opt(32, "Rank of the linear predictors that stand in for the MLP blocks a token skips "
                               "(0: off), per block: x U_b V_b + m_b (reduced-rank ridge regression on the "
                               "router's buffered tokens where the block is skipped), added to the routed "
                               "output for each skipped block; frozen state, gradient to x only.", True)
    # Off by measurement: SST-2 81.3% / 83.0% with 1 against 80.8% / 82.6% without (spt sparse / dense-eval;
    # dense 83.6%: within seed noise), GSM8K held-out loss 1.817 against 1.787 (dense 1.121); and with it a
    # packed row's later sequences (which start mid-row) would no longer match their unpacked results.
    ffn_dense_first: int = _opt(0, "Tokens at the start of each sequence that run every MLP block (0: none): "
                                "the first token ([CLS] of an encoder, the attention sink of a decoder) "
                                "feeds every later one. Needs the MLP input's sequence dimension "
                                "([batch, seq, d]); positions of the row, not real tokens: left padding or packed "
                                "sequences shift them.", True)
    # On by measurement (docs/quality.md): GSM8K held-out loss of the tuned adapter evaluated dense +0.8%
    # of dense LoRA's, against +7.4% when training ran the routed forward.
    exact_forward: bool = _opt(True, "Training calls (those that need gradients) run the exact forward: every MLP "
                               "block and exact attention, so the loss is the dense model's and the tuned model has "
                               "no train/eval mismatch. Only the backward is sparse: the exact Jacobian masked to "
                               "the batch's highest-scoring (token, block) pairs, ffn_active per real token on "
                               "average, and to the key blocks selection picks (docs/quality.md). Calls without "
                               "gradients follow sparse_inference.", True)
    # "dense" by measurement (docs/quality.md): with every row carrying a loss (LM tuning) a masked MLP
    # backward keeps 0.64 of dense LoRA's improvement; with the loss rows whole it keeps 0.96.
    ffn_loss_rows: str = _opt("dense", "Rows that carry a loss, read from the labels in the graph (an LM's tokens "
                              "whose shifted label is not ignore_index; the position a sequence classifier "
                              "reads): 'dense' keeps every MLP block for them in the backward, beyond the "
                              "ffn_active budget if need be (with exact_forward off: in the forward too); "
                              "'first' fills the budget with their blocks first and stops there; 'off' ranks "
                              "them like the others. Where no loss rows reach a site (the loss is outside its "
                              "graph), 'dense' keeps every real row's blocks.", True)
    # 0.2 by measurement (docs/quality.md, "When ranking pays"): one SmolLM2 MLP + LoRA, 8 x 512 tokens,
    # forward + backward against every block kept (benchmarks/research/mlp_rows_ab.py): 1.23x when the
    # ranking leaves out 0.2% of the pairs (LM tuning), 1.20x at 12.5%, about even at 25%, 0.91x at 50%.
    ffn_skip_min: float = _opt(0.2, "Under exact_forward, the backward ranks (token, block) pairs only where it "
                               "leaves out more than this share of the real rows' pairs; else every real row "
                               "keeps every block, which costs less than scoring and gathering (LM tuning, where "
                               "only each sequence's last token carries no loss). In [0, 1]; 1: never rank.", True)
    sparse_inference: bool = _opt(False, "Calls without gradients (evaluation, generation) run the sparse forward: "
                                  "routed MLPs and selected keys, as in training without exact_forward. Off: they "
                                  "run exact, so evaluating through the compiled model measures the model you ship.",
                                  True)
    sparse_attention: bool = _opt(True, "Run matched attention sparse (False: exact attention).", True)
    sparse_ffn: bool = _opt(True, "Run matched MLPs routed (False: every block, i.e. dense).", True)
    # Block selection by measurement: benchmarks/results/attention_*.json and docs/attention.md.
    attention_selection: str = _opt("block", "'block': each block of attention_block queries attends to "
                                    "its chosen key blocks (pooled-key proxy, block-sparse kernels); "
                                    "'token': each query its own top-L keys by the PQ proxy.", True)
    # 2048 by measurement (docs/attention.md): shorter, 64-key blocks at density 1/8 keep too little
    # of the attention (mass kept 0.44 at N=512, 0.67 at 1024, 0.76 at 2048; GSM8K at N=256: held-out
    # loss 2.50 against 1.41 dense), and exact attention is a small share of the step there.
    attention_dense_below: int = _opt(2048, "Calls that run the sparse forward (sparse_inference, or "
                                      "exact_forward off) and whose longest real sequence has fewer keys than "
                                      "this run exact attention (0: sparse at every length above "
                                      "attention_min_keys). report() counts them. Training calls under "
                                      "exact_forward follow attention_backward_dense_below.", True)
    # 1024 and 256 by measurement (docs/quality.md, "Short sequences: a floor of keys for the backward"):
    # WikiText-2 perplexity of the adapter evaluated dense at 1024 tokens -0.30% of dense LoRA's (exact
    # attention: -0.01%), a 1024 x 4 step 0.80x of Inductor's against 0.87x; at 512 (half the keys) the
    # run of record lost 0.07-0.13 points on both seeds (kept 0.969 -> 0.926, 1.098 -> 0.985) for about
    # 1.5% of a 512 x 8 step, so 512 stays exact.
    attention_backward_dense_below: Optional[int] = _opt(
        1024, "Under exact_forward, training calls whose longest real sequence has fewer keys than this "
        "run the exact backward too (None: attention_dense_below, which then governs only calls that "
        "run the sparse forward: sparse_inference, or exact_forward off). The forward is exact at any "
        "length; only the backward is masked to the selected key blocks.", True)
    attention_min_keys: int = _opt(256, "Keys every query keeps at least (all it has, if fewer), whatever "
                                   "density asks; top_l overrides it. A call whose longest real sequence "
                                   "has no more keys than this runs exact attention (report() counts it "
                                   "as exact_short). 0: no floor.", True)
    attention_block: int = _opt(64, "Query and key block size of block selection (a power of two >= 16).", True)
    pq_proxy: str = _opt("adc", "Proxy of token selection: 'adc' (asymmetric inner product q . k_hat) or "
                         "'agreement' (how many subspace codes of query and key agree).", True)
    attention_impl: str = _opt("auto", "Sparse attention implementation: 'triton' (CUDA), 'torch' "
                               "(block-batched PyTorch, the CPU path), 'reference' (dense, for checks) or "
                               "'auto' ($SPT_ATTENTION_IMPL, else triton on CUDA, torch elsewhere).", True)
    ffn_impl: str = _opt("auto", "Routed MLP implementation: 'triton' (CUDA kernels), 'torch' (block-batched "
                         "PyTorch, the CPU path), 'grouped' (the torch path with torch._grouped_mm: every block in "
                         "one GEMM, no host sync; the torch path where it cannot serve), 'reference' (per-token "
                         "loop, for checks) or 'auto' "
                         "($SPT_FFN_IMPL, else torch: faster than the untuned Triton kernels on an H200). It chooses for routed calls "
                         "(exact_forward=False, or sparse_inference=True): the exact forward's training calls run "
                         "the torch path or, with 'grouped', its grouped GEMMs, and so do LoRA dropout and "
                         "calibration calls; report() says which ran (docs/ffn.md).", True)
    check_finite: bool = _opt(False, "Check each rewritten site's inputs for NaN/inf every call and raise "
                              "naming the site (a device sync per call on CUDA). Off: such values pass "
                              "through as in the dense model; they never enter the sparse state.", True)
    # --- structural: read when a graph is compiled ---
    ffn_blocks: int = _opt(4, "Blocks the MLP hidden layer is cut into.", False)
    ffn_cluster: bool = _opt(True, "At the end of calibration, group hidden units that fire together into "
                             "the same block (a permutation kept by the backend; weights untouched).", False)
    pq_subspace_dim: int = _opt(8, "Dimensions per product-quantization subspace of a head.", False)
    pq_codewords: int = _opt(16, "Codewords per PQ subspace (at most 256).", False)
    calibration_steps: int = _opt(4, "First calls of each site that run dense to collect statistics "
                                  "(k-means on keys, router fit), in training or not.", False)
    fast_dropout: bool = _opt(True, "Rewrite the graph's training-mode F.dropout calls on CPU tensors into "
                              "spt::dropout: masks from 16-bit uniforms (p on a 2^-16 grid, the expected output "
                              "exact), drawn again in backward from a seed instead of saved; 3x faster masks on a "
                              "CPU, not eager's masks (passes/dropout.py). Applies under compiler='aot_eager' or "
                              "'eager'; Inductor (the default) generates its own masks, fused.", False)
    chunked_loss: bool = _opt(True, "Rewrite cross_entropy(linear(h, W_vocab), labels) (the LM head and its loss) "
                              "into one chunked op that saves no [tokens, vocab] tensor for backward.", False)
    # 512 rows of SmolLM2's 49152-word vocabulary are 100 MB of fp32 logits per chunk, against 403 MB
    # for the log-softmax the dense loss saves at 2048 tokens; the GEMM per chunk stays large.
    loss_chunk: int = _opt(512, "Tokens per chunk of the chunked loss (>= 1).", False)
    loss_impl: str = _opt("auto", "Each chunk's loss and d(logits): 'triton' (one kernel, two passes over the "
                          "chunk's logits), 'torch' (about 15 PyTorch ops) or 'auto' ($SPT_LOSS_IMPL, else "
                          "triton on CUDA, torch elsewhere).", False)
    # Inductor by measurement (docs/quality.md, "On a faster CPU"): alternating with aot_eager step by step
    # on SmolLM2 + LoRA it ran 0.965x of dense Inductor's step at 512 x 8 (aot_eager 0.999x) and 0.667x at
    # 2048 x 1 (0.767x), faster in 15 of 16 rounds, with the same GSM8K probe loss; it costs 45-60 s more
    # compile per model, and at 512 tokens a step and below aot_eager is 2-10% faster. $SPT_COMPILER picks
    # another for a whole process (the test suite: aot_eager).
    compiler: str = _opt("auto", "Downstream compiler for the rewritten graph: 'inductor', 'aot_eager', 'eager' "
                         "or 'auto' ($SPT_COMPILER if set, else inductor).", False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def downstream_compiler(self) -> str:
        """`compiler` with 'auto' resolved: $SPT_COMPILER if set, else inductor."""
        return resolve_compiler(self.compiler)

    @property
    def active_blocks(self) -> int:
        return self.ffn_active if self.ffn_active is not None else max(1, (3 * self.ffn_blocks) // 4)

    def _attention_threshold(self, training: bool) -> tuple[str, int]:
        """(option name, keys) of the length threshold a call follows: attention_backward_dense_below
        for training calls under exact_forward (where set), attention_dense_below otherwise."""
        if training and self.exact_forward and self.attention_backward_dense_below is not None:
            return "attention_backward_dense_below", self.attention_backward_dense_below
        return "attention_dense_below", self.attention_dense_below

    def attention_exact_below(self, training: bool) -> int:
        """Keys below which a call runs exact attention (_attention_threshold)."""
        return self._attention_threshold(training)[1]

    def attention_short_reason(self, longest: int, training: bool) -> Optional[str]:
        """Why a call whose longest real sequence has `longest` keys runs exact attention, or None:
        below the threshold of _attention_threshold, or within the attention_min_keys floor (every
        query would keep every key; exact attention computes the same for less). The reason names
        the option to lower."""
        name, below = self._attention_threshold(training)
        if longest < below:
            return f"below {name}={below}"
        if self.top_l is None and 0 < longest <= self.attention_min_keys:
            return f"within attention_min_keys={self.attention_min_keys}: every key kept"
        return None

    def runtime_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["runtime"]}


OPTION_NAMES = tuple(f.name for f in fields(Options))
RUNTIME_NAMES = tuple(f.name for f in fields(Options) if f.metadata["runtime"])


def _bad(name: str, want: str, got: Any) -> SptOptionError:
    return SptOptionError(f"spt option '{name}' must be {want}; got {got!r}", option=name)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(o: Options) -> None:
    """Checks every field; raises SptOptionError naming the first bad one."""
    if not isinstance(o.density, (int, float)) or isinstance(o.density, bool) or not (
        math.isfinite(o.density) and 0 < o.density <= 1
    ):
        raise _bad("density", "a float in (0, 1]", o.density)
    if o.top_l is not None and (not is_int(o.top_l) or o.top_l < 1):
        raise _bad("top_l", "an int >= 1 or None", o.top_l)
    for name in ("exact_forward", "sparse_inference", "sparse_attention", "sparse_ffn", "ffn_cluster", "chunked_loss", "check_finite"):
        if not isinstance(getattr(o, name), bool):
            raise _bad(name, "True or False", getattr(o, name))
    if o.attention_selection not in SELECTIONS:
        raise _bad("attention_selection", f"one of {', '.join(SELECTIONS)}", o.attention_selection)
    if not is_int(o.attention_dense_below) or o.attention_dense_below < 0:
        raise _bad("attention_dense_below", "an int >= 0", o.attention_dense_below)
    if o.attention_backward_dense_below is not None and (
            not is_int(o.attention_backward_dense_below) or o.attention_backward_dense_below < 0):
        raise _bad("attention_backward_dense_below", "an int >= 0 or None (attention_dense_below)",
                   o.attention_backward_dense_below)
    if not is_int(o.attention_min_keys) or o.attention_min_keys < 0:
        raise _bad("attention_min_keys", "an int >= 0 (0: no floor)", o.attention_min_keys)
    if not is_int(o.attention_block) or o.attention_block < 16 or o.attention_block & (o.attention_block - 1):
        raise _bad("attention_block", "a power of two >= 16", o.attention_block)
    if o.ffn_loss_rows not in ("dense", "first", "off"):
        raise _bad("ffn_loss_rows", "'dense', 'first' or 'off'", o.ffn_loss_rows)
    if not isinstance(o.ffn_skip_min, (int, float)) or isinstance(o.ffn_skip_min, bool) or not (
        math.isfinite(o.ffn_skip_min) and 0 <= o.ffn_skip_min <= 1
    ):
        raise _bad("ffn_skip_min", "a float in [0, 1] (the least share of pairs a ranked backward leaves out)",
                   o.ffn_skip_min)
    if o.pq_proxy not in ("adc", "agreement"):
        raise _bad("pq_proxy", "'adc' or 'agreement'", o.pq_proxy)
    if o.attention_impl not in IMPLS:
        raise _bad("attention_impl", f"one of {', '.join(IMPLS)}", o.attention_impl)
    if o.loss_impl not in LOSS_IMPLS:
        raise _bad("loss_impl", f"one of {', '.join(LOSS_IMPLS)}", o.loss_impl)
    if o.ffn_impl not in FFN_IMPLS:
        raise _bad("ffn_impl", f"one of {', '.join(FFN_IMPLS)}", o.ffn_impl)
    if not is_int(o.ffn_blocks) or o.ffn_blocks < 1:
        raise _bad("ffn_blocks", "an int >= 1", o.ffn_blocks)
    if o.ffn_active is not None and (not is_int(o.ffn_active) or not 1 <= o.ffn_active <= o.ffn_blocks):
        raise _bad("ffn_active", f"an int in [1, ffn_blocks={o.ffn_blocks}] or None", o.ffn_active)
    if o.ffn_budget is not None and (
            not isinstance(o.ffn_budget, (int, float)) or isinstance(o.ffn_budget, bool)
            or not (math.isfinite(o.ffn_budget) and 1 / o.ffn_blocks <= o.ffn_budget <= 1)):
        raise _bad("ffn_budget", f"None or a float in [1/ffn_blocks, 1] = [{1 / o.ffn_blocks:.4g}, 1] (every layer "
                   "keeps at least one block per token; use more ffn_blocks for a smaller share)", o.ffn_budget)
    if not isinstance(o.ffn_balance, (int, float)) or isinstance(o.ffn_balance, bool) or not (
        math.isfinite(o.ffn_balance) and 0 <= o.ffn_balance <= 1
    ):
        raise _bad("ffn_balance", "a float in [0, 1] (0: off, 1: every block gets an equal share of tokens)",
                   o.ffn_balance)
    if not is_int(o.ffn_dense_first) or o.ffn_dense_first < 0:
        raise _bad("ffn_dense_first", "an int >= 0 (tokens per sequence that run every MLP block)", o.ffn_dense_first)
    if not is_int(o.ffn_compensate) or o.ffn_compensate < 0:
        raise _bad("ffn_compensate", "an int >= 0 (the predictors' rank; 0: off)", o.ffn_compensate)
    if not is_int(o.pq_subspace_dim) or o.pq_subspace_dim < 1:
        raise _bad("pq_subspace_dim", "an int >= 1", o.pq_subspace_dim)
    if not is_int(o.pq_codewords) or not 1 <= o.pq_codewords <= 256:
        raise _bad("pq_codewords", "an int in [1, 256] (codes are stored as uint8)", o.pq_codewords)
    if not is_int(o.calibration_steps) or o.calibration_steps < 0:
        raise _bad("calibration_steps", "an int >= 0", o.calibration_steps)
    if not is_int(o.loss_chunk) or o.loss_chunk < 1:
        raise _bad("loss_chunk", "an int >= 1 (tokens per chunk)", o.loss_chunk)
    if o.compiler not in COMPILERS:
        raise _bad("compiler", f"one of {', '.join(COMPILERS)}", o.compiler)


def resolve_compiler(name: str) -> str:
    """'auto' -> $SPT_COMPILER if set (one of the named compilers), else 'inductor'; others unchanged."""
    if name != "auto":
        return name
    chosen = os.environ.get(COMPILER_ENV, "").strip()
    if not chosen:
        return "inductor"
    if chosen not in NAMED_COMPILERS:
        raise SptOptionError(f"{COMPILER_ENV}={chosen!r}: must be one of {', '.join(NAMED_COMPILERS)} "
                             f"(or unset for inductor)", option="compiler")
    return chosen


def check_names(given: Mapping[str, Any], where: str) -> None:
    for name in given:
        if name not in OPTION_NAMES:
            close = difflib.get_close_matches(name, OPTION_NAMES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid options: {', '.join(OPTION_NAMES)}"
            raise SptOptionError(f"unknown spt option '{name}' in {where}{hint}", option=name)


def make_options(given: Optional[Mapping[str, Any]] = None, base: Optional[Options] = None,
                 where: str = "options") -> Options:
    """Options from a dict of overrides on top of `base` (or the defaults), validated."""
    given = dict(given or {})
    check_names(given, where)
    return replace(base or Options(), **given)


def options_help() -> str:
    """One line per option: name, default, kind, help; for docs and --help texts."""
    lines = []
    for f in fields(Options):
        kind = "run-time" if f.metadata["runtime"] else "structural"
        lines.append(f"{f.name:18} = {f.default!r:12} ({kind}) {f.metadata['help']}")
    return "\n".join(lines)
