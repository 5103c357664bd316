"""DDP with backend="spt" on 2 CPU ranks (gloo): the same numbers as one process, every site
rewritten however DDP splits the graph, one sparse state on every rank, resume, and bad input.

Each test starts 2 fresh processes (tests/distributed/ranks.py); a tiny random LLaMA stands in for a
real model (shapes and forms, not quality, are what these tests check)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ranks import run_ranks
from toy_models import SPARSE_AT_EVERY_LENGTH

pytestmark = pytest.mark.slow

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Every key and every block: the degenerate configuration, equal to dense.
EVERYTHING = {"density": 1.0, "ffn_blocks": 4, "ffn_active": 4, "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH,
              "compiler": "aot_eager"}


def tiny_llama(lora: bool, hidden: int = 64, intermediate: int = 192, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    return model


def batch(rows: int = 4, length: int = 128) -> torch.Tensor:
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(1))


def rows_of_rank(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = ids.shape[0] // world
    return ids[rank * per : (rank + 1) * per]


def state_hash(model) -> str:
    import spt_compile

    digest = hashlib.sha256()
    for name, t in sorted(spt_compile.state_dict(model).items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def site_count(model) -> tuple[int, int, list]:
    import spt_compile

    reports = spt_compile.compile_reports(model)
    rewritten = [s for r in reports for s in r.rewritten() if s.kind in ("attention", "mlp")]
    dense = [(s.kind, s.path, s.reason) for r in reports for s in r.dense()]
    return sum(s.kind == "attention" for s in rewritten), sum(s.kind == "mlp" for s in rewritten), dense


def lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- 1. the same numbers as one process -------------------------------------------------------

def _two_steps_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tiny_llama(lora=True)
    compiled = torch.compile(DDP(model), backend="spt", options=EVERYTHING)
    ids = rows_of_rank(batch(), rank, world)
    losses = []
    for _ in range(2):  # calibration, then a sparse call with every key and block
        model.zero_grad()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    return {"losses": losses, "grads": lora_grads(model), "sites": site_count(model)}


def test_ddp_with_everything_selected_equals_one_process_over_the_global_batch():
    import spt_compile  # noqa: F401

    ranks = run_ranks(_two_steps_ddp, world=2)
    model = tiny_llama(lora=True)
    compiled = torch.compile(model, backend="spt", options=EVERYTHING)
    ids = batch()
    for _ in range(2):
        model.zero_grad()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
    one = lora_grads(model)
    assert ranks[0]["sites"][:2] == (2, 2) and not ranks[0]["sites"][2], ranks[0]["sites"]
    # equal-length rows, every token labelled: the global mean is the mean of the ranks' means
    ddp_loss = (ranks[0]["losses"][-1] + ranks[1]["losses"][-1]) / 2
    torch.testing.assert_close(ddp_loss, loss.detach(), rtol=1e-5, atol=0)
    for r in ranks:  # DDP averaged the gradients: every rank holds the global batch's
        assert r["grads"].keys() == one.keys()
        for name, g in one.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


# --- 2. a graph split by DDP's buckets; one state on every rank -------------------------------

def _split_and_refit(rank, world):
    import spt_compile
    import spt_compile.backend as backend
    import spt_compile.sites.attention as attention_site
    import spt_compile.sites.mlp as mlp_site
    from torch.nn.parallel import DistributedDataParallel as DDP

    pieces = []
    downstream = backend.downstream

    def counting(gm, *args, **kwargs):
        pieces.append(gm)
        return downstream(gm, *args, **kwargs)

    backend.downstream = counting
    mlp_site.PROBE_EVERY = attention_site.PROBE_EVERY = 2  # refits within a few steps
    # full fine-tuning: about 7 MB of gradients, so 1 MB buckets cut the graph in several pieces
    model = tiny_llama(lora=False, hidden=256, intermediate=768)
    compiled = torch.compile(DDP(model, bucket_cap_mb=1), backend="spt",
                             options={"calibration_steps": 2, **SPARSE_AT_EVERY_LENGTH, "compiler": "aot_eager"})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = rows_of_rank(batch(length=256), rank, world)
    for _ in range(7):
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    probes = [s.quality.get("probes", 0) for s in spt_compile.registry.model_sites(compiled) for s in [s[1]]]
    return {"pieces": len(pieces), "sites": site_count(model), "hash": state_hash(compiled),
            "keys": sorted(spt_compile.state_dict(compiled)), "probes": probes}


def test_ddp_split_graph_rewrites_every_site_and_every_rank_holds_the_same_state():
    ranks = run_ranks(_split_and_refit, world=2)
    for r in ranks:
        assert r["pieces"] > 1, "the graph was not split: make the buckets smaller"
        assert r["sites"][:2] == (2, 2) and not r["sites"][2], r["sites"]
    assert ranks[0]["keys"] == ranks[1]["keys"]
    assert any("router" in k for k in ranks[0]["keys"]), ranks[0]["keys"]
    assert min(ranks[0]["probes"]) >= 2, ranks[0]["probes"]  # probes and refits ran (and synced)
    assert ranks[0]["hash"] == ranks[1]["hash"], "ranks hold different sparse state"


# --- 3. resume ----------------------------------------------------------------------------------

OPTIONS = {"calibration_steps": 2, **SPARSE_AT_EVERY_LENGTH, "compiler": "aot_eager"}


def _train(rank, world, steps, save_to=None, load_from=None, with_dcp=False):
    import spt_compile
    import spt_compile.sites.mlp as mlp_site
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    mlp_site.PROBE_EVERY = 2
    model = tiny_llama(lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = 0
    if load_from is not None and with_dcp:  # every rank reads; SptState loads the sparse state
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd, "spt": spt_compile.SptState(model), "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=load_from)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        first = int(state["step"])
    elif load_from is not None:
        ckpt = torch.load(load_from, weights_only=False)
        model.load_state_dict(ckpt["model"], strict=False)
        opt.load_state_dict(ckpt["optimizer"])
        spt_compile.load_state_dict(model, ckpt["spt"])  # on every rank
        first = ckpt["step"]
    compiled = torch.compile(DDP(model), backend="spt", options=OPTIONS)
    data = batch(rows=4 * 6)
    losses = []
    for step in range(first, first + steps):
        ids = rows_of_rank(data[4 * step : 4 * step + 4], rank, world)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if save_to is not None and with_dcp:  # every rank takes part; one copy of the sparse state is written
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd, "spt": spt_compile.SptState(model),
                  "step": torch.tensor(first + steps)}, checkpoint_id=save_to)
    elif save_to is not None and rank == 0:  # the sparse state is the same on every rank: rank 0 writes it
        trained = {n: p for n, p in model.state_dict().items() if "lora_" in n}
        torch.save({"model": trained, "optimizer": opt.state_dict(), "spt": spt_compile.state_dict(model),
                    "step": first + steps}, save_to)
    return losses


@pytest.mark.parametrize("with_dcp", [False, True], ids=["torch.save", "dcp"])
def test_killed_run_resumed_from_its_checkpoint_gives_the_uninterrupted_losses(tmp_path, with_dcp):
    whole = run_ranks(_train, world=2, args=(6,))
    ckpt = str(tmp_path / ("ckpt" if with_dcp else "ckpt.pt"))
    first = run_ranks(_train, world=2, args=(3, ckpt, None, with_dcp))  # then every rank stops, as when one is killed
    resumed = run_ranks(_train, world=2, args=(3, None, ckpt, with_dcp))
    for rank in range(2):
        assert first[rank] == whole[rank][:3]
        assert resumed[rank] == whole[rank][3:], (rank, resumed[rank], whole[rank][3:])


# --- 4. bad input -------------------------------------------------------------------------------

def _different_options(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tiny_llama(lora=True)
    compiled = torch.compile(DDP(model), backend="spt", options={**OPTIONS, "ffn_active": 2 + rank})
    ids = rows_of_rank(batch(), rank, world)
    compiled(input_ids=ids, labels=ids).loss.backward()


def test_ranks_compiled_with_different_options_fail_clearly_at_the_first_sync():
    with pytest.raises(AssertionError, match=r"SptStateError.*differ in the options"):
        run_ranks(_different_options, world=2, timeout=300)


def _state_on_rank0_only(rank, world, ckpt):
    import spt_compile
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tiny_llama(lora=True)
    if rank == 0:
        spt_compile.load_state_dict(model, torch.load(ckpt, weights_only=False)["spt"])
    compiled = torch.compile(DDP(model), backend="spt", options=OPTIONS)
    ids = rows_of_rank(batch(), rank, world)
    for _ in range(3):  # rank 0 resumes past calibration, rank 1 calibrates: the first sync refuses
        compiled(input_ids=ids, labels=ids).loss.backward()


def test_state_loaded_on_one_rank_only_fails_clearly(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    run_ranks(_train, world=2, args=(3, ckpt))
    with pytest.raises(AssertionError, match=r"SptStateError.*differ in the (calls|training calls)"):
        run_ranks(_state_on_rank0_only, world=2, args=(ckpt,), timeout=300)
