"""Sparse state: one Site per rewritten attention or MLP, kept outside the user's module.

Dynamo lifts parameters into graph inputs and a backend cannot add new ones, module paths repeat
when layers are compiled one by one, and Dynamo reuses one compiled graph for every instance of a
module class (parameters are graph inputs, not guarded). So a site is keyed by the identity of a
weight it reads at *run time* (its *anchor*, e.g. the layer's q or gate projection weight, which the
rewritten op receives as an input) plus an ordinal. The graph carries only a *template* id: what kind
of site, its ordinal, module path, options and shapes. Recompiles (train/eval, new shapes) and other
layers running the same graph each find their own site.

`state_dict(model)` names each site by its anchor's parameter name in `model`, so the state saves
beside a normal checkpoint and loads into a fresh process, before or after compiling.
"""

from __future__ import annotations

import math
import re
import weakref
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .distributed import sync
from .fitting.ffn_budget import allocate
from .options import Options


_TAG = re.compile(r"^(?P<name>.+)@(?P<kind>[a-z]+)(?P<ordinal>\d+)/(?P<field>[\w.]+)$")


def _new_site_seed(anchor: Optional[Tensor], template: "SiteTemplate") -> int:
    """A seed that follows torch.manual_seed but leaves the global RNG where it was: sites are built
    at their first call, which in a resumed run comes after the RNG state was restored; drawing from
    it there would shift every later random number (e.g. dropout) against the uninterrupted run.
    Sites built while the RNG state stays the same (no random op between them) are told apart by a
    few values of their anchor weight (read once per site), so two identical models built the same
    way get the same seeds, and layers with different weights get different ones."""
    with torch.random.fork_rng(devices=[]):
        base = int(torch.randint(0, 2**62, (1,)).item())
    ident = f"{template.kind}{template.ordinal}".encode()
    if anchor is not None:
        ident += anchor.detach().reshape(-1)[:16].float().cpu().clone().numpy().tobytes()  # a copy: a numpy view would
        # make the weight's storage non-resizable, which FSDP2 needs (it frees unsharded weights by resizing)
    else:
        ident += template.name.encode()
    return (base + zlib.crc32(ident) * 0x9E3779B97F4A7C15) % (2**62)


class SptStateError(ValueError):
    """Saved sparse state that does not fit the model or the compiled sites."""


@dataclass(frozen=True)
class CallPlan:
    options: Options  # resolved run-time + structural options for this call
    index: int  # the site's call counter at this call
    recompute: bool  # a forward re-run inside backward: change nothing
    dense_forced: bool  # inside spt_compile.disable(): run dense, change nothing
    # A call without gradients under torch.distributed: it runs with the state as it is and changes
    # nothing, not even the call counter, since other ranks may not make it (evaluation on rank 0 only):
    # state changes and their collectives happen at the same training calls on every rank.
    frozen: bool = False

    @property
    def updates_state(self) -> bool:
        return not (self.recompute or self.dense_forced or self.frozen)


