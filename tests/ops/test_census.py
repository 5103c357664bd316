"""Host overhead of the ops, counted on the CPU (spt_compile.testing.Census): kernel launches and
host-device syncs per call (issue 19). The attention site in steady state reads no device data on the
host for any mask form; the mask is analysed once per mask tensor, i.e. once per step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spt_compile
from spt_compile.testing import Census
from toy_models import SPARSE_AT_EVERY_LENGTH


def test_census_counts_launches_and_syncs_of_device_data_only():
    x = torch.randn(4, 4)  # an input: device data
    with Census() as c:
        pass
    assert (c.launches, c.syncs) == (0, 0)
    # outside an spt op nothing is counted: the census watches our ops' implementations
    with Census() as c:
        (x @ x).sum().item()
    assert (c.launches, c.syncs) == (0, 0)


def test_census_sees_a_scalar_read_inside_an_op():
    """Inside a custom op's kernel the dispatch mode sees int(t) / t.item() as aten.item, before it
    decomposes into _local_scalar_dense: both count. The chunked loss's torch path reads its count of
    loss rows once per call (nothing else; the CUDA kernel path reads nothing)."""
    from spt_compile.sparse_ops.linear_cross_entropy import linear_cross_entropy

    h = torch.randn(20, 8, requires_grad=True)
    W = torch.randn(30, 8)
    labels = torch.randint(0, 30, (20,))
    labels[:7] = -100  # a prompt
    with Census() as c:
        linear_cross_entropy(h, W, None, labels, chunk=8, impl="torch")
    assert c.syncs == 1, c.summary()
    assert c.sync_where[0][1].startswith("sparse_ops/linear_cross_entropy/chunked.py") \
        and c.sync_where[0][1].endswith("in _loss_row_chunks"), c.summary()


def _count_inside_op(fn):
    """Run fn as if it were an spt op's implementation (the census counts only inside those)."""
    with Census() as c:
        c._active = True
        with c._modes[0], c._modes[1]:
            fn()
        c._active = False
    return c


def test_census_tells_host_data_from_device_data():
    x = torch.randn(8, 8)

    def work():
        y = torch.softmax(x @ x, dim=-1)  # 2 launches on device data
        lengths = torch.full((2,), 8)  # host data: no device= given
        int(lengths.max())  # a host read of host data: no sync
        lengths.to(x.device)  # a host-to-device copy from pageable memory: one launch and a sync
        y.sum().item()  # one launch (sum) and a sync
        y.tolist()  # a sync
        torch.equal(y, y)  # a sync

    c = _count_inside_op(work)
    assert c.launches == 4, c.ops
    assert c.syncs == 4, c.summary()
    assert c.sync_sites()[("to(device) from pageable host memory", "<outside spt>")] == 1


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, mask, is_causal: bool):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


