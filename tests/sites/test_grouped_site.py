"""ffn_impl="grouped" through torch.compile on a Hugging Face decoder with padding and partial labels:
the pairs' count the site derives on the host (ffn_active per real row, the loss rows' pairs, the row
counts read once per step) is the count of the mask it makes, and the step equals ffn_impl="torch"'s."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def _step(impl: str, monkeypatch, **options):
    from spt_compile.sparse_ops.routed_mlp import grouped
    from toy_models import tiny_llama_batch

    ran = []
    gmm = grouped._gmm
    monkeypatch.setattr(grouped, "_gmm", lambda *a: ran.append(1) or gmm(*a))

    model, ids, attention, labels = tiny_llama_batch(seq=24, pad_from=17, prompt=9)  # padding, a prompt row
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)  # the MLPs train, as their LoRA factors would
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, "ffn_impl": impl,
                                                             "ffn_active": 2, **options})
    for _ in range(3):
        model.zero_grad()
        loss = compiled(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
    assert bool(ran) == (impl == "grouped"), "grouped GEMMs ran exactly when asked for"
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{}, {"ffn_loss_rows": "first"}, {"ffn_loss_rows": "off"},
                                     {"exact_forward": False}, {"ffn_dense_first": 2}],
                         ids=["loss-rows-dense", "loss-rows-first", "loss-rows-off", "routed", "dense-first"])
def test_grouped_equals_block_batched_on_a_padded_batch_with_prompts(options, monkeypatch):
    loss_t, grads_t = _step("torch", monkeypatch, **options)
    loss_g, grads_g = _step("grouped", monkeypatch, **options)
    torch.testing.assert_close(loss_g, loss_t, atol=1e-6, rtol=1e-6)
    assert grads_g.keys() == grads_t.keys() and grads_t
    for name in grads_t:
        torch.testing.assert_close(grads_g[name], grads_t[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_report_says_which_implementation_ran_and_why_not_grouped():
    """report() counts calls per implementation, and names why ffn_impl="grouped" could not serve a
    layer (here: 100 hidden units in 8 blocks are unequal blocks)."""
    import spt_compile
    from toy_models import compiled_gated_mlp

    for hidden, off in ((64, None), (100, "unequal blocks")):
        model, compiled = compiled_gated_mlp(24, hidden, exact_forward=True, ffn_impl="grouped", ffn_blocks=8,
                                             ffn_active=4, ffn_loss_rows="off")  # no loss in the graph: rank
        x = torch.randn(2, 10, 24, requires_grad=True)
        for _ in range(3):
            compiled(x).sum().backward()
        (site,) = [s for s in spt_compile.report(model) if s["kind"] == "mlp"]
        if off is None:
            assert site["impl"].get("grouped", 0) >= 1 and "grouped_off" not in site, site
        else:
            assert "grouped" not in site["impl"] and off in site["grouped_off"], site
