"""FSDP2 (fully_shard per decoder layer and at the root, then torch.compile(backend="spt")) on 2 CPU
ranks: every site rewritten, one site per layer for the whole run (the unsharded weights FSDP
gathers into are one object per parameter), the same state on both ranks, and state saved after
training and loaded into a fresh sharded model before its first forward."""

from __future__ import annotations

import pytest
import torch

from ranks import run_ranks
from test_ddp import batch, rows_of_rank, site_count, state_hash, tiny_llama
from toy_models import SPARSE_AT_EVERY_LENGTH

pytestmark = pytest.mark.slow

OPTIONS = {"calibration_steps": 2, **SPARSE_AT_EVERY_LENGTH, "compiler": "aot_eager"}


def sharded_llama(world: int, compile_blocks: bool = False):
    """fully_shard per decoder layer, then the root; compile_blocks: each layer compiled on its own
    first (torchtitan's recipe), else the caller compiles the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = tiny_llama(lora=True)
    for layer in model.base_model.model.model.layers:
        if compile_blocks:
            layer.compile(backend="spt", options=OPTIONS)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _blocks_compiled(rank, world):
    import spt_compile

    model = sharded_llama(world, compile_blocks=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = rows_of_rank(batch(), rank, world)
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    kinds = [entry["kind"] for entry in spt_compile.report(model)]
    return {"kinds": sorted(kinds), "hash": state_hash(model)}


def test_fsdp2_with_each_block_compiled_rewrites_every_layer():
    ranks = run_ranks(_blocks_compiled, world=2)
    for r in ranks:
        assert r["kinds"] == ["attention", "attention", "mlp", "mlp"], r["kinds"]
    assert ranks[0]["hash"] == ranks[1]["hash"]


def _train_sharded(rank, world, steps, save_to=None, load_from=None):
    import spt_compile
    import spt_compile.sites.mlp as mlp_site
    from spt_compile.registry import REGISTRY

    mlp_site.PROBE_EVERY = 2
    model = sharded_llama(world)
    if load_from is not None:  # before the first forward: the unsharded weights do not exist yet
        spt_compile.load_state_dict(model, torch.load(load_from, weights_only=False))
    compiled = torch.compile(model, backend="spt", options=OPTIONS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = rows_of_rank(batch(), rank, world)
    for _ in range(steps):
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = spt_compile.state_dict(compiled)
    if save_to is not None and rank == 0:
        torch.save(state, save_to)
    runs = {}
    for entry in spt_compile.report(compiled):
        for how, n in entry["runs"].items():
            runs[how] = runs.get(how, 0) + n
    return {"sites": site_count(model), "live_sites": len([s for s in REGISTRY.sites if s.anchor is not None]),
            "hash": state_hash(compiled), "keys": sorted(state), "runs": runs,
            "calls": sorted(int(v) for k, v in state.items() if k.endswith("/calls"))}


def test_fsdp2_rewrites_every_site_and_keeps_one_state_across_steps_and_ranks(tmp_path):
    ckpt = str(tmp_path / "spt.pt")
    ranks = run_ranks(_train_sharded, world=2, args=(5, ckpt))
    for r in ranks:
        assert r["sites"][:2] == (2, 2) and not r["sites"][2], r["sites"]
        assert r["live_sites"] == 4, "a site per layer for the whole run (FSDP's unsharded weights are stable)"
        assert any("router" in k for k in r["keys"]) and r["calls"] == [5] * 4, (r["keys"], r["calls"])
    assert ranks[0]["hash"] == ranks[1]["hash"], "ranks hold different sparse state"
    # a fresh sharded model, state loaded before its first forward: no calibration again, counters go on
    resumed = run_ranks(_train_sharded, world=2, args=(1, None, ckpt))
    for r in resumed:
        assert "calibration" not in r["runs"], r["runs"]
        assert r["calls"] == [6] * 4, r["calls"]