class Site:
    """Common bookkeeping: call counters, a seed, staged updates and the recompute rule.

    State changes computed during a forward are *staged* and applied at the start of the next
    forward. So a forward re-run inside backward (activation checkpointing) sees exactly the state,
    options and seed its original forward saw, and makes the same choices."""

    kind = "site"

    def __init__(self, template: "SiteTemplate", anchor: Optional[Tensor]):
        self.template = template
        self.ordinal = template.ordinal
        self.name = template.name  # module path, for messages and explain()
        self._anchor = weakref.ref(anchor) if anchor is not None else None
        self.options = template.options  # structural options this site was built with
        self.seed = _new_site_seed(anchor, template)
        self.calls = 0
        self.train_calls = 0
        self._staged: list[Callable[[], None]] = []
        self._last: Optional[CallPlan] = None
        self._ranks_checked = False  # under torch.distributed: the ranks' agreement on this site
        self.quality: dict[str, float] = {}
        # How each call ran (report()): e.g. calibration, dense, routed / sparse, exact_forward,
        # exact_inference, exact_short; disabled for calls inside disable(). Diagnostics, not state.
        self.runs: dict[str, int] = {}

    @property
    def anchor(self) -> Optional[Tensor]:
        return self._anchor() if self._anchor is not None else None

    # --- one call ---------------------------------------------------------------------------
    def begin(self, options: Options, dense_forced: bool, training: bool = True) -> "CallPlan":
        """How this call runs. A call made while autograd runs a backward pass is a recompute of the
        last forward (activation checkpointing): it replays that forward's plan exactly."""
        if torch._C._current_graph_task_id() != -1 and self._last is not None:
            return replace(self._last, recompute=True)
        frozen = not training and sync.active()
        if not (dense_forced or frozen):
            if sync.active() and not self._ranks_checked:
                # every rank's first training call of this site in this process: ranks built from other
                # options, or resumed from state loaded on some ranks only, fail here, before any sync
                sync.check_agreement(self, "first training call")
                self._ranks_checked = True
            self.apply_staged()
        plan = CallPlan(options, self.calls, recompute=False, dense_forced=dense_forced, frozen=frozen)
        self._last = plan
        return plan

    def end(self, plan: "CallPlan", training: bool) -> None:
        if plan.updates_state:
            self.calls += 1
            self.train_calls += int(training)

    def count_run(self, plan: "CallPlan", how: str) -> None:
        """Counts how a call ran (a forward re-run inside backward is not a new call)."""
        if not plan.recompute:
            how = "disabled" if plan.dense_forced else how
            self.runs[how] = self.runs.get(how, 0) + 1

    def stage(self, update: Callable[[], None]) -> None:
        self._staged.append(update)

    def apply_staged(self) -> None:
        staged, self._staged = self._staged, []
        for update in staged:
            update()

    def call_seed(self, index: int) -> int:
        return (self.seed * 6364136223846793005 + index * 1442695040888963407) % (2**62)

    def check_finite(self, plan: CallPlan, **tensors: Optional[Tensor]) -> None:
        """With the check_finite option: raise on NaN/inf in this call's inputs, naming the site (one
        device sync per tensor on CUDA, hence off by default)."""
        if not plan.options.check_finite:
            return
        for name, t in tensors.items():
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FloatingPointError(
                    f"spt: non-finite values (NaN or inf) in '{name}' of the {self.kind} site at {self.name or '<top>'} "
                    f"(call {plan.index}): they come from the model before this site, not from spt. Usual causes: a "
                    "learning rate too high, fp16 overflow (try bf16), a bad batch. spt_compile.disable() runs the "
                    "same model dense for comparison; without check_finite such values pass through as in the "
                    "dense model and are kept out of the sparse state.")

    def calibrating(self, plan: CallPlan) -> bool:
        return plan.index < plan.options.calibration_steps

    def note_quality(self, **values: float) -> None:
        """Exponential moving averages of probe results (the first probe sets them), averaged over
        ranks under torch.distributed. A probe that saw non-finite activations is not counted: it
        would stay NaN in the average for good."""
        values = sync.mean_over_ranks(self, values)
        if not all(math.isfinite(v) for v in values.values()):
            return
        n = self.quality.get("probes", 0.0)
        for key, value in values.items():
            old = self.quality.get(key)
            self.quality[key] = value if old is None else 0.8 * old + 0.2 * value
        self.quality["probes"] = n + 1

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        self.apply_staged()
        out = {
            "calls": torch.tensor(self.calls),
            "train_calls": torch.tensor(self.train_calls),
            "seed": torch.tensor(self.seed),
        }
        out.update({f"quality.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.quality.items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._staged.clear()
        self._last = None
        self.calls = int(state["calls"])
        self.train_calls = int(state["train_calls"])
        self.seed = int(state["seed"])
        self.quality = {k[len("quality."):]: float(v) for k, v in state.items() if k.startswith("quality.")}

    def compatible(self, template: "SiteTemplate") -> bool:
        """Whether this site's state fits a graph compiled from `template` (else it is rebuilt)."""
        return self.template.structure() == template.structure()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "calls": self.calls, "train_calls": self.train_calls,
                **{k: round(v, 4) for k, v in self.quality.items()}, "runs": dict(self.runs)}


@dataclass(frozen=True)
class SiteTemplate:
    """What the graph knows about a site at compile time; the op finds the site from it and the
    anchor tensor it receives at run time."""

    kind: str  # "attention" | "mlp"
    ordinal: int  # sites sharing one anchor in a graph, in graph order
    name: str  # module path
    options: Options
    shape: tuple  # attention: (Hkv, D); mlp: (d_in,)

    def structure(self) -> tuple:
        o = self.options
        # Everything calibration's result depends on: a recompile that changes one of these gets a
        # fresh site (ffn_cluster decides whether calibration groups the units). Not the PQ options:
        # only token selection reads codebooks, and it refits them when their shape no longer fits.
        per_kind = () if self.kind == "attention" else (o.ffn_blocks, o.ffn_cluster)
        return (self.kind, self.shape) + per_kind


# kind -> Site subclass; sites/attention.py and sites/mlp.py register themselves.
SITE_TYPES: dict[str, type] = {}


class Registry:
    """All sites of this process, found by (kind, anchor tensor, ordinal)."""

    def __init__(self) -> None:
        self.sites: list[Site] = []
        self.templates: list[SiteTemplate] = []
        self._template_ids: dict[SiteTemplate, int] = {}
        self._by_anchor: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> {(kind, ordinal): Site}
        self._by_name: dict[tuple[str, str, int], Site] = {}  # sites without an anchor
        self._pending: WeakIdKeyDictionary = WeakIdKeyDictionary()  # loaded before the site existed
        # FSDP2: sharded parameter -> its FSDPParam, for state loaded before the unsharded one existed
        self._fsdp_pending_params: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # ffn_budget: the latest allocation ((budget, version) -> {site: blocks}); version counts changes
        # of any MLP site's error curve, so a new curve (a site calibrated or loaded) reallocates.
        self._budget_version = 0
        self._allocation: Optional[tuple[tuple[float, int], dict]] = None

    def _prune(self) -> None:
        """Forgets sites whose anchor was freed (their model is gone) or that a recompile with other
        structural options replaced, so that the list does not grow with every model built."""
        def live(s: Site) -> bool:
            if s._anchor is not None and s.anchor is None:
                return False
            return self.find(s.kind, s.anchor, s.ordinal, s.name) is s

        self.sites = [s for s in self.sites if live(s)]

    def budget_changed(self) -> None:
        """An MLP site's ffn_budget error curve changed: the next allocation is computed afresh."""
        self._budget_version += 1

    def ffn_allocation(self, budget: float) -> dict:
        """ffn_budget's blocks per token for every live MLP site that has an error curve, {site: k},
        allocated over all of them together (ffn_budget.allocate): the sites of every model compiled in
        this process share one budget. Recomputed only when a curve changed."""
        key = (float(budget), self._budget_version)
        if self._allocation is None or self._allocation[0] != key:
            sites = [s for s in self.sites if s.kind == "mlp" and getattr(s, "err_curve", None) is not None
                     and s.anchor is not None and self.find(s.kind, s.anchor, s.ordinal, s.name) is s]
            k = allocate([s.err_curve for s in sites], [s.block_flops for s in sites], budget)
            self._allocation = (key, dict(zip(sites, k)))
        return self._allocation[1]

    def template_id(self, template: SiteTemplate) -> int:
        """Templates travel through the graph as a small int (custom ops take no dataclasses)."""
        if template not in self._template_ids:
            self._template_ids[template] = len(self.templates)
            self.templates.append(template)
        return self._template_ids[template]

    def _pending_for_unsharded(self, anchor: Tensor, t: SiteTemplate) -> Optional[dict]:
        """State loaded under FSDP2 before the first forward, keyed by the sharded parameter whose
        unsharded one `anchor` is."""
        for sharded, fp in list(self._fsdp_pending_params.items()):
            if getattr(fp, "_unsharded_param", None) is anchor:
                return self._pending.get(sharded, {}).pop((t.kind, t.ordinal), None)
        return None

    def find(self, kind: str, anchor: Optional[Tensor], ordinal: int, name: str) -> Optional[Site]:
        if anchor is not None:
            return self._by_anchor.get(anchor, {}).get((kind, ordinal))
        return self._by_name.get((kind, name, ordinal))

    def site(self, template_id: int, anchor: Optional[Tensor]) -> Site:
        """The site a running op belongs to; built the first time (taking any state loaded for it
        before). A site built for other structural options is replaced: its statistics no longer fit."""
        t = self.templates[template_id]
        site = self.find(t.kind, anchor, t.ordinal, t.name)
        if site is not None and site.compatible(t):
            return site
        site = SITE_TYPES[t.kind](t, anchor)
        self._prune()
        self.sites.append(site)
        if anchor is not None:
            self._by_anchor.setdefault(anchor, {})[(t.kind, t.ordinal)] = site
            pending = self._pending.get(anchor, {}).pop((t.kind, t.ordinal), None)
            if pending is None:
                pending = self._pending_for_unsharded(anchor, t)
            if pending is not None:
                site.load_state_dict(pending)
        else:
            self._by_name[(t.kind, t.name, t.ordinal)] = site
        return site


REGISTRY = Registry()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside torch.compile's and DistributedDataParallel's wrappers (in any order),
    so that sparse state is named the same with or without them."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _fsdp_params(model: nn.Module) -> dict[str, Any]:
    """FSDP2 (fully_shard): {parameter name: its FSDPParam}. Between forwards a sharded module holds
    sharded DTensors, while the sites read (and are keyed by) the unsharded parameter FSDP gathers
    into, one object for the whole run, made at the first all-gather. Private FSDP2 attributes; {}
    where they are missing."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
        for fp in getattr(group, "fsdp_params", ()):
            info = getattr(fp, "_module_info", None)
            if info is not None and id(info.module) in names:
                prefix = names[id(info.module)]
                out[(prefix + "." if prefix else "") + info.param_name] = fp
    return out


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameter and buffer names as the user's model spells them (compiled and DDP wrappers removed).
    Under FSDP2 a parameter's tensor is the unsharded one the sites see, or, before the first forward
    made it, the sharded one (load_state_dict then waits for the unsharded one: Registry.site)."""
    model = unwrap(model)
    out = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        out.setdefault(name.replace("_orig_mod.", ""), t)
    for name, fp in _fsdp_params(model).items():
        unsharded = getattr(fp, "_unsharded_param", None)
        if unsharded is not None:
            out[name] = unsharded
        elif name in out:
            REGISTRY._fsdp_pending_params[out[name]] = fp
    return out


def model_sites(model: nn.Module) -> list[tuple[str, Site]]:
    """Sites anchored to this model's tensors, with their state-dict prefix."""
    by_id = {id(t): name for name, t in reversed(list(_named_tensors(model).items()))}
    found = []
    for site in REGISTRY.sites:
        anchor = site.anchor
        if anchor is not None and id(anchor) in by_id:
            current = REGISTRY.find(site.kind, anchor, site.ordinal, site.name)
            if current is site:  # skip sites replaced by a recompile with other structural options
                found.append((f"{by_id[id(anchor)]}@{site.kind}{site.ordinal}", site))
    return found


def state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The sparse state of every site anchored in `model`: a flat dict of tensors, safe for
    torch.save or safetensors, keyed `<parameter name>@<kind><ordinal>/<field>`."""
    out: dict[str, Tensor] = {}
    for prefix, site in model_sites(model):
        for key, value in site.state_dict().items():
            out[f"{prefix}/{key}"] = value.detach().cpu()
    for name, t in _named_tensors(model).items():  # loaded but not yet compiled: keep it
        for (kind, ordinal), fields in REGISTRY._pending.get(t, {}).items():
            for key, value in fields.items():
                out.setdefault(f"{name}@{kind}{ordinal}/{key}", value)
    return out


def load_state_dict(model: nn.Module, state: dict[str, Tensor], strict: bool = True) -> None:
    """Restore sparse state saved by state_dict(). Sites not compiled yet receive it when they are.
    strict: every entry must name a tensor of `model` (else SptStateError lists the unknown ones)."""
    tensors = _named_tensors(model)
    grouped: dict[tuple[str, str, int], dict[str, Tensor]] = defaultdict(dict)
    unknown = []
    for key, value in state.items():
        m = _TAG.match(key)
        if m is None or m["name"] not in tensors:
            unknown.append(key)
            continue
        grouped[(m["name"], m["kind"], int(m["ordinal"]))][m["field"]] = value
    if unknown and strict:
        raise SptStateError(
            f"{len(unknown)} sparse-state entries do not match this model, e.g. {unknown[:3]}; was the state "
            "saved from another model, or with a different adapter setup? Pass strict=False to skip them.")
    for (name, kind, ordinal), fields in grouped.items():
        anchor = tensors[name]
        site = REGISTRY.find(kind, anchor, ordinal, "")
        if site is not None:
            site.load_state_dict(fields)
        else:
            REGISTRY._pending.setdefault(anchor, {})[(kind, ordinal)] = fields


def report(model: nn.Module) -> list[dict[str, Any]]:
    """Per site: name, call counts and calibration quality (attention: recall of the true top-L
    keys and share of attention mass kept; MLP: share of the dense output captured)."""
    return [{"key": prefix, **site.describe()} for prefix, site in model_sites(model)]
