"""The loss-row operand: the MLP sites receive, as an input of the graph, which rows carry a loss
(passes/loss_rows.py), in Hugging Face's ForCausalLMLoss, a nanoGPT-style shifted loss, a plain
cross_entropy with ignore_index, and inside activation-checkpoint bodies; explain() says where it
comes from, or why a site has none. Under exact_forward with ffn_loss_rows="dense" those rows keep
every block in the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import spt_compile
from spt_compile.sites import mlp as mlp_site
from spt_compile.options import SptOptionError, make_options

from graph_check import GraphCapture
from toy_models import GatedMLP

OPTIONS = {"compiler": "aot_eager", "calibration_steps": 1, "ffn_blocks": 4, "ffn_active": 2, "exact_forward": True}


@pytest.fixture()
def seen(monkeypatch):
    """The loss_rows each MLP site call received, and the backward masks exact_forward chose."""
    got = {"rows": [], "masks": []}
    forward, choose = mlp_site.MlpSite.forward, mlp_site.MlpSite.backward_mask

    def record_forward(self, x, weights, spec, options, training, loss_rows=None, real_rows=None):
        got["rows"].append(None if loss_rows is None else loss_rows.detach().clone())
        return forward(self, x, weights, spec, options, training, loss_rows, real_rows)

    def record_mask(self, *args, **kwargs):
        mask = choose(self, *args, **kwargs)
        got["masks"].append(mask.clone())
        return mask

    monkeypatch.setattr(mlp_site.MlpSite, "forward", record_forward)
    monkeypatch.setattr(mlp_site.MlpSite, "backward_mask", record_mask)
    return got


class TinyLM(nn.Module):
    """Embedding, gated MLP blocks (optionally checkpointed), LM head; the loss in forward, as
    nanoGPT writes it: `shifted` slices the logits, else the targets come pre-aligned."""

    def __init__(self, vocab=53, d=16, layers=2, shifted=False, ckpt=False, ignore=-1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mlps = nn.ModuleList([GatedMLP(d, 40) for _ in range(layers)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.shifted, self.ckpt, self.ignore = shifted, ckpt, ignore

    def forward(self, ids, targets):
        h = self.emb(ids)
        for mlp in self.mlps:
            h = h + (checkpoint(mlp, h, use_reentrant=False) if self.ckpt else mlp(h))
        logits = self.head(h)
        V = logits.shape[-1]
        if self.shifted:
            return F.cross_entropy(logits[:, :-1, :].reshape(-1, V), targets[:, 1:].reshape(-1), ignore_index=self.ignore)
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=self.ignore)


def _batch(B=2, N=12, vocab=53, ignore=-1):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, N), generator=gen)
    targets = torch.randint(0, vocab, (B, N), generator=gen)
    targets[0, :10] = ignore  # a prompt
    targets[1, 6:] = ignore  # padding
    return ids, targets


def _train(model, ids, targets, steps=3, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={**OPTIONS, **options})
    for _ in range(steps):
        compiled(ids, targets).backward()


@pytest.mark.parametrize("shifted,ckpt,mode", [(False, False, "dense"), (True, False, "first"), (False, True, "first"),
                                               (True, True, "dense")])
def test_rows_reach_the_mlp_sites(seen, shifted, ckpt, mode):
    torch.manual_seed(0)
    ids, targets = _batch()
    _train(TinyLM(shifted=shifted, ckpt=ckpt), ids, targets, ffn_loss_rows=mode)
    if shifted:  # position t carries the loss of target t + 1; the last position none
        want = F.pad(targets[:, 1:] != -1, (0, 1), value=False).reshape(-1)
    else:
        want = (targets != -1).reshape(-1)
    assert seen["rows"] and all(r is not None and torch.equal(r, want) for r in seen["rows"])
    # The backward's budget is 2 of 4 blocks per row on average (48 pairs of 24 rows x 4 blocks); the 7-8
    # loss rows take every block first, the rest of the budget goes to the other rows.
    assert seen["masks"]
    for mask in seen["masks"]:
        assert mask[want].all() and mask.sum() == 48


@pytest.mark.parametrize("mode,loss,want_pairs", [("dense", 10, 40), ("first", 10, 20), ("dense", 3, 20),
                                                  ("first", 3, 20), ("off", 10, 20)])
def test_backward_budget_and_loss_rows(mode, loss, want_pairs):
    """10 rows, 4 blocks, 2 per row on average: 20 pairs. "dense" keeps every block of every loss row
    even past the budget; "first" ranks them first within it; "off" ignores them."""
    from spt_compile.registry import SiteTemplate

    options = make_options({"ffn_blocks": 4, "ffn_active": 2, "ffn_loss_rows": mode})
    site = mlp_site.MlpSite(SiteTemplate("mlp", 0, "test", options, (8,)), None)
    scores = torch.rand(10, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(10) < loss
    mask = site.backward_mask(scores, options, (), rows)
    assert mask.sum() == want_pairs
    if mode != "off":
        assert mask[rows].all() if 4 * loss <= want_pairs else mask[rows].sum() == want_pairs
    else:  # the 20 highest scores, whoever they belong to
        assert torch.equal(mask.view(-1), torch.zeros(40, dtype=torch.bool).index_fill_(0, scores.view(-1).topk(20).indices, True))


@pytest.mark.parametrize("head_lora", [False, True], ids=["plain-head", "lora-on-lm_head"])
def test_hugging_face_causal_lm_loss(seen, head_lora):
    """With "lm_head" among PEFT's targets the loss pass leaves the head dense (the chunked loss covers
    plain heads), but the loss rows are read all the same: without them the MLP backward would rank
    every row, loss rows included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).train()
    if head_lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=[
            "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, 11:] = -100
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={**OPTIONS, "ffn_loss_rows": "first"})
    for _ in range(2):
        compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    want = F.pad(labels[:, 1:] != -100, (0, 1), value=False).reshape(-1)  # ForCausalLMLoss's shift
    assert len(seen["rows"]) == 4 and all(torch.equal(r, want) for r in seen["rows"])
    text = str(spt_compile.explain(model, input_ids=ids, attention_mask=mask, labels=labels))
    assert text.count("loss rows from the labels") == 2, text
    assert ("dense     loss" in text) == head_lora, text  # the LoRA head itself is left to the dense loss


