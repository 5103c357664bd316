"""The sparse state in torch.distributed.checkpoint (DCP), beside the model and optimizer:

    dcp.save({"model": ..., "optim": ..., "spt": spt_compile.SptState(model)}, checkpoint_id=path)
    dcp.load({"model": ..., "optim": ..., "spt": spt_compile.SptState(model)}, checkpoint_id=path)

Every rank holds the same sparse state (sync.py), so it travels as one object (DCP pickles
non-tensor values and writes one copy), not as tensors DCP would expect to find, shaped, in the
state it loads into: in a fresh process the sites do not exist until the first forward, and
spt_compile.load_state_dict keeps their state until then. With no process group (dcp works on one
process too) it is the plain state_dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from spt_compile.registry import SptStateError, load_state_dict, state_dict


@dataclass
class SavedSparseState:
    """What DCP writes: spt_compile.state_dict(model), as one picklable object."""

    tensors: dict[str, Tensor] = field(default_factory=dict)


class SptState:
    """A torch.distributed.checkpoint Stateful for `model`'s sparse state (DCP calls state_dict when
    saving, and load_state_dict with what it read when loading)."""

    def __init__(self, model: nn.Module, strict: bool = True):
        self.model, self.strict = model, strict

    def state_dict(self) -> dict:
        return {"sparse_state": SavedSparseState(state_dict(self.model))}

    def load_state_dict(self, loaded: dict) -> None:
        saved = loaded.get("sparse_state")
        if not isinstance(saved, SavedSparseState):
            raise SptStateError(
                f"the checkpoint's 'sparse_state' entry is {type(saved).__name__}, not the SavedSparseState "
                "spt_compile.SptState writes: was it saved with SptState(model)?")
        load_state_dict(self.model, saved.tensors, strict=self.strict)


__all__ = ["SavedSparseState", "SptState"]
