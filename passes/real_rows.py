"""The real-token rows an MLP site receives: `spt::real_rows(mask, B, N)` of the attention mask before it.

The MLP pass asks for each site's input x [B, N, d]: the nearest attention site before x in the same
graph gives its mask operand, and one spt::real_rows node per (mask, [B, N]) is inserted right after
the first input that needs it, so that every later MLP of the same shape reuses it. No attention site
before x, a site without a mask (causal only: nothing padded), or an input that is not [B, N, d]:
no operand (the site treats every row as real).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.fx import Graph, Node

from .fx_utils import shape, static_int

TAG = "spt_real_rows"  # meta flag of the nodes this pass adds (tests/graph_check.py)


def _attention_op(n: Node) -> bool:
    return n.op == "call_function" and n.target in (torch.ops.spt.attention_site.default,
                                                    torch.ops.spt.attention_graphed.default)


def _cross(n: Node) -> bool:
    """An attention op whose queries and keys have different lengths (q [B, H, N, D], k [B, Hkv, Nk, D])."""
    q, k = shape(n.args[0]), shape(n.args[1])
    return bool(q and k) and str(q[-2]) != str(k[-2])


class RealRowsSource:
    def __init__(self, graph: Graph, planned: Optional[dict[Node, bool]] = None):
        """planned: without apply (explain), the attention sites the pass would rewrite, by output node,
        and whether each would get a mask (None: a cross-attention): the graph has no spt op to read
        them from."""
        self.graph = graph
        self.made: dict[tuple, Node] = {}
        self.planned = planned or {}

    def _last_mask(self, x: Node) -> Union[Node, bool, None]:
        """What the last self-attention site before x in graph order masks with: its mask operand (a
        rewritten site), True (a planned site with a mask), or None / False (no mask). A
        cross-attention's mask (query length != key length: a decoder reading an encoder) describes the
        other sequence's keys, not x's rows, so those sites are skipped."""
        mask = None
        for n in self.graph.nodes:
            if n is x:
                break
            if self.planned.get(n) is not None:  # None: a planned cross-attention
                mask = self.planned[n]
            elif _attention_op(n) and not _cross(n):
                mask = n.args[3] if isinstance(n.args[3], Node) else None
        return mask

    def mask_before(self, x: Node) -> Optional[Node]:
        """The mask operand of the last self-attention site before x, or None."""
        mask = self._last_mask(x)
        return mask if isinstance(mask, Node) else None

    def note(self, x: Node) -> str:
        """What a site with input x gets, for explain() (inserts nothing)."""
        lead = shape(x)
        if lead is None or len(lead) != 3:
            return "every row real (the input is not [batch, seq, d])"
        if not self._last_mask(x):
            return "every row real (no attention mask before it in this graph)"
        return "real rows from the attention mask"

    def for_input(self, x: Node) -> Optional[Node]:
        """The spt::real_rows node for MLP input x, or None."""
        s = shape(x)
        mask = self.mask_before(x)
        if s is None or len(s) != 3 or mask is None:
            return None
        key = (mask, str(s[0]), str(s[1]))
        if key not in self.made:
            made = []
            sizes = []
            point = x
            for d in (0, 1):
                size = static_int(s[d])
                if size is None:  # symbolic: read it from x at run time
                    with self.graph.inserting_after(point):
                        point = size = self.graph.call_method("size", (x, d))
                    made.append(size)
                sizes.append(size)
            with self.graph.inserting_after(point):
                node = self.graph.call_function(torch.ops.spt.real_rows.default, (mask, *sizes))
            made.append(node)
            for n in made:
                n.meta[TAG] = True
            self.made[key] = node
        return self.made[key]