def test_graph_shows_the_operand_and_nothing_else_changed():
    """The copied label nodes and the mask are the pass's own (graph_check accepts only those)."""
    ids, targets = _batch()
    torch._dynamo.reset()
    cap = GraphCapture({"ffn_blocks": 4})
    torch.compile(TinyLM(shifted=True, ckpt=True), backend=cap)(ids, targets)
    report = cap.reports[0]
    assert "labels via" in report.loss_rows
    assert all("loss rows from the labels" in s.detail for s in report.rewritten("mlp")), report.sites


def test_no_loss_in_the_graph_is_explained(seen):
    """A model that returns logits (the loss outside the compiled graph): sites run without rows."""

    class Logits(TinyLM):
        def forward(self, ids):
            h = self.emb(ids)
            for mlp in self.mlps:
                h = h + mlp(h)
            return self.head(h)

    ids, targets = _batch()
    model = Logits()
    text = str(spt_compile.explain(model, ids))
    assert "no loss rows: no cross_entropy in this graph" in text
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options=OPTIONS)
    for _ in range(2):
        F.cross_entropy(compiled(ids).view(-1, 53), targets.view(-1), ignore_index=-1).backward()
    assert seen["rows"] and all(r is None for r in seen["rows"])


@pytest.mark.parametrize("value", ["on", True, None])
def test_bad_values_name_the_option(value):
    with pytest.raises(SptOptionError, match="ffn_loss_rows"):
        make_options({"ffn_loss_rows": value})


