"""spt under torch.distributed: DDP compiles (ddp.py), one sparse state across ranks (sync.py), and
distributed checkpoints (checkpoint.py). With no process group initialised nothing here runs and
behaviour is exactly single-process."""

from . import ddp

ddp.install()
