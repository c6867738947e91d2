"""RFC 9162 (Certificate Transparency v2) Merkle tree hashes and inclusion proofs. Pure, I/O-free.

Leaves are audit entries: the leaf *data* of entry ``i`` is its 32-byte entry hash, so
``leaf_hash = SHA-256(0x00 || entry_hash)`` and ``node = SHA-256(0x01 || left || right)`` (RFC 9162 §2.1.1).
Checkpoint entries sign ``root(tree_size)`` over every entry before them; with an inclusion proof a third party
holding only one entry and one signed checkpoint can check that the entry is in the log the checkpoint commits to.
"""

from __future__ import annotations

import hashlib

__all__ = ["leaf_hash", "node_hash", "root_from_leaves", "CompactTree", "inclusion_proof", "verify_inclusion",
           "EMPTY_ROOT"]

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def root_from_leaves(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) over already-hashed leaves (RFC 9162 §2.1.1); the empty tree hashes to SHA-256('')."""
    if not leaves:
        return EMPTY_ROOT
    return CompactTree.from_leaves(leaves).root()


class CompactTree:
    """Incremental Merkle tree head: keeps only the roots of the perfect subtrees (O(log n) memory per append).

    ``append(leaf_hash)`` is amortised O(1); ``root()`` is O(log n) and equals RFC 9162's MTH for the same leaves.
    """

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []  # roots of perfect subtrees, largest first

    @classmethod
    def from_leaves(cls, leaves) -> "CompactTree":
        t = cls()
        for h in leaves:
            t.append(h)
        return t

    def append(self, leaf: bytes) -> None:
        self._stack.append(leaf)
        self.size += 1
        n = self.size
        while n % 2 == 0:  # merge completed perfect subtrees
            right = self._stack.pop()
            left = self._stack.pop()
            self._stack.append(node_hash(left, right))
            n //= 2

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        acc = self._stack[-1]
        for h in reversed(self._stack[:-1]):
            acc = node_hash(h, acc)
        return acc


def inclusion_proof(leaves: list[bytes], index: int, tree_size: int | None = None) -> list[bytes]:
    """Audit path PATH(m, D[n]) for leaf ``index`` in the tree of the first ``tree_size`` leaves (RFC 9162 §2.1.3.1)."""
    n = len(leaves) if tree_size is None else tree_size
    if not 0 < n <= len(leaves):
        raise ValueError(f"tree_size {n} must be between 1 and the number of leaves ({len(leaves)})")
    if not 0 <= index < n:
        raise ValueError(f"index {index} is outside a tree of size {n}")

    def path(m: int, lo: int, hi: int) -> list[bytes]:
        if hi - lo == 1:
            return []
        k = _split(hi - lo)
        if m < k:
            return path(m, lo, lo + k) + [root_from_leaves(leaves[lo + k:hi])]
        return path(m - k, lo + k, hi) + [root_from_leaves(leaves[lo:lo + k])]

    return path(index, 0, n)


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: list[bytes], root: bytes) -> bool:
    """Check an inclusion proof (RFC 9162 §2.1.3.2). ``leaf`` is the leaf *hash*."""
    if not 0 <= index < tree_size:
        return False
    fn, sn = index, tree_size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