def test_sparse_evaluation_ignores_loss_rows(monkeypatch):
    """An evaluation that passes labels still measures the sparse forward: without gradients the loss
    rows change nothing (ffn_loss_rows="dense" would otherwise run them through every block)."""
    masks = []
    run_impl = mlp_site.run_impl

    def record(x2, w, spec, block_mask, *args, **kwargs):
        masks.append(block_mask.clone())
        return run_impl(x2, w, spec, block_mask, *args, **kwargs)

    monkeypatch.setattr(mlp_site, "run_impl", record)
    ids, targets = _batch()
    torch.manual_seed(0)
    model = TinyLM()
    _train(model, ids, targets, steps=2, ffn_loss_rows="dense")  # calibrates; training calls run exact
    masks.clear()
    with torch.no_grad(), spt_compile.enable(sparse_inference=True):
        model_out = torch.compile(model, backend="spt", options={**OPTIONS, "ffn_loss_rows": "dense"})(ids, targets)
    assert torch.isfinite(model_out)
    assert masks and all((m.sum(1) == 2).all() for m in masks), [m.sum(1) for m in masks]


@pytest.mark.parametrize("pooler_lora", [False, True], ids=["plain", "lora-on-pooler"])
def test_sequence_classification_pooled_position(seen, pooler_lora):
    """BERT's sequence classification reads position 0 (its pooler and classifier): that row of each
    sequence with a label carries the loss. Also with PEFT's LoRA on the pooler's dense layer (a
    target list such as ["query", "value", "dense"] takes it), whose delta is added to the base
    projection of the same row."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).train()
    if pooler_lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules=["query", "value", "dense"]))
        assert any("pooler.dense.lora_A" in n for n, _ in model.named_parameters())
    ids = torch.randint(1, 101, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = torch.tensor([0, 1, -100])  # the third sequence has no label
    want = torch.zeros(3, 10, dtype=torch.bool)
    want[:2, 0] = True
    _classifier_rows_reach_the_sites(seen, model, ids, mask, labels, "(position 0)", want)


def _classifier_rows_reach_the_sites(seen, model, ids, mask, labels, note: str, want):
    """explain() names the rows on both MLP sites; two training steps give each site `want` [B, N] as
    its loss rows, and those rows keep every block in the backward (ffn_loss_rows "dense")."""
    text = str(spt_compile.explain(model, input_ids=ids, attention_mask=mask, labels=labels))
    assert text.count(f"loss rows from the labels {note}") == 2, text
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options=OPTIONS)
    for _ in range(2):
        compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(seen["rows"]) == 4 and all(torch.equal(r, want.reshape(-1)) for r in seen["rows"]), seen["rows"]
    for m in seen["masks"]:
        assert m[want.reshape(-1)].all()


def test_sequence_classification_on_each_last_token(seen):
    """LLaMA's sequence classification scores every position and reads each sequence's last
    non-padding token, logits[arange(B), argmax(arange(N) * (ids != pad))]: that row of each labelled
    sequence carries the loss, a position per sequence computed from the input ids."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3)
    model = LlamaForSequenceClassification(config).train()
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(2))
    ids[1, 6:] = 0  # right padding: its last real token is position 5
    mask = (ids != 0).long()
    labels = torch.tensor([2, 0, -100])  # the third sequence has no label
    want = torch.zeros(3, 10, dtype=torch.bool)
    want[0, 9] = want[1, 5] = True
    _classifier_rows_reach_the_sites(seen, model, ids, mask, labels, "(each sequence's position", want)


class _Classifier(nn.Module):
    """Embedding, one gated MLP, and a two-class head over position 0 whose output is combined as
    `head` says: "lora" adds a scaled second projection of the same row (a LoRA delta's shape),
    "two-rows" adds a projection of position 1 (not one position: no pooled loss rows)."""

    def __init__(self, head: str):
        super().__init__()
        self.emb, self.mlp = nn.Embedding(50, 32), GatedMLP(32, 64)
        self.base, self.delta = nn.Linear(32, 2), nn.Linear(32, 2, bias=False)
        self.head = head

    def forward(self, ids, labels):
        h = self.emb(ids)
        h = h + self.mlp(h)
        other = h[:, 0] if self.head == "lora" else h[:, 1]
        logits = self.base(torch.tanh(h[:, 0])) + 0.5 * self.delta(other)
        return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("head,pooled", [("lora", True), ("two-rows", False)])
