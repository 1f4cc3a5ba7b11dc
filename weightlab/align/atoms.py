"""Axis atoms for spec inference: a union-find whose classes can be split into sub-atoms.

Every axis of every traced value is a sequence of atoms (major to minor). Tying two axes unifies
their atoms, splitting the larger where sizes differ (a common refinement); a ``reshape`` regroups
atoms, splitting one where a new axis boundary falls inside it. A split applies to the whole class,
and a pin (an axis no permutation may move) reaches every atom split from a pinned one. Shapes
that cannot be refined raise :class:`_Conflict`, which the tracer turns into pins.
"""

from __future__ import annotations

import collections

__all__ = ["_Conflict", "_UF"]


class _Conflict(Exception):
    pass


class _UF:
    """Union-find over atoms; an atom may be split into sub-atoms (its whole class alike)."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.pinned: list[bool] = []
        self.children: list[list[int] | None] = []
        self.origin: list[list[int]] = []  # atoms this one was split from (their pins reach it)
        self.reasons: list[set] = []

    def new(self, size: int, pinned: bool = False, reason: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.pinned.append(pinned)
        self.children.append(None)
        self.origin.append([])
        self.reasons.append({reason} if reason else set())
        return i

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def expand(self, atoms) -> list[int]:
        out = []
        stack = list(reversed(list(atoms)))
        while stack:
            r = self.find(stack.pop())
            if self.children[r] is not None:
                stack.extend(reversed(self.children[r]))
            elif self.size[r] > 1:
                out.append(r)
        return out

    def split(self, a: int, sizes) -> list[int]:
        r = self.find(a)
        assert self.children[r] is None
        kids = [self.new(s) for s in sizes]
        for k in kids:
            self.origin[k].append(r)
        self.children[r] = kids
        return kids

    def pin(self, atoms, reason: str) -> None:
        for a in self.expand(atoms):
            self.pinned[a] = True
            self.reasons[a].add(reason)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise _Conflict()
        self.parent[rb] = ra
        self.pinned[ra] = self.pinned[ra] or self.pinned[rb]
        self.reasons[ra] |= self.reasons[rb]
        self.origin[ra] += self.origin[rb]
        ca, cb = self.children[ra], self.children[rb]
        if ca is None:
            self.children[ra] = cb
        elif cb is not None:
            self.unify(ca, cb)

    def unify(self, la, lb) -> None:
        """Tie two axes (atom lists of the same total size), splitting atoms to a common refinement."""
        A, B = collections.deque(self.expand(la)), collections.deque(self.expand(lb))
        while A and B:
            a, b = self._head(A), self._head(B)
            if a is None or b is None:
                break
            sa, sb = self.size[a], self.size[b]
            if sa == sb:
                self.union(a, b)
            elif sa > sb:
                if sa % sb:
                    raise _Conflict()
                hi, lo = self.split(a, [sb, sa // sb])
                self.union(hi, b)
                A.appendleft(lo)
            else:
                if sb % sa:
                    raise _Conflict()
                hi, lo = self.split(b, [sa, sb // sa])
                self.union(a, hi)
                B.appendleft(lo)
        if self._rest(A) or self._rest(B):
            raise _Conflict()

    def _head(self, q):
        while q:
            r = self.find(q.popleft())
            if self.children[r] is not None:
                q.extendleft(reversed(self.children[r]))
                continue
            if self.size[r] > 1:
                return r
        return None

    def _rest(self, q) -> bool:
        return bool(self.expand(q))

    def regroup(self, atoms, sizes) -> list[list[int]]:
        """Row-major reshape: the atoms of the input axes regrouped into axes of ``sizes``."""
        q = collections.deque(self.expand(atoms))
        out = []
        for s in sizes:
            cur, rem = [], int(s)
            while rem > 1:
                a = self._head(q)
                if a is None:
                    raise _Conflict()
                sa = self.size[a]
                if sa <= rem:
                    if rem % sa:
                        raise _Conflict()
                    cur.append(a)
                    rem //= sa
                else:
                    if sa % rem:
                        raise _Conflict()
                    hi, lo = self.split(a, [rem, sa // rem])
                    cur.append(hi)
                    q.appendleft(lo)
                    rem = 1
            out.append(cur)
        if self._head(q) is not None:
            raise _Conflict()
        return out

    def is_pinned(self, a: int) -> bool:
        seen, stack = set(), [a]
        while stack:
            r = self.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            if self.pinned[r]:
                return True
            stack.extend(self.origin[r])
        return False

    def why(self, a: int) -> set:
        seen, stack, out = set(), [a], set()
        while stack:
            r = self.find(stack.pop())
            if r not in seen:
                seen.add(r)
                out |= self.reasons[r]
                stack.extend(self.origin[r])
        return out
