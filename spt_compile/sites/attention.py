"""The attention site: the per-layer state behind spt::attention_site (attention_op.py) and how a call runs.

Each call the site reads the run-time options, then either
  * runs exact attention (inside disable(), with sparse_attention=False, or during the site's first
    `calibration_steps` calls, which under token selection also sample keys for the k-means
    codebooks), or
  * encodes the keys with the site's PQ codebooks, selects the top-L keys of every query by the
    asymmetric proxy q . k_hat, and runs exact attention over just those (SDDMM -> softmax -> SpMM).
L comes from the options at run time, so the number of selected keys is an unbacked size in the
graph (`new_dynamic_size`): changing `density` never recompiles.

Selection is by key blocks by default (`attention_selection="block"`, sparse_ops/attention/select.py: a block of
queries attends to its chosen key blocks, one list per GQA group) or per query (`"token"`: top-L keys
by the PQ proxy). Only token selection reads PQ codebooks, so only it pays for them: they are fitted
from the keys buffered by calibration calls that ran under token selection, or, when token selection
is first chosen later (a run-time option), from that call's keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from spt_compile.context import resolve
from spt_compile.distributed import sync
from spt_compile.fitting import pq_codebooks
from spt_compile.options import Options, SptOptionError
from spt_compile.registry import SITE_TYPES, CallPlan, Site, SiteTemplate, SptStateError

from spt_compile.sparse_ops import triton_runs_on
from spt_compile.sparse_ops.attention import pq, select as block_select
from spt_compile.sparse_ops.attention.block_sparse import block_sparse_forward, resolve_impl
from spt_compile.sparse_ops.attention.exact_dropout import attention_with_dropout
from spt_compile.sparse_ops.attention.softcap import capped
from spt_compile.sparse_ops.attention.token_sparse import sparse_attention_forward

from . import mask_memo
from .meta import AttentionMeta

KEYS_PER_CALL = 1024  # keys per kv head sampled from each calibration / training call
KEY_BUFFER = 4096  # keys per kv head kept for the calibration k-means
KMEANS_ITERS = 15
EMA_DECAY = 0.9  # online codebook update per training call
PROBE_ROWS = 32  # query positions per quality probe (all heads)
PROBE_EVERY = 25  # training calls between probes; the first sparse call always probes


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Run SDPA's dropout from a known seed, so that backward can replay it exactly (CUDA inputs: a
    CPU call draws its own masks, exact_dropout.py). Seeds only the
    generator SDPA draws from (the CPU's, or the device's): torch.manual_seed would seed every
    accelerator too, and where one is not initialised it queues the seed with a formatted stack
    trace, about 1 ms per accelerator type per call on this CPU (a third of an SST-2 step's site time)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        if devices:
            torch.cuda.default_generators[device.index if device.index is not None else
                                          torch.cuda.current_device()].manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        yield


def dense_attention(q, k, v, mask, is_causal: bool, scale: float, dropout_p: float, seed: int) -> Tensor:
    """Exact attention [B, H, N, Dv]; with dropout, the mask is a function of `seed` (backward calls
    this again to replay it). On a CPU the weights' mask is drawn from 16-bit uniforms by a generator
    of its own (sparse_ops/attention/exact_dropout.py: a quarter of bernoulli_'s cost, no global RNG
    fork); elsewhere SDPA draws it, from its generator seeded for the call (Philox on CUDA is cheap)."""
    if dropout_p > 0 and q.device.type == "cpu":
        return attention_with_dropout(q, k, v, mask, is_causal, scale, dropout_p, seed)
    gqa = q.shape[1] != k.shape[1]
    ctx = _seeded(seed, q.device) if dropout_p > 0 else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=gqa)


def _sdpa_picks_flash(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
                      dropout_p: float) -> bool:
    """Whether SDPA itself would run these inputs on its flash kernel (its own backend choice: head
    size, alignment, dropout, empty sequences, the device and the user's torch.backends settings)."""
    try:
        choice = torch._fused_sdp_choice(query=q, key=k, value=v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    except (RuntimeError, TypeError, AttributeError):  # a private helper: if it changes, keep the old path
        return False
    return choice == SDPBackend.FLASH_ATTENTION.value


def _cpu_flash_applies(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
                       dropout_p: float) -> bool:
    """Whether SDPA would run these inputs on the CPU flash kernel (GQA included: the kernel reads
    grouped key heads itself). Then the exact call runs that kernel directly and keeps its logsumexp."""
    return q.device.type == "cpu" and _sdpa_picks_flash(q, k, v, mask, is_causal, scale, dropout_p)


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask as SDPA turns it into an additive one before its kernels (False -> -inf)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def dense_attention_with_lse(q, k, v, mask, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """dense_attention and its logsumexp [B, H, N] (fp32 for half inputs), by the CPU flash kernel; only
    where _cpu_flash_applies."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=_float_mask(mask, q.dtype), scale=scale)


def _cuda_flash_applies(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                        scale: float) -> bool:
    """Whether the exact forward can run SDPA's CUDA flash kernel and keep its logsumexp: no mask (the
    kernel takes none), half precision, and flash usable for these inputs (head size, alignment, the
    card, the user's torch.backends switches). Usable, not SDPA's first choice: on Hopper with cuDNN
    newer than 9.15 SDPA tries cuDNN attention first (torch's sdp_utils priority order), which would
    leave every exact forward on the block kernels."""
    if not (q.device.type == "cuda" and mask is None and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, is_causal, q.shape[1] != k.shape[1])
        return bool(torch.backends.cuda.can_use_flash_attention(params))
    except (RuntimeError, TypeError, AttributeError):  # the API changed: SDPA's own choice, as before
        return _sdpa_picks_flash(q, k, v, None, is_causal, scale, 0.0)


def _grouped_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k, v [B, Hkv, Nk, D] with each key head repeated for its group of query heads: [B, H, Nk, D] (the
    CUDA kernels' entry points take equal head counts)."""
    groups = q.shape[1] // k.shape[1]
    return (k, v) if groups == 1 else (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))


def _per_kv_head(dk: Tensor, dv: Tensor, Hkv: int) -> tuple[Tensor, Tensor]:
    """Gradients of _grouped_heads' expanded k, v [B, H, Nk, D] summed over each group: [B, Hkv, Nk, D]."""
    if dk.shape[1] == Hkv:
        return dk, dv
    return dk.unflatten(1, (Hkv, -1)).sum(2), dv.unflatten(1, (Hkv, -1)).sum(2)


def cuda_flash_with_lse(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float,
                        kernel=None) -> tuple[Tensor, Tensor]:
    """Exact attention [B, H, N, Dv] and its natural-log logsumexp [B, H, N] (fp32) from the CUDA flash
    kernel SDPA runs, where _cuda_flash_applies: the exact forward at FlashAttention's speed (on an
    H200 the block-sparse kernels with every key block listed took 0.52 ms for the forward alone at
    SmolLM2's heads, N=8192, against 0.90 ms for FlashAttention's forward and backward). Grouped key
    heads are expanded to the query heads first (the kernel's entry point takes equal head counts).
    kernel: the aten op (a stand-in in CPU tests)."""
    kernel = torch.ops.aten._scaled_dot_product_flash_attention if kernel is None else kernel
    k, v = _grouped_heads(q, k, v)  # [B, H, Nk, D]
    out, lse = kernel(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


def cuda_flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool,
                        scale: float, kernel=None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of cuda_flash_with_lse's output from its out and lse, by SDPA's CUDA flash backward
    kernel: an exact call whose forward ran that kernel needs no second forward in backward. Grouped
    key heads are expanded as the forward expanded them and their gradients summed back per group.
    No dropout (the forward had none), so the RNG-state operands are placeholders the kernel does not
    read; not nested, so no cumulative lengths. kernel: the aten op (a stand-in in CPU tests)."""
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_backward if kernel is None else kernel
    N, Hkv, Nk = q.shape[2], k.shape[1], k.shape[2]
    k, v = _grouped_heads(q, k, v)  # [B, H, Nk, D]
    unused = torch.empty((), dtype=torch.int64)
    dq, dk, dv = kernel(dout, q, k, v, out, lse.float().contiguous(), None, None, N, Nk, 0.0, is_causal, unused,
                        unused, scale=scale)[:3]
    return dq, *_per_kv_head(dk, dv, Hkv)


# An exact training call on CUDA with a mask (a padded batch) has no flash kernel: it runs SDPA without the
# logsumexp, and its backward runs SDPA's forward again before SDPA's backward, one attention forward
# more per layer and step than dense SDPA. With EFFICIENT_WITH_MASK the call runs the kernel SDPA runs
# for masks, the memory-efficient one, itself and keeps its logsumexp, so backward runs that kernel's
# backward only. Off until benchmarks/gpu_check.sh has checked and timed it on a GPU (written and tested
# here against CPU stand-ins of the kernels' contracts).
EFFICIENT_WITH_MASK = False
_EFFICIENT_LSE_ALIGN = 32  # the memory-efficient kernel's logsumexp rows are padded to a multiple of 32
_EFFICIENT_BIAS_ALIGN = 8  # ... and its bias rows must start 8-element aligned (SDPA pads them likewise)


def _efficient_bias(mask: Tensor, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> Tensor:
    """The mask as SDPA hands it to the memory-efficient kernel: additive in q's dtype (False -> -inf),
    each row's start aligned (padded, then sliced back), broadcast to shape [B, H, N, Nk]."""
    bias = _float_mask(mask, dtype)
    if bias.stride(-1) != 1 or any(st % _EFFICIENT_BIAS_ALIGN for st in bias.stride()[:-1]):
        Nk = bias.shape[-1]
        bias = F.pad(bias, (0, _EFFICIENT_BIAS_ALIGN - Nk % _EFFICIENT_BIAS_ALIGN))[..., :Nk]
    return bias.expand(shape)


def _cuda_efficient_applies(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool) -> bool:
    """Whether a masked exact call can run the memory-efficient kernel with its logsumexp kept
    (EFFICIENT_WITH_MASK on, CUDA, a mask, the kernel usable for these inputs with heads expanded)."""
    if not (EFFICIENT_WITH_MASK and q.device.type == "cuda" and mask is not None):
        return False
    try:
        # equal head counts, as the call will pass them (views: nothing is copied to ask)
        kv_shape = (k.shape[0], q.shape[1], k.shape[2])
        params = torch.backends.cuda.SDPAParams(q, k[:, :1].expand(*kv_shape, k.shape[3]),
                                                v[:, :1].expand(*kv_shape, v.shape[3]), mask, 0.0, is_causal, False)
        return bool(torch.backends.cuda.can_use_efficient_attention(params))
    except (RuntimeError, TypeError, AttributeError):  # the API changed: keep the SDPA path
        return False


def cuda_efficient_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, is_causal: bool, scale: float,
                            kernel=None) -> tuple[Tensor, Tensor]:
    """Exact attention [B, H, N, Dv] and its natural-log logsumexp [B, H, N] (fp32) from the CUDA
    memory-efficient kernel, with the mask as SDPA passes it (_efficient_bias). kernel: the aten op (a
    stand-in in CPU tests)."""
    kernel = torch.ops.aten._scaled_dot_product_efficient_attention if kernel is None else kernel
    k, v = _grouped_heads(q, k, v)
    bias = _efficient_bias(mask, q.dtype, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    out, lse = kernel(q, k, v, bias, True, 0.0, is_causal, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


def cuda_efficient_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor, lse: Tensor,
                            is_causal: bool, scale: float, kernel=None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of cuda_efficient_with_lse's output from its out and lse, by the memory-efficient
    backward kernel: no second forward. The bias is rebuilt from the mask (one fill, where saving it
    would keep B x N x Nk elements per layer), the logsumexp padded back to the kernel's row length,
    grouped key heads expanded as forward did and their gradients summed back. No dropout, so the RNG
    operands are placeholders the kernel does not read. kernel: the aten op (a stand-in in CPU tests)."""
    kernel = torch.ops.aten._scaled_dot_product_efficient_attention_backward if kernel is None else kernel
    B, H, N, _ = q.shape
    Hkv = k.shape[1]
    ke, ve = _grouped_heads(q, k, v)  # [B, H, Nk, D]
    bias = _efficient_bias(mask, q.dtype, (B, H, N, ke.shape[2]))
    lse = F.pad(lse.float(), (0, -N % _EFFICIENT_LSE_ALIGN))  # [B, H, N rounded up to the alignment]
    unused = torch.empty((), dtype=torch.int64)
    dq, dk, dv = kernel(dout, q, ke, ve, bias, out, lse, unused, unused, 0.0, [True, True, True, False], is_causal,
                        scale=scale)[:3]
    return dq, *_per_kv_head(dk, dv, Hkv)


def flash_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                   scale: float) -> Optional[tuple[Tensor, Tensor]]:
    """The exact forward's (out, lse [B, H, N] in q's dtype promoted to fp32), contiguous, from the flash
    kernel SDPA would run (CPU, or CUDA without a mask in half precision); None where neither applies
    (the caller runs the block-sparse kernels over every key block)."""
    if _cpu_flash_applies(q, k, v, mask, is_causal, scale, 0.0):
        out, lse = dense_attention_with_lse(q, k, v, mask, is_causal, scale)
    elif _cuda_flash_applies(q, k, v, mask, is_causal, scale):
        out, lse = cuda_flash_with_lse(q, k, v, is_causal, scale)
    else:
        return None
    # the kernels' layouts may be transposed; the fake kernels promise contiguous ones
    return out.contiguous(), lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()


@dataclass(frozen=True)
class MaskFacts:
    """What the site reads from an attention mask [B|1, H|1, N|1, Nk], found once per mask
    (mask_memo: every layer of a step gets the same mask tensor) with one device-to-host transfer.

    causal: a boolean mask allowing exactly the causal lower triangle for every row and head;
    real [B, Nk] bool: keys some query may attend (device); lengths [B] int64: real keys per row
    (host); packed: block_select.packed_segments (segment, length, packed), or None when no row
    packs two sequences; packed_host: the same and `real` on the host (the packed rows' block
    budgets are computed there, without another sync); span: each row's first and last real key
    (block budgets list every block between them where every real key is wanted)."""

    causal: bool
    real: Tensor
    lengths: Tensor
    packed: Optional[tuple[Tensor, Tensor, Tensor]]
    packed_host: Optional[tuple[tuple[Tensor, Tensor, Tensor], Tensor]] = None
    span: Optional[Tensor] = None  # [B, 2] int64 (host): each row's first and last real key
    span_device: Optional[Tensor] = None  # the same on the device


def mask_facts(mask: Tensor, B: int, N: int, Nk: int) -> MaskFacts:
    def analyse() -> MaskFacts:
        real = pq.real_key_mask(mask, B, Nk)  # [B, Nk]
        found = block_select.packed_segments(mask, real, N, packed_known=True)
        packed_rows = found[2] if found is not None else real.new_zeros(B)
        if mask.dim() == 4 and N == Nk and mask.shape[-2:] == (N, Nk):
            # [N, N]: query i sees keys 0..i. Built per analysis, not kept: at N=8192 it is 64 MB.
            triangle = torch.ones(N, N, dtype=torch.bool, device=mask.device).tril()
            if mask.dtype == torch.bool:
                causal = (mask == triangle).all().view(1)
            else:  # additive (eager attention's form): 0 on the triangle, a forbidding value above it
                causal = ((mask > pq.MASK_FORBIDDEN_AT_OR_BELOW) == triangle).all().view(1) & (
                    mask.masked_fill(~triangle, 0) == 0).all().view(1)
        else:
            causal = real.new_zeros(1)
        span = block_select.real_key_span(real)  # [B, 2]: first and last real key
        # the analysis's one sync: every host fact in one transfer (segments too: a few int64 per key)
        parts = [causal.long(), real.sum(-1), packed_rows.long(), span.reshape(-1)]
        if found is not None:
            parts += [found[0].reshape(-1), found[1].reshape(-1), real.long().reshape(-1)]
        host = torch.cat(parts).cpu()
        packed = found is not None and bool(host[1 + B : 1 + 2 * B].any())
        packed_host = None
        span_host = host[1 + 2 * B : 1 + 4 * B].view(B, 2)
        if packed:
            o = 1 + 4 * B
            segment, length, rows = (host[o + j * B * N: o + (j + 1) * B * N].view(B, N) for j in range(3))
            packed_host = ((segment, length, host[1 + B : 1 + 2 * B].bool()), rows[:, :Nk].bool())
        return MaskFacts(bool(host[0]), real, host[1 : 1 + B], found if packed else None, packed_host,
                         span_host, span)

    return mask_memo.memo(mask, ("facts", B, N, Nk), analyse)


def _host_packed_budgets(mask: Tensor, on_host, N: int, options: Options, bm: int, bn: int) -> Tensor:
    """Packed rows' block budgets (select.packed_blocks_per_query) [B, n_qb], computed on the host from
    the mask's analysis (MaskFacts.packed_host): no device memory is read."""
    found, real_host = on_host
    if any(t.device.type != "cpu" for t in (*found, real_host)):
        raise ValueError("_host_packed_budgets: the mask's packed segments must be host tensors")
    return block_select.packed_blocks_per_query(mask, real_host, N, options.density, options.top_l, bm, bn, found,
                                                min_keys=options.attention_min_keys)[0]


def _block_budgets(mask: Optional[Tensor], B: int, N: int, Nk: int, options: Options, bm: int, bn: int):
    """(budget_lb host [B] or [B, n_qb], its device copy [B, n_qb] int32 or None, sink [B, n_qb] on the
    device or None): the key blocks each query block lists, once per mask (mask_memo). The host copy
    sizes the lists; the device copy, where budgets differ between query blocks, is computed on the
    device from the mask's device facts by the same formulas, so nothing is copied to the device (a
    copy from pageable host memory would make CUDA drain the stream first)."""
    n_kb = block_select.n_blocks(Nk, bn)
    floor = options.attention_min_keys
    if mask is None:  # every key real: one budget for all
        return block_select.blocks_per_query(torch.full((B,), Nk), options.density, options.top_l, bn, n_kb,
                                             floor), None, None

    def compute():
        facts = mask_facts(mask, B, N, Nk)
        if facts.packed_host is not None:
            budget = _host_packed_budgets(mask, facts.packed_host, N, options, bm, bn)
            on_device, sink = block_select.packed_blocks_per_query(
                mask, facts.real, N, options.density, options.top_l, bm, bn, facts.packed, host=False, min_keys=floor)
        else:
            budget, sink = block_select.blocks_per_query(facts.lengths, options.density, options.top_l, bn, n_kb,
                                                         floor, block_select.span_blocks(facts.span, bn)), None
            on_device = block_select.blocks_per_query(facts.real.sum(-1), options.density, options.top_l, bn, n_kb,
                                                      floor, block_select.span_blocks(facts.span_device, bn))
        flat = budget.flatten()
        uniform = bool((flat == flat[0]).all())
        n_qb = block_select.n_blocks(N, bm)
        on_device = None if uniform else on_device.to(torch.int32).view(B, -1).expand(B, n_qb)
        return budget, on_device, sink

    return mask_memo.memo(mask, ("block budgets", B, N, Nk, options.density, options.top_l, floor, bm, bn), compute)


def as_causal(mask: Optional[Tensor], is_causal: bool, B: int, N: int, Nk: int) -> tuple[Optional[Tensor], bool]:
    """(None, True) when `mask` allows exactly the causal lower triangle for every batch row and head
    (a boolean mask, or an additive one that is 0 there and forbidding above), else (mask, is_causal)
    unchanged. Hugging Face's SDPA path passes such a bool mask [B, 1, N, N] instead of is_causal=True
    when nothing is padded, its eager path the additive form; read as causal, the block path skips the
    per-element masking and the tile reductions a general mask needs (the mask's analysis, once per
    step, decides it). Forward and backward both call it on the same mask, so they agree."""
    if (mask is None or is_causal or N != Nk or mask.dim() != 4 or mask.shape[-2:] != (N, Nk)):
        return mask, is_causal
    return (None, True) if mask_facts(mask, B, N, Nk).causal else (mask, is_causal)


def real_key_positions(mask: Optional[Tensor], B: int, N: int, Nk: int) -> Optional[Tensor]:
    """[B, Nk] bool: keys some query may attend (padding is never one); None without a mask, where
    every key is real (the readers take None so; a tensor of ones would cost a launch per call)."""
    return None if mask is None else mask_facts(mask, B, N, Nk).real


def token_budget(mask: Optional[Tensor], B: int, N: int, Nk: int, density: float, top_l: Optional[int],
                 min_keys: int = 0) -> Tensor:
    """Keys per query: [B], one per row from its real length; or [B, N] when a row packs several
    sequences (block_select.packed_segments), each query budgeted by its own sequence's length, as
    if it ran alone."""
    row = pq.keys_per_query(real_lengths(mask, B, N, Nk), density, top_l, min_keys)  # [B]
    found = None if mask is None else mask_facts(mask, B, N, Nk).packed
    if found is None:
        return row
    segment, length, packed = found
    per_query = pq.keys_per_query(length, density, top_l, min_keys).gather(1, segment)  # [B, N]
    return torch.where(packed[:, None], per_query, row.to(per_query.device)[:, None])


def real_lengths(mask: Optional[Tensor], B: int, N: int, Nk: int) -> Tensor:
    """Real keys per sequence [B] on the CPU; without a mask every key is real, with one from the
    mask's analysis (mask_facts: one sync per mask)."""
    if mask is None:
        return torch.full((B,), Nk, dtype=torch.int64)
    return mask_facts(mask, B, N, Nk).lengths


def _token_rows_to_keys(sel: Tensor, n: int) -> Tensor:
    """Listed positions [..., L] (-1 unused) -> [..., n] bool."""
    chosen = torch.zeros(*sel.shape[:-1], n + 1, dtype=torch.bool, device=sel.device)
    return chosen.scatter_(-1, torch.where(sel < 0, n, sel.long()), True)[..., :n]  # -1 -> extra column


class AttentionSite(Site):
    kind = "attention"

    def __init__(self, template: SiteTemplate, anchor: Optional[Tensor]):
        super().__init__(template, anchor)
        self.n_kv_heads, self.head_dim = template.shape
        self.codebooks: Optional[Tensor] = None  # [Hkv, S, K, dsub] fp32
        self.key_buffer: Optional[Tensor] = None  # [Hkv, n, D] calibration samples
        self.exact_short_calls = 0  # calls that ran exact for their length (Options.attention_short_reason)
        self.exact_forward_kernels: dict[str, int] = {}  # training calls' exact forward: "flash" or "block" kernels

    def describe(self):
        out = {**super().describe(), "exact_short_calls": self.exact_short_calls}
        if self.exact_forward_kernels:
            out["exact_forward_kernels"] = dict(self.exact_forward_kernels)
        return out

    # --- statistics ---------------------------------------------------------------------------
    def _sample_keys(self, k: Tensor, real: Optional[Tensor], seed: int) -> Tensor:
        """Up to KEYS_PER_CALL real keys per kv head: [Hkv, n, D] fp32 (on k's device). Positions
        whose key is NaN/inf in any head are left out (n may be 0): the codebooks never see them.
        The finiteness test rides on the sync nonzero() makes anyway."""
        usable = torch.isfinite(k).all(-1).all(1)  # [B, Nk]
        usable = usable if real is None else usable & real
        b, n = usable.nonzero(as_tuple=True)
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(b.numel(), generator=gen)[:KEYS_PER_CALL].to(k.device)
        return k[b[pick], :, n[pick], :].transpose(0, 1).float().detach()  # [Hkv, n, D]

    def _fit(self, keys: Tensor, seed: int, options: Options) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return pq_codebooks.fit_codebooks(keys, options.pq_subspace_dim, options.pq_codewords, KMEANS_ITERS, gen)

    def _codebooks_fit(self, options: Options) -> bool:
        """Whether the codebooks exist and have the shape these options' PQ asks for."""
        want = (self.n_kv_heads, self.head_dim // options.pq_subspace_dim, options.pq_codewords,
                options.pq_subspace_dim)
        return self.codebooks is not None and tuple(self.codebooks.shape) == want

    def _calibrate(self, k: Tensor, real: Optional[Tensor], plan: CallPlan, seed: int) -> None:
        """Under token selection, buffers keys for the codebooks, fitted at the last calibration call;
        under block selection nothing (no PQ is needed)."""
        if plan.options.attention_selection != "token":
            return
        keys = self._shared_keys(self._sample_keys(k, real, seed))
        if keys.shape[1]:
            buf = keys if self.key_buffer is None else torch.cat([self.key_buffer, keys], dim=1)
            self.key_buffer = buf[:, -KEY_BUFFER:]
        if plan.index == plan.options.calibration_steps - 1 and self.key_buffer is not None:  # last calibration call
            buffer = self.key_buffer
            fitted = None if not sync.active() else sync.from_rank0(self, "codebooks", self._fit(buffer, seed, plan.options))[0]

            def fit() -> None:
                self.codebooks = fitted if fitted is not None else self._fit(buffer, seed, plan.options)
                self.key_buffer = None

            self.stage(fit)

    def _shared_keys(self, keys: Tensor) -> Tensor:
        """keys [Hkv, n, D] sampled here; under torch.distributed every rank's, in rank order."""
        if not sync.active():
            return keys
        return sync.gather_rows(self, "key samples", keys.transpose(0, 1).contiguous())[0].transpose(0, 1)

    def _probe(self, q, k, mask, is_causal, scale, chosen_fn, options, real, seed, softcap=0.0) -> None:
        """Recall of the true top-L keys and attention mass kept, on a few query positions. The positions
        are drawn on the device and both figures come back in one transfer: one sync per probe (the
        mask is never read on the host here)."""
        chosen_rows, budget = chosen_fn  # budget(): keys per query, [B] or [B, N]
        B, H, N, D = q.shape
        G, Hkv, Nk = H // k.shape[1], k.shape[1], k.shape[2]
        # Keys per query: its row's from the device's real keys (the host's lengths are the same counts);
        # packed rows per query, as the selection budgets them (on the device already)
        L = budget()
        if L.device.type == "cpu":
            real_count = torch.full((B,), Nk, device=q.device) if real is None else real.sum(-1)
            L = pq.keys_per_query(real_count, options.density, options.top_l, options.attention_min_keys)
        k_max = min(Nk, int(pq.keys_per_query(torch.tensor([Nk]), options.density, options.top_l,
                                              options.attention_min_keys)[0]))
        if k_max == 0:  # nothing to measure (still reported: under torch.distributed the average waits for it)
            self.note_quality(recall=float("nan"), mass=float("nan"))
            return
        # PROBE_ROWS real query positions at random: the largest of a random draw, padding ranked last
        gen = torch.Generator(device=q.device).manual_seed(seed + 1)
        u = torch.rand(B, N, generator=gen, device=q.device)
        u = u if real is None else u.masked_fill(~real[:, :N], -1.0)
        drawn, pick = u.flatten().topk(min(PROBE_ROWS, B * N))
        valid = drawn >= 0  # [R]: fewer real positions than PROBE_ROWS leaves padding drawn, not counted
        b, i = pick // N, pick % N
        R = b.numel()
        qr = q[b, :, i].float().view(R, Hkv, G, D)  # query head h uses kv head h // G
        s = torch.einsum("rkgd,rknd->rkgn", qr, k[b].float()).reshape(R, H, Nk) * scale  # no repeat_kv copy
        s = capped(s, softcap)[0]
        if mask is not None:
            m = mask.expand(B, H, N, mask.shape[-1])[b, :, i]
            s = s + m.float() if m.dtype != torch.bool else s
            allowed = m if m.dtype == torch.bool else m > pq.MASK_FORBIDDEN_AT_OR_BELOW
            s = s.masked_fill(~allowed, float("-inf"))
        if is_causal:
            s = s.masked_fill(torch.arange(s.shape[-1], device=q.device).view(1, 1, -1) > i.view(-1, 1, 1),
                              float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        chosen = chosen_rows(b, i) & torch.isfinite(s)  # [R, H, Nk]
        L_rows = (L[b] if L.dim() == 1 else L[b, i]).view(-1, 1)  # [R, 1]
        n_allowed = torch.isfinite(s).sum(-1)  # [R, H]
        k_true = torch.minimum(L_rows.expand_as(n_allowed), n_allowed)  # [R, H], at most k_max
        top = s.topk(k_max, dim=-1).indices
        true_mask = torch.zeros_like(chosen).scatter_(
            -1, top, torch.arange(k_max, device=q.device).view(1, 1, -1) < k_true[..., None])
        hits = (true_mask & chosen).sum(-1).float()
        counted = (valid[:, None] & (k_true > 0)).float()  # [R, H]; none counted: nan (0 / 0)
        recall = (hits / k_true.clamp(min=1) * counted).sum() / counted.sum()
        rows = valid[:, None].float().expand(R, H)
        mass = ((p * chosen).sum(-1) * rows).sum() / rows.sum()
        recall, mass = torch.stack([recall, mass]).tolist()  # the probe's one transfer
        self.note_quality(recall=recall, mass=mass)

    # --- the call -----------------------------------------------------------------------------
    def forward(self, q, k, v, mask, options: Options, is_causal, scale, dropout_p, training, softcap=0.0,
                mask_grad=False):
        """(out [B, H, N, Dv], lse [B, H, N], selection (flat), meta) of one call. softcap > 0: the
        model soft-caps its scores (Gemma-2); SDPA has no cap, so every exact call runs the block-sparse
        kernels over every key block instead (_every_block), as a BLOCK call whose backward is exact.
        mask_grad: the additive mask is a learned bias (T5's, BEiT's, in full fine-tuning), and backward
        returns its gradient: exact calls run SDPA and differentiate it again (DENSE), sparse ones the
        torch block path, which scatters the score gradient into the bias's."""
        options, dense_forced = resolve(options)
        plan = self.begin(options, dense_forced, training)
        options = plan.options  # a recompute inside backward replays its forward's, whatever the context
        self.check_finite(plan, q=q, k=k, v=v)  # not the mask: -inf there is how it forbids keys
        seed = self.call_seed(plan.index)
        B, H, N, _ = q.shape
        Nk = k.shape[2]
        meta = AttentionMeta(AttentionMeta.DENSE, seed).tensor()
        calibrating = self.calibrating(plan)
        # exact_forward with dropout: exact both ways (the sparse backward could not replay SDPA's masks)
        inference_exact = not training and not options.sparse_inference
        exact = (plan.dense_forced or not options.sparse_attention or calibrating or inference_exact
                 or (training and options.exact_forward and dropout_p > 0))
        how = ("calibration" if calibrating else "exact_inference" if inference_exact and options.sparse_attention
               else "exact_forward_dropout" if options.sparse_attention and dropout_p > 0 else "dense")
        real = None
        if not exact:
            real = real_key_positions(mask, B, N, Nk)  # None: no mask, every key real
            how = "exact_forward" if training and options.exact_forward else "sparse"
            if options.attention_short_reason(int(real_lengths(mask, B, N, Nk).max()), training) is not None:
                # a short sequence: exact attention is cheap, and sparsity would cost quality (or the
                # attention_min_keys floor keeps every key anyway)
                exact = True
                how = "exact_short"
                if plan.updates_state:  # a count changes no choice: no need to stage it
                    self.exact_short_calls += 1
        self.count_run(plan, how)
        if exact and softcap:
            with torch.no_grad():
                out, lse, selection, meta = self._every_block_call(q, k, v, mask, options, is_causal, scale,
                                                                   dropout_p, seed, softcap, mask_grad)
                if calibrating and plan.updates_state:
                    self._calibrate(k, real_key_positions(mask, B, N, Nk), plan, seed)
            self.end(plan, training)
            return out, lse, selection, meta
        if exact:
            lse = None
            with torch.no_grad():
                if mask_grad:  # backward differentiates SDPA again, in the bias too (no flash kernel does)
                    out = dense_attention(q, k, v, mask, is_causal, scale, dropout_p, seed)
                elif _cpu_flash_applies(q, k, v, mask, is_causal, scale, dropout_p):  # lse kept: no recompute
                    out, lse = dense_attention_with_lse(q, k, v, mask, is_causal, scale)
                    meta = AttentionMeta(AttentionMeta.DENSE_LSE, seed).tensor()
                elif training and dropout_p == 0 and _cuda_flash_applies(q, k, v, mask, is_causal, scale):
                    # the same for CUDA's flash kernel: backward runs its backward (cuda_flash_backward)
                    out, lse = cuda_flash_with_lse(q, k, v, is_causal, scale)
                    meta = AttentionMeta(AttentionMeta.CUDA_FLASH_LSE, seed).tensor()
                elif training and dropout_p == 0 and _cuda_efficient_applies(q, k, v, mask, is_causal):
                    # a mask (padding) on CUDA: its memory-efficient kernel, lse kept (EFFICIENT_WITH_MASK)
                    out, lse = cuda_efficient_with_lse(q, k, v, mask, is_causal, scale)
                    meta = AttentionMeta(AttentionMeta.CUDA_EFFICIENT_LSE, seed).tensor()
                else:
                    out = dense_attention(q, k, v, mask, is_causal, scale, dropout_p, seed)
                if calibrating and plan.updates_state:
                    self._calibrate(k, real_key_positions(mask, B, N, Nk), plan, seed)
            self.end(plan, training)
            lse_dtype = torch.promote_types(q.dtype, torch.float32)
            lse = torch.zeros(B, H, N, dtype=lse_dtype, device=q.device) if lse is None else lse.to(lse_dtype)
            # SDPA may return a transposed layout; the fake kernel promises a contiguous one.
            return out.contiguous(), lse.contiguous(), q.new_empty(0, dtype=torch.int32), meta

        with torch.no_grad():
            token = options.attention_selection == "token"
            if token and self.head_dim % options.pq_subspace_dim:
                raise SptOptionError(
                    f"spt option attention_selection='token' needs a head size that is a multiple of "
                    f"pq_subspace_dim={options.pq_subspace_dim}; the attention at {self.name or '<top>'} has "
                    f"{self.head_dim}: use attention_selection='block', or compile with a pq_subspace_dim that "
                    f"divides {self.head_dim}", option="attention_selection")
            if token and not self._codebooks_fit(options) and not plan.updates_state:
                # no codebooks to select with, and a call that may not fit them: this call runs exact
                if softcap:
                    out, lse, selection, meta = self._every_block_call(q, k, v, mask, options, is_causal, scale,
                                                                       dropout_p, seed, softcap, mask_grad)
                    self.end(plan, training)
                    return out, lse, selection, meta
                out = dense_attention(q, k, v, mask, is_causal, scale, dropout_p, seed)
                self.end(plan, training)
                lse = torch.zeros(B, H, N, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
                return out.contiguous(), lse, q.new_empty(0, dtype=torch.int32), meta
            if token and not self._codebooks_fit(options):
                # calibration ran under block selection, calibration_steps == 0, it saw no usable key, or
                # the PQ options changed: fit on this call's keys
                keys = self._shared_keys(self._sample_keys(k, real, seed))
                if keys.shape[1] == 0:  # no finite real key to fit on: this call runs exact
                    if softcap:
                        out, lse, selection, meta = self._every_block_call(q, k, v, mask, options, is_causal, scale,
                                                                           dropout_p, seed, softcap, mask_grad)
                        self.end(plan, training)
                        return out, lse, selection, meta
                    out = dense_attention(q, k, v, mask, is_causal, scale, dropout_p, seed)
                    self.end(plan, training)
                    lse = torch.zeros(B, H, N, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
                    return out.contiguous(), lse, q.new_empty(0, dtype=torch.int32), meta
                self.codebooks = sync.from_rank0(self, "codebooks", self._fit(keys, seed, options))[0]
            bias = mask if mask is not None and mask.dtype != torch.bool else None
            # exact_forward (training calls): the exact output and its lse; the selection below decides
            # only which tiles backward computes (the exact Jacobian masked to them: see _exact_with_lse)
            given = self._exact_with_lse(q, k, v, mask, real, options, is_causal, scale, plan.updates_state,
                                         softcap) if (training and options.exact_forward) else None
            if options.attention_selection == "block":
                out, lse, selection, meta, chosen = self._block_forward(q, k, v, mask, bias, real, options,
                                                                         is_causal, scale, dropout_p, seed, given,
                                                                         softcap, mask_grad)
            else:
                out, lse, selection, meta, chosen = self._token_forward(q, k, v, mask, bias, real, options,
                                                                         is_causal, scale, dropout_p, seed, given,
                                                                         softcap)
            if plan.updates_state and training:
                if options.attention_selection == "token":  # only the token proxy reads the codebooks
                    keys = self._shared_keys(self._sample_keys(k, real, seed))
                    if keys.shape[1] and sync.active():  # updated now, rank 0's kept
                        moved = sync.from_rank0(self, "codebooks", pq_codebooks.ema_update(
                            self.codebooks, keys.to(self.codebooks.device), EMA_DECAY))[0]
                        self.stage(lambda: setattr(self, "codebooks", moved))
                    elif keys.shape[1]:
                        self.stage(lambda: setattr(self, "codebooks", pq_codebooks.ema_update(self.codebooks, keys.to(
                            self.codebooks.device), EMA_DECAY)))
                if self.train_calls % sync.probe_interval(PROBE_EVERY) == 0 or "recall" not in self.quality:
                    self._probe(q, k, mask, is_causal, scale, chosen, options, real, seed, softcap)
        self.end(plan, training)
        return out, lse, selection, meta

    def _exact_with_lse(self, q, k, v, mask, real, options, is_causal, scale,
                        count: bool = False, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
        """Exact attention and its logsumexp [B, H, N] (no dropout): the CPU or CUDA flash kernel where
        SDPA would pick it (never for soft-capped scores), else the block-sparse kernels with every key
        block listed (density 1, exactly dense). Backward over selected tiles from this out and lse is
        the exact Jacobian masked to them: P = exp(s - lse) is the full softmax's, and rowsum(dO * O)
        the full output's."""
        flash = None if softcap else flash_with_lse(q, k, v, mask, is_causal, scale)
        if count:  # report(): which kernels served the exact forward (the flash one is the fast one)
            name = "block" if flash is None else "flash"
            self.exact_forward_kernels[name] = self.exact_forward_kernels.get(name, 0) + 1
        if flash is not None:
            return flash
        return self._every_block(q, k, v, mask, real, options, is_causal, scale, 0.0, 0, softcap)[:2]

    def _every_block(self, q, k, v, mask, real, options, is_causal, scale, dropout_p, seed, softcap,
                     mask_grad=False):
        """(out, lse, block_idx [B, Hkv, n_qb, n_kb], impl): the block-sparse kernels over every key
        block, which is exact attention (with dropout: the torch path's, replayed by backward; with a
        learned bias: the torch path, whose backward gives its gradient)."""
        bm = bn = options.attention_block
        n_kb = block_select.n_blocks(k.shape[2], bn)
        every = torch.full((q.shape[0],), n_kb, dtype=torch.int64)
        impl = "torch" if mask_grad else resolve_impl(options.attention_impl, q.device)
        block_idx = block_select.select_blocks(q, k, scale, every, is_causal, mask, real, bm, bn, impl)
        out, lse = block_sparse_forward(q, k, v, block_idx, scale, is_causal, mask, bm, bn, dropout_p, seed, impl,
                                        diag_first=True, softcap=softcap)
        return out, lse, block_idx, impl

    def _every_block_call(self, q, k, v, mask, options, is_causal, scale, dropout_p, seed, softcap, mask_grad=False):
        """An exact call of soft-capped attention as the op returns it: (out, lse, selection, meta) of
        _every_block, as a BLOCK call (its backward, over every key block, is the exact gradient)."""
        B, N, Nk = q.shape[0], q.shape[2], k.shape[2]
        out, lse, block_idx, impl = self._every_block(q, k, v, mask, real_key_positions(mask, B, N, Nk), options,
                                                      is_causal, scale, dropout_p, seed, softcap, mask_grad)
        bm = bn = options.attention_block
        meta = AttentionMeta(AttentionMeta.BLOCK, seed, tuple(block_idx.shape[1:]), bm, bn, impl).tensor()
        return out, lse.to(torch.promote_types(q.dtype, torch.float32)), block_idx.reshape(-1), meta

    def _token_forward(self, q, k, v, mask, bias, real, options, is_causal, scale, dropout_p, seed, given=None,
                       softcap=0.0):
        """Top-L keys per query by a PQ proxy (the asymmetric inner product q . k_hat, or the number
        of subspaces whose codes agree); exact attention over them (or, `given` (out, lse) of the
        exact forward, backward only)."""
        codebooks = self.codebooks.to(k.device)
        per_batch_l = token_budget(mask, q.shape[0], q.shape[2], k.shape[2], options.density,
                                   options.top_l, options.attention_min_keys)  # [B] or [B, N]
        if options.pq_proxy == "agreement":
            q_proxy, k_proxy, proxy_scale = *pq.code_onehots(q, k, codebooks), 1.0
        else:
            q_proxy, k_proxy, proxy_scale = q, pq.pq_decode(pq.pq_encode(k, codebooks), codebooks), scale
        indices = pq.select_keys(q_proxy, k_proxy, proxy_scale, per_batch_l, is_causal, mask)  # [B, H, N, L]
        out, lse = given if given is not None else sparse_attention_forward(q, k, v, indices, scale, bias, dropout_p,
                                                                             seed, softcap)
        meta = AttentionMeta(AttentionMeta.TOKEN, seed, tuple(indices.shape[1:])).tensor()

        def chosen(b, i):  # [R, H, Nk] bool: keys listed for rows (b, i)
            return _token_rows_to_keys(indices[b, :, i], k.shape[2])

        return out, lse, indices.reshape(-1), meta, (chosen, lambda: per_batch_l)

    def _block_forward(self, q, k, v, mask, bias, real, options, is_causal, scale, dropout_p, seed, given=None,
                       softcap=0.0, mask_grad=False):
        """Key blocks per query block (one list per GQA group) by the pooled-key proxy; block-sparse
        exact attention over them (or, `given` (out, lse) of the exact forward, backward only)."""
        bm = bn = options.attention_block
        Nk = k.shape[2]
        n_kb = block_select.n_blocks(Nk, bn)
        # Packed rows (several sequences, a block-diagonal mask): each query block's budget comes from
        # its own sequence's length, as if it ran alone.
        budget_lb, budget_dev, sink = _block_budgets(mask, q.shape[0], q.shape[2], Nk, options, bm, bn)
        impl = resolve_impl(options.attention_impl, q.device)
        if mask_grad:  # the Triton kernels give no bias gradient
            impl = "torch"
        if impl == "triton" and not triton_runs_on(q.device):
            raise SptOptionError(f"spt option attention_impl='triton' needs CUDA tensors; the attention at "
                                 f"{self.name or '<top>'} runs on {q.device.type}: use 'auto' or 'torch'",
                                 option="attention_impl")
        block_idx = block_select.select_blocks(q, k, scale, budget_lb, is_causal, mask, real, bm, bn, impl,
                                               sink=sink, budget_dev=budget_dev)
        # select_blocks lists each query block's diagonal block first (diag_first: no per-chunk check)
        out, lse = given if given is not None else block_sparse_forward(q, k, v, block_idx, scale, is_causal, mask, bm,
                                                                         bn, dropout_p, seed, impl, diag_first=True,
                                                                         softcap=softcap)
        meta = AttentionMeta(AttentionMeta.BLOCK, seed, tuple(block_idx.shape[1:]), bm, bn, impl).tensor()
        G = q.shape[1] // block_idx.shape[1]

        def chosen(b, i):  # [R, H, Nk] bool: keys whose block is listed for rows (b, i)
            rows = block_idx[b, :, i // bm].repeat_interleave(G, dim=1)  # [R, H, Lb]
            blocks = _token_rows_to_keys(rows, n_kb)  # [R, H, n_kb]
            return blocks.repeat_interleave(bn, dim=-1)[..., :Nk]

        # L in keys for the probe's "true top-L": what the density asks for, not the block rounding;
        # computed only on the calls that probe
        return out, lse, block_idx.reshape(-1), meta, (
            chosen, lambda: token_budget(mask, q.shape[0], q.shape[2], Nk, options.density, options.top_l,
                                         options.attention_min_keys))

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self):
        out = super().state_dict()
        if self.codebooks is not None:
            out["codebooks"] = self.codebooks
        if self.key_buffer is not None:
            out["key_buffer"] = self.key_buffer
        return out

    def load_state_dict(self, state):
        cb = state.get("codebooks")
        S = self.head_dim // self.options.pq_subspace_dim
        want = (self.n_kv_heads, S, self.options.pq_codewords, self.options.pq_subspace_dim)
        if cb is not None and tuple(cb.shape) != want:
            raise SptStateError(
                f"saved codebooks of attention site {self.name} have shape {tuple(cb.shape)}, this compile "
                f"needs {want}: compile with the pq_subspace_dim / pq_codewords the state was saved with")
        super().load_state_dict(state)
        self.codebooks = None if cb is None else cb.float().clone()
        kb = state.get("key_buffer")
        self.key_buffer = None if kb is None else kb.float().clone()


SITE_TYPES["attention"] = AttentionSite
