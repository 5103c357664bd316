"""Matmul FLOPs of one LoRA fine-tuning step (forward + backward), per part, dense vs spt.

The *FLOP-count limit* of an spt configuration is spt FLOPs / dense FLOPs: the step-time ratio it
would reach if time followed matmul FLOPs. benchmarks/bench_finetune.py prints it beside the
measured ratio so the gap shows. Conventions (per token-row, x [T, a] -> [T, b] costs 2*T*a*b forward):

* frozen base weight: forward + d(x) = 2x forward; trainable LoRA factor: forward + d(x) + d(W) = 3x;
* attention (QK^T and PV, 4*H*D per query-key pair): forward + backward = 3x forward, causal pairs
  only; spt keeps min(i + 1, L) keys for query i with L = density * N (the token-level count; block
  selection keeps the same number in 64-key blocks), at least attention_min_keys, or all when the
  call runs exact for its length (N < attention_dense_below, or attention_backward_dense_below under
  exact_forward);
* routed FFN: the base weights and the block-side LoRA factors (B of gate/up, A of down) scale with
  the active fraction; the other LoRA factors run for every token;
* LM head: frozen (tied to the embedding in SmolLM2): 2x forward, dense or chunked (the chunked
  loss forms d(h) in forward while each chunk's logits exist: the same two GEMMs). The chunked
  loss's d(h) GEMM runs over the rows that carry a loss only (the torch path; the CUDA kernel runs
  every row); its logits GEMM over every row, since the model returns them;
* exact_forward: every forward matmul runs whole (attention over every allowed pair, every MLP block);
  only the backward's share (attention: 2x forward; frozen base: 1x; LoRA factor: 2x) scales with
  the kept pairs and the active fraction.
Norms, RoPE, softmax, the optimizer and the embedding are left out (no GEMMs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    d: int  # hidden size
    H: int  # query heads
    Hkv: int  # key/value heads
    D: int  # head size
    F: int  # MLP intermediate size
    V: int  # vocabulary
    layers: int
    r: int = 16  # LoRA rank (on q, k, v, o, gate, up, down)

    @classmethod
    def from_config(cls, config, r: int = 16) -> "Dims":
        D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, D,
                   config.intermediate_size, config.vocab_size, config.num_hidden_layers, r)


def _lora_linear(T: int, a: int, b: int, r: int, frac_base=1.0, frac_a=1.0, frac_b=1.0,
                 exact_forward: bool = False) -> float:
    """Frozen a -> b linear plus LoRA a -> r -> b, forward + backward (exact_forward: the fractions
    apply to the backward's share only)."""
    if exact_forward:
        return 2 * T * a * b * (1 + frac_base) + 2 * T * r * (a * (1 + 2 * frac_a) + b * (1 + 2 * frac_b))
    return 2 * 2 * T * a * b * frac_base + 3 * 2 * T * r * (a * frac_a + b * frac_b)


def _attention_pairs(N: int, keep: int | None) -> int:
    """Causal query-key pairs of one sequence; keep: keys per query (None: all allowed)."""
    if keep is None or keep >= N:
        return N * (N + 1) // 2
    return keep * (keep + 1) // 2 + (N - keep) * keep  # queries 0..keep-1 keep all they may see


def step_flops(dims: Dims, N: int, batch: int = 1, *, density: float = 1.0, ffn_frac: float = 1.0,
               sparse_attention: bool = False, exact_forward: bool = False, head_grad_frac: float = 1.0
               ) -> dict[str, float]:
    """Matmul FLOPs of one step by part: attention, ffn, qkvo, lm_head_loss (and total).
    head_grad_frac: the share of rows whose d(h) the LM head computes (the chunked loss: loss rows)."""
    T = N * batch
    dm = dims
    q_out, kv_out = dm.H * dm.D, dm.Hkv * dm.D
    qkvo = dm.layers * (_lora_linear(T, dm.d, q_out, dm.r) + 2 * _lora_linear(T, dm.d, kv_out, dm.r)
                        + _lora_linear(T, q_out, dm.d, dm.r))
    keep = max(1, round(density * N)) if sparse_attention else None
    pairs = _attention_pairs(N, keep)
    forward_pairs = _attention_pairs(N, None) if exact_forward else pairs
    attention = dm.layers * batch * 4 * dm.H * dm.D * (forward_pairs + 2 * pairs)
    f, e = ffn_frac, exact_forward
    ffn = dm.layers * (2 * _lora_linear(T, dm.d, dm.F, dm.r, f, 1.0, f, e) + _lora_linear(T, dm.F, dm.d, dm.r, f, f, 1.0, e))
    head = 2 * T * dm.d * dm.V * (1 + head_grad_frac)
    parts = {"attention": attention, "ffn": ffn, "qkvo": qkvo, "lm_head_loss": head}
    parts["total"] = sum(parts.values())
    return parts


def spt_settings(options: dict, N: int, loss_frac: float = 1.0) -> dict:
    """step_flops keyword arguments for an spt configuration (its options over the defaults).
    loss_frac: the share of rows that carry a loss; under exact_forward with ffn_loss_rows="dense"
    they keep every MLP block in the backward, so the MLP's backward share is at least that; the
    chunked loss (chunked_loss) forms d(h) for them only."""
    from spt_compile.options import make_options

    o = make_options(options)
    sparse_attention = o.sparse_attention and o.attention_short_reason(N, training=True) is None
    density = o.top_l / N if o.top_l else min(1.0, max(o.density, o.attention_min_keys / N))
    frac = o.active_blocks / o.ffn_blocks if o.sparse_ffn else 1.0
    if o.ffn_loss_rows == "dense" and o.sparse_ffn:
        frac = max(frac, min(1.0, loss_frac))
    return {"density": density, "sparse_attention": sparse_attention,
            "ffn_frac": frac, "exact_forward": o.exact_forward,
            "head_grad_frac": min(1.0, loss_frac) if o.chunked_loss else 1.0}


def flop_limit(dims: Dims, N: int, batch: int, options: dict, loss_frac: float = 1.0) -> tuple[float, dict, dict]:
    """(spt FLOPs / dense FLOPs, spt parts, dense parts) for an spt configuration."""
    dense = step_flops(dims, N, batch)
    spt = step_flops(dims, N, batch, **spt_settings(options, N, loss_frac))
    return spt["total"] / dense["total"], spt, dense
