"""Draft token trees: what a drafter proposes and the verifier checks in one target pass.

Nodes are listed parents-first. ``parents[i] == -1`` means node ``i`` follows the request's last committed
token directly. A chain is a tree whose node ``i`` has parent ``i - 1``. CoSine's fused drafts are a
*spine* (the most confident token at each depth) plus *alternatives*: siblings of spine nodes that other
candidates proposed; alternatives are leaves.

``q`` (optional, chains only) holds the proposal distribution each node was sampled from; without it the
proposals are deterministic and the verifier uses the one-hot (multi-candidate) rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def depth_of(parents: list[int]) -> int:
    """The longest root-to-leaf path of a parents-first tree given by its parent indices."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return max(depths, default=0)


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # which drafter proposed each node
    q: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        """Number of draft positions (length of the longest root-to-leaf path)."""
        return depth_of(self.parents)

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (``-1`` = the root) in proposal order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def add(self, token: int, parent: int, confidence: float = 1.0, source: str = "") -> int:
        if parent >= len(self.tokens):
            raise ValueError("a node's parent must come before it")
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.confidences.append(float(confidence))
        self.sources.append(source)
        return len(self.tokens) - 1

    @staticmethod
    def chain(tokens: list[int], source: str = "") -> DraftTree:
        tree = DraftTree()
        for i, t in enumerate(tokens):
            tree.add(t, i - 1, source=source)
        return tree

    def truncated(self, depth: int) -> DraftTree:
        """The nodes at most ``depth`` deep (proposal distributions kept)."""
        keep: list[int] = []
        depths: list[int] = []
        for i, p in enumerate(self.parents):
            d = 1 if p < 0 else depths[p] + 1
            depths.append(d)
            if d <= depth:
                keep.append(i)
        return self.subset(keep)

    def subset(self, keep: list[int]) -> DraftTree:
        """The nodes ``keep`` (ascending) as a tree of their own: a kept node whose parent is not kept becomes
        a root (proposal distributions kept). With every kept node's parent kept, the same tree cut down."""
        remap = {old: new for new, old in enumerate(keep)}
        return DraftTree(
            tokens=[self.tokens[i] for i in keep],
            parents=[remap.get(self.parents[i], -1) for i in keep],
            confidences=[self.confidences[i] for i in keep],
            sources=[self.sources[i] for i in keep],
            q=[self.q[i] for i in keep] if self.q is not None else None,
        )

    def spine(self) -> list[int]:
        """Node indices of the spine: from the root, always the first child (a chain's nodes in order)."""
        path: list[int] = []
        node = -1
        while True:
            kids = self.children(node)
            if not kids:
                return path
            node = kids[0]
            path.append(node)

    def below(self, node: int) -> DraftTree:
        """The nodes under ``node`` as a tree of their own (``node``'s children become roots)."""
        inside = {node}
        keep: list[int] = []
        for i, p in enumerate(self.parents):
            if p in inside:
                inside.add(i)
                keep.append(i)
        return self.subset(keep)