def _inputs(form: str, B: int, N: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 6, N, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(B, 2, N, 32, generator=g, requires_grad=True) for _ in range(2))
    tri = torch.ones(N, N, dtype=torch.bool).tril()
    if form in ("none", "causal"):
        return q, k, v, None, form == "causal"
    if form == "hf_causal":
        return q, k, v, tri.expand(B, 1, N, N), False
    if form == "padded":
        real = torch.ones(B, N, dtype=torch.bool)
        real[-1, 3 * N // 4:] = False
        return q, k, v, (tri & real[:, None, None, :]).expand(B, 1, N, N), False
    if form in ("cross", "left_padded"):  # a key padding mask [B, 1, 1, N]: the encoder's, or left padding
        keys = torch.ones(B, 1, 1, N, dtype=torch.bool)
        keys[-1, ..., : N // 4] = False
        if form == "cross":  # a decoder's queries, half as many, over the encoder's keys
            q = torch.randn(B, 6, N // 2, 32, generator=g, requires_grad=True)
        return q, k, v, keys, False
    seg = (torch.arange(N) >= N // 2).long()  # packed: two sequences per row
    return q, k, v, (tri & (seg[:, None] == seg[None, :])).expand(B, 1, N, N), False


def _census(compiled, q, k, v, mask, causal, training: bool):
    with Census() as c:
        if training:
            out = compiled(q, k, v, mask, causal)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad(), spt_compile.enable(sparse_inference=True):
                compiled(q.detach(), k.detach(), v.detach(), mask, causal)
    return c


def _compiled(impl: str, block: int = 64):
    """A fresh site each time: a module without weights has its site found by name, so an earlier
    test's would be reused, with its call count (a probe every 25 training calls would then land
    inside a census, depending on which tests this worker ran before)."""
    from spt_compile.registry import REGISTRY

    REGISTRY._by_name = {key: site for key, site in REGISTRY._by_name.items() if key[0] != "attention"}
    torch._dynamo.reset()
    return torch.compile(_Attention(), backend="spt", options={
        "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_impl": impl, "attention_block": block})


@pytest.mark.parametrize("form", ["none", "causal", "hf_causal", "padded", "packed", "cross", "left_padded"])
def test_attention_steady_state_reads_no_device_data_on_the_host(form):
    """Forward + backward of a training call and a sparse inference call: no sync once the mask has
    been seen (every later layer of a step gets the same mask tensor); its first analysis (once per
    step) syncs once: every fact about the mask comes back in one transfer."""
    compiled = _compiled("torch", block=32)
    B, N = 2, 256
    for _ in range(2):  # calibration, then a compile of the training graph
        q, k, v, mask, causal = _inputs(form, B, N)
        compiled(q, k, v, mask, causal).sum().backward()
    q, k, v, mask, causal = _inputs(form, B, N)
    _census(compiled, q, k, v, _inputs(form, B, N)[3], causal, training=False)  # compiles the eval graph
    first = _census(compiled, q, k, v, mask, causal, training=True)
    assert first.syncs <= (0 if mask is None else 1), first.summary()  # the analysis: one transfer
    again = _census(compiled, q, k, v, mask, causal, training=True)
    assert again.syncs == 0, again.summary()
    infer = _census(compiled, q, k, v, mask, causal, training=False)
    assert infer.syncs == 0, infer.summary()
    assert again.ops["topk"] >= 1 and infer.ops["topk"] >= 1, "block selection ran in both calls"


def test_an_in_place_change_of_the_mask_is_analysed_again():
    """The mask's facts are kept per version: a mask changed in place is read again, not trusted."""
    compiled = _compiled("torch", block=32)
    q, k, v, mask, _ = _inputs("padded", 2, 128)
    mask = mask.clone()
    for _ in range(2):
        compiled(q, k, v, mask, False).sum().backward()
    before = compiled(q, k, v, mask, False)
    mask[1, :, :, 64:] = False  # fewer real keys in row 1
    after = compiled(q, k, v, mask, False)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    torch.testing.assert_close(after[1, :, :64], want[1, :, :64], atol=1e-5, rtol=1e-4)  # exact forward
    assert not torch.allclose(before[1], after[1])


class _SwiGLU(torch.nn.Module):
    def __init__(self, d=48, f=128):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(d, f, bias=False), torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("loss_rows", ["dense", "off"])
def test_routed_mlp_syncs_once_per_call_for_its_block_counts(loss_rows):
    """The routed MLP's one host read per call is the tokens per block, which size its block GEMMs
    (rows per block vary by design); backward reuses the forward's counts instead of counting again.
    A training call that keeps whole rows (the default "dense" with the loss outside the graph: every
    row keeps every block) needs no count: 0 syncs; one that ranks pairs ("off") counts once."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _SwiGLU()
    for p in model.parameters():
        p.requires_grad_(False)
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, "ffn_blocks": 4, "ffn_active": 2,
                                                            "ffn_loss_rows": loss_rows})
    x = torch.randn(2, 40, 48, requires_grad=True)
    for _ in range(3):
        compiled(x).sum().backward()
    with torch.no_grad(), spt_compile.enable(sparse_inference=True):
        compiled(x.detach())
    with Census() as train:
        compiled(x).sum().backward()
    assert train.syncs == (0 if loss_rows == "dense" else 1), train.summary()
    with Census() as infer, torch.no_grad(), spt_compile.enable(sparse_inference=True):
        compiled(x.detach())
    assert infer.syncs == 1, infer.summary()
    assert infer.launches > 5
    # whole rows run the dense MLP's few GEMMs forward and backward: fewer launches than a routed forward
    assert train.launches > infer.launches if loss_rows == "off" else train.launches < infer.launches


def _whole_rows_census(T: int, nb: int) -> Census:
    """A training call whose rows all keep every block (the default loss rows, the loss outside the
    graph), LoRA on the three projections."""
    import peft

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = peft.get_peft_model(_SwiGLU(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["gate", "up", "down"]))
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, "ffn_blocks": nb, "ffn_active": nb // 2})
    x = torch.randn(2, T // 2, 48, requires_grad=True)
    for _ in range(3):
        compiled(x).sum().backward()
    with Census() as train:
        compiled(x).sum().backward()
    return train


def test_a_whole_row_backward_in_one_pass_launches_the_same_at_any_block_count(monkeypatch):
    """Off the CPU a backward that keeps every pair runs the whole layer as one block
    (backward.whole_in_one_pass): no sync, the same launches at any token and block count, and fewer
    than block by block, the CPU's way (forced here both ways on CPU tensors)."""
    from spt_compile.sparse_ops.routed_mlp import backward

    monkeypatch.setattr(backward, "whole_in_one_pass", lambda x: False)
    blockwise = {nb: _whole_rows_census(80, nb) for nb in (4, 8)}
    monkeypatch.setattr(backward, "whole_in_one_pass", lambda x: True)
    one_pass = _whole_rows_census(80, 4)
    assert one_pass.syncs == 0, one_pass.summary()
    for T, nb in ((160, 4), (80, 8)):
        other = _whole_rows_census(T, nb)
        assert other.syncs == 0 and other.launches == one_pass.launches, (T, nb, other.summary())
    assert blockwise[8].launches > blockwise[4].launches > one_pass.launches, (blockwise, one_pass.launches)


def _mlp_census(T: int, nb: int):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _SwiGLU()
    for p in model.parameters():
        p.requires_grad_(False)
    # The loss is outside the graph, so no loss rows reach the site: "off" ranks the pairs (the default,
    # "dense", would keep every row whole then), as in a training graph's rows without a loss.
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, "ffn_blocks": nb, "ffn_active": nb // 2,
                                                            "ffn_impl": "grouped", "ffn_loss_rows": "off"})
    x = torch.randn(2, T // 2, 48, requires_grad=True)
    for _ in range(3):
        compiled(x).sum().backward()
    with torch.no_grad(), spt_compile.enable(sparse_inference=True):
        compiled(x.detach())
    with Census() as train:
        compiled(x).sum().backward()
    with Census() as infer, torch.no_grad(), spt_compile.enable(sparse_inference=True):
        compiled(x.detach())
    return train, infer


def test_grouped_routed_mlp_needs_no_sync_and_launches_do_not_grow():
    """ffn_impl="grouped": every block in one grouped GEMM per projection, its offsets on the device and
    the pairs' count known on the host (ffn_active per token), so no host read in a training call
    (exact forward, masked backward) or a sparse-inference call, and the same launches at any token
    count and block count."""
    train, infer = _mlp_census(80, 4)
    assert train.syncs == 0, train.summary()
    assert infer.syncs == 0, infer.summary()
    assert train.ops["_grouped_mm"] >= 3 and infer.ops["_grouped_mm"] >= 3, train.summary()
    for T, nb in ((160, 4), (80, 8)):
        t2, i2 = _mlp_census(T, nb)
        assert (t2.syncs, i2.syncs) == (0, 0)
        assert (t2.launches, i2.launches) == (train.launches, infer.launches), (T, nb, t2.summary())


def test_row_counts_are_read_once_per_step(monkeypatch):
    """The MLP sites' row counts (real rows, loss rows) are read once per pair of mask tensors, however
    many layers ask, and read again for new masks."""
    from spt_compile.sites import row_counts as rc

    reads = []
    real_memo = rc.mask_memo.memo
    monkeypatch.setattr(rc.mask_memo, "memo", lambda t, fact, compute: real_memo(t, fact, lambda: reads.append(1) or compute()))
    real = torch.tensor([True, True, True, False, True, False])
    loss = torch.tensor([False, True, True, True, True, False])
    for _ in range(3):  # three layers
        assert rc.row_counts(6, real, loss) == (4, 4, 3)
    assert len(reads) == 1
    assert rc.row_counts(6, None, loss) == (6, 4, 4) and rc.row_counts(6, real, None) == (4, 0, 0)
    assert rc.row_counts(6, None, None) == (6, 0, 0)
    loss2 = loss.clone()
    loss2[0] = True
    assert rc.row_counts(6, real, loss2) == (4, 5, 4)


def test_a_hugging_face_mask_is_analysed_once_per_step():
    """A Hugging Face decoder builds its 4D mask inside forward; the backward gets an alias of its
    storage after the forward's tensor object is gone. The facts live as long as the storage, so
    forward and backward share one analysis (they made two before)."""
    pytest.importorskip("transformers")
    from toy_models import tiny_llama_batch

    model, ids, attention, labels = tiny_llama_batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH,
                                                             "attention_block": 32})
    for _ in range(3):
        compiled(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
    with Census() as c:
        compiled(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
    analyses = sum(n for (what, where), n in c.sync_sites().items() if "in analyse" in where)
    assert analyses == 1, c.summary()


def _step_census(layers: int, impl: str) -> Census:
    """Census of one training step (the fourth) of a tiny HF LLaMA: padded batch, prompt rows without
    a loss, every spt site and the chunked loss."""
    from toy_models import tiny_llama_batch

    model, ids, attention, labels = tiny_llama_batch(layers=layers, prompt=40)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={
        "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 32, "ffn_impl": impl})
    for _ in range(3):
        compiled(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
    with Census() as c:
        compiled(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
    return c


def test_a_whole_step_syncs_per_step_not_per_layer():
    """A training step of a whole model syncs a fixed number of times, whatever its depth, with the
    grouped MLP: the mask's analysis and the MLP sites' row counts, once each. So does the
    block-batched MLP (the default) here, where every real row carries a label and so keeps every
    block (whole rows: nothing to count); it adds one per layer where it ranks pairs. The loss's torch path, which this CPU run takes, adds its
    count of the rows that carry a loss (on CUDA the Triton kernel runs every row and reads nothing).
    The loss backward reads nothing: the returned logits leave the graph without a gradient, so there
    is no zero gradient of theirs to check (passes/returned_logits.py)."""
    pytest.importorskip("transformers")
    grouped = {layers: _step_census(layers, "grouped") for layers in (2, 4)}
    for c in grouped.values():
        where = sorted(w.split(":")[0] + " " + w.split(" in ")[-1] for (_, w), n in c.sync_sites().items())
        assert c.syncs == 3, c.summary()
        assert where == ["sparse_ops/linear_cross_entropy/chunked.py _loss_row_chunks",
                         "spt_compile/sites/attention.py analyse", "spt_compile/sites/row_counts.py count"], where
    for layers in (2, 4):
        block_batched = _step_census(layers, "torch")
        assert block_batched.syncs == 3, block_batched.summary()


@pytest.mark.parametrize("form", ["causal", "padded"])
def test_an_attention_probe_syncs_once(form):
    """A probing call (the first sparse training call, then every 25th) measures recall and mass on a
    few query positions drawn on the device: both come back in one transfer."""
    from spt_compile.sites.attention import AttentionSite

    compiled = _compiled("torch", block=32)  # a fresh site
    probes = []
    real_probe = AttentionSite._probe
    AttentionSite._probe = lambda self, *a: probes.append(1) or real_probe(self, *a)
    try:
        for _ in range(4):  # calibration (exact), then sparse calls: the first of them probes
            c = _census(compiled, *_inputs(form, 2, 256), training=True)
            if probes:
                break
    finally:
        AttentionSite._probe = real_probe
    assert probes, "a call probed"
    probe = sum(n for (what, where), n in c.sync_sites().items() if "in _probe" in where)
    assert probe == 1, c.summary()


def _exact_mlp_run(monkeypatch):
    """A SwiGLU through the backend (exact forward, masked backward), with every fit_router counted."""
    from spt_compile.sites import mlp as mlp_site

    fits = []
    real_fit = mlp_site.fit_router
    monkeypatch.setattr(mlp_site, "fit_router", lambda bx, by: fits.append(1) or real_fit(bx, by))
    monkeypatch.setattr(mlp_site, "PROBE_EVERY", 2)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _SwiGLU()
    for p in model.parameters():
        p.requires_grad_(False)
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, "ffn_blocks": 4, "ffn_active": 2})
    x = torch.randn(2, 40, 48, requires_grad=True)
    compiled(x).sum().backward()  # calibration: the router's first fit
    return model, compiled, x, fits, real_fit


def test_an_mlp_probe_syncs_once(monkeypatch):
    """A probing training call (the first exact-forward call, then every PROBE_EVERY) draws its tokens on
    the device and brings the quality figures and the router's samples back in one transfer; it does
    not fit the router (exact forward never routes)."""
    from spt_compile.sites import mlp as mlp_site

    _, compiled, x, fits, _ = _exact_mlp_run(monkeypatch)
    probes = []
    real_probe = mlp_site.MlpSite._probe
    monkeypatch.setattr(mlp_site.MlpSite, "_probe", lambda self, *a: probes.append(1) or real_probe(self, *a))
    n_fits = len(fits)
    with Census() as c:
        compiled(x).sum().backward()
    assert probes, "the call probed"
    probe = sum(n for (what, where), n in c.sync_sites().items() if "in _probe" in where)
    assert probe == 1, c.summary()
    assert len(fits) == n_fits


def test_exact_forward_leaves_the_router_fit_to_the_calls_that_route(monkeypatch):
    """Under exact_forward the training calls' probes only mark the router stale; the first routed call
    (sparse inference) or a save fits it, on the samples the probes buffered: the router a fit at the
    probe would have made, without ~30 ms of host work per layer in training."""
    from spt_compile.registry import model_sites

    model, compiled, x, fits, real_fit = _exact_mlp_run(monkeypatch)
    site = next(s for _, s in model_sites(model))
    n_fits = len(fits)
    for _ in range(4):  # two probes
        compiled(x).sum().backward()
    assert len(fits) == n_fits and site.router_stale
    state = site.state_dict()  # a save fits it
    assert len(fits) == n_fits + 1 and not site.router_stale
    torch.testing.assert_close(state["router"], real_fit(site.buffer_x, site.buffer_y), rtol=0, atol=0)
    for _ in range(2):  # probes again
        compiled(x).sum().backward()
    assert site.router_stale
    with torch.no_grad(), spt_compile.enable(sparse_inference=True):
        compiled(x.detach())  # routes: fits first
    assert not site.router_stale and len(fits) == n_fits + 2
    torch.testing.assert_close(site.router, real_fit(site.buffer_x, site.buffer_y), rtol=0, atol=0)


class _DropoutAttention(torch.nn.Module):
    def forward(self, q, k, v, mask, is_causal: bool):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=0.1,
                                              enable_gqa=True)


@pytest.mark.parametrize("exact", [True, False], ids=["exact-forward", "sparse-forward"])
def test_attention_with_dropout_syncs_nothing_in_steady_state(exact):
    """dropout_p > 0: exact both ways under exact_forward, the block-sparse torch path with replayable
    dropout without it; a padded batch's call reads nothing on the host once its mask was analysed."""
    torch._dynamo.reset()
    compiled = torch.compile(_DropoutAttention(), backend="spt", options={
        "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 32, "exact_forward": exact})
    for _ in range(2):
        compiled(*_inputs("padded", 2, 256)).sum().backward()
    q, k, v, mask, causal = _inputs("padded", 2, 256)
    first = _census(compiled, q, k, v, mask, causal, training=True)
    assert first.syncs <= 1, first.summary()  # the new mask's analysis
    again = _census(compiled, q, k, v, mask, causal, training=True)
    assert again.syncs == 0, again.summary()
    if not exact:
        assert again.ops["topk"] >= 1, "block selection ran"


def test_op_cost_counts_bytes_and_matmul_flops():
    """Census.traffic / Census.flops per op (benchmarks/research/mlp_traffic.py prices them): bytes of
    every tensor in and out, and 2 m n k for the matmul family, in-place and grouped forms included."""
    from spt_compile.testing.census import op_cost

    aten = torch.ops.aten
    a, b, c = torch.randn(8, 16), torch.randn(16, 4), torch.randn(8, 4)
    out = a @ b
    assert op_cost(aten.mm.default, [a, b], [out]) == ((8 * 16 + 16 * 4 + 8 * 4) * 4, 2 * 8 * 4 * 16)
    assert op_cost(aten.addmm_.default, [c, a, b], [c])[1] == 2 * 8 * 4 * 16
    assert op_cost(aten.matmul.default, [a, b], [out])[1] == 2 * 8 * 4 * 16
    moved, flops = op_cost(aten.mul.Tensor, [c, c], [c])
    assert (moved, flops) == (3 * 32 * 4, 0)