def test_pooled_head_may_combine_values_of_its_row_only(head, pooled):
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    text = str(spt_compile.explain(_Classifier(head), ids, torch.tensor([0, 1, 1])))
    assert ("loss rows from the labels (position 0)" in text) == pooled, text
    if not pooled:
        assert "no loss rows" in text, text


@pytest.mark.parametrize("labels,active,skip_min,want", [
    ("lm", 3, 0.2, "whole"),      # every row but each sequence's last carries a loss: 1/12 of the pairs left out
    ("lm", 3, 0.0, "ranked"),     # ffn_skip_min=0: rank whenever a pair can be left out
    ("prompt", 2, 0.2, "ranked"),  # half of each row a prompt, 2 of 4: half the pairs left out
    ("prompt", 3, 0.3, "whole"),   # 3 of 4 leaves out 1/4 of the pairs: not more than 0.3
    ("all", 2, 0.0, "whole"),     # every row carries a loss: nothing to leave out, whatever ffn_skip_min
])
def test_whole_rows_where_ranking_leaves_out_too_little(labels, active, skip_min, want):
    """Ranking scores and gathers; where it would leave out no more than ffn_skip_min of the real rows'
    pairs every real row keeps every block (and so does a padding row that carries a loss)."""
    from spt_compile.registry import SiteTemplate

    options = make_options({"ffn_blocks": 4, "ffn_active": active, "ffn_skip_min": skip_min})
    site = mlp_site.MlpSite(SiteTemplate("mlp", 0, "test", options, (8,)), None)
    rows = torch.ones(2, 12, dtype=torch.bool)
    if labels == "lm":
        rows[:, -1] = False
    elif labels == "prompt":
        rows[:, :6] = False
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, 10:] = False  # padding
    rows[1, 10] = labels == "all"  # a padding row with a label, in the "all" case
    skipped = site.backward_skipped(options, 24, rows.view(-1), real.view(-1), (2, 12))
    got = site.whole_rows(options, 24, rows.view(-1), real.view(-1), torch.device("cpu"), skipped)
    assert (got is None) == (want == "ranked")
    if got is not None:
        mask, n_pairs = got
        keep = (real | rows).view(-1)
        assert torch.equal(mask, keep[:, None].expand(24, 4)) and n_pairs == 4 * int(keep.sum())


def test_lm_tuning_backward_is_whole_and_dense(seen):
    """A shifted LM loss at the defaults' 3 of 4 blocks: only each sequence's last position carries no
    loss, so ranking would leave out too little: no pair is scored, every row keeps every block, and
    the gradients are dense LoRA's (the last position's gradient is zero anyway)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(3))
    model = TinyLM(shifted=True)
    eager = TinyLM(shifted=True)
    eager.load_state_dict(model.state_dict())
    _train(model, ids, ids, steps=3, ffn_active=3)
    assert seen["rows"] and not seen["masks"]  # rows arrived; backward_mask never ran
    (mlp,) = [s for s in spt_compile.report(model) if s["kind"] == "mlp"][:1]
    assert mlp["backward"] == {"ranked": 0, "whole_rows": 2}, mlp  # 3 calls, the first one calibrates
    # 24 rows, none padding, 2 without a loss: ranking would leave out their 8 of the 96 pairs
    assert mlp["backward_why"].startswith("whole rows: ranking would leave out 8.3%"), mlp
    for p in model.parameters():
        p.grad = None
    compiled = torch.compile(model, backend="spt", options={**OPTIONS, "ffn_active": 3})
    compiled(ids, ids).backward()
    eager(ids, ids).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
