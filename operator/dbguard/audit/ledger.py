"""The audit ledger's chain: entry hashing, signed checkpoints, verification. Pure: no I/O.

Each entry is the event's canonical JSON (``data``) plus its place in one proxy instance's chain
(``chain``, ``seq``) and ``prev``, the hash of the entry before it. ``hash = sha256(prev ‖ seq ‖
chain ‖ data)``. Editing an entry breaks its hash; removing or reordering breaks the next entry's
``prev`` or the sequence; re-hashing everything after an edit is caught by the Ed25519-signed
checkpoints, which need the proxy's private key.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
# The writer signs a checkpoint at least every SIGN_EVERY entries (in the same transaction as the
# entry): a longer unsigned run is evidence that checkpoints were removed.
SIGN_EVERY = 1000


def entry_hash(prev: str, seq: int, chain: str, data: bytes) -> str:
    h = hashlib.sha256()
    h.update(prev.encode("ascii"))
    h.update(b"\x00%d\x00" % seq)
    h.update(chain.encode("utf-8"))
    h.update(b"\x00")
    h.update(data)
    return h.hexdigest()


def checkpoint_message(chain: str, seq: int, hash_: str) -> bytes:
    return f"dbguard-ledger-checkpoint\x00{chain}\x00{seq}\x00{hash_}".encode()


def sign_checkpoint(key: Ed25519PrivateKey, chain: str, seq: int, hash_: str) -> bytes:
    return key.sign(checkpoint_message(chain, seq, hash_))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    chain: str
    seq: int
    prev: str
    hash: str
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    chain: str
    seq: int
    hash: str
    signature: bytes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    chain: str
    seq: int  # the first entry that is not what the chain says
    kind: str  # altered | removed | reordered | bad-checkpoint | unsigned
    detail: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    entries: int
    chains: int
    checkpoints: int
    problems: tuple[Problem, ...]
    # With a public key: (chain, first, last) entries after a chain's last signed checkpoint, fewer
    # than SIGN_EVERY (a running writer's last second, or a writer that died before it signed).
    unsigned_tails: tuple[tuple[str, int, int], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(rows: Iterable[Row], checkpoints: Iterable[Checkpoint] = (),
           public_key: Ed25519PublicKey | None = None) -> VerifyResult:
    """Walk each chain in stored order; report the first problem of each chain.

    ``rows`` must come in storage order (insertion order), not sorted by ``seq``: reordering is
    exactly what must show.
    """
    last: dict[str, tuple[int, str]] = {}
    problems: dict[str, Problem] = {}
    hashes: dict[tuple[str, int], str] = {}
    seen: dict[str, set[int]] = {}
    count = 0
    for row in rows:
        count += 1
        seen.setdefault(row.chain, set()).add(row.seq)
        if row.chain in problems:
            continue  # keep collecting sequence numbers: a "missing" entry stored later was moved
        prev_seq, prev_hash = last.get(row.chain, (0, GENESIS))
        recomputed = entry_hash(row.prev, row.seq, row.chain, row.data)
        problem = None
        if recomputed != row.hash:
            problem = Problem(chain=row.chain, seq=row.seq, kind="altered",
                              detail="the entry's content does not match its hash")
        elif row.seq != prev_seq + 1:
            kind = "removed" if row.seq > prev_seq + 1 else "reordered"
            problem = Problem(chain=row.chain, seq=row.seq if kind == "reordered" else prev_seq + 1, kind=kind,
                              detail=f"expected entry {prev_seq + 1} after {prev_seq}, found {row.seq}")
        elif row.prev != prev_hash:
            problem = Problem(chain=row.chain, seq=row.seq, kind="reordered",
                              detail="the entry does not follow the one stored before it (prev hash differs)")
        if problem is not None:
            problems[row.chain] = problem
            continue
        last[row.chain] = (row.seq, row.hash)
        hashes[(row.chain, row.seq)] = row.hash
    for chain, problem in list(problems.items()):
        if problem.kind == "removed" and problem.seq in seen.get(chain, ()):
            problems[chain] = dataclasses.replace(
                problem, kind="reordered", detail=f"entry {problem.seq} is stored out of order ({problem.detail})")
    n_checkpoints = 0
    covered: dict[str, int] = {}  # chain -> the last entry a valid signed checkpoint vouches for
    for cp in checkpoints:
        n_checkpoints += 1
        if cp.chain in problems and problems[cp.chain].seq <= cp.seq:
            continue
        stored = hashes.get((cp.chain, cp.seq))
        valid = True
        if public_key is not None:
            try:
                public_key.verify(cp.signature, checkpoint_message(cp.chain, cp.seq, cp.hash))
            except InvalidSignature:
                valid = False
        if not valid:
            problems.setdefault(cp.chain, Problem(chain=cp.chain, seq=cp.seq, kind="bad-checkpoint",
                                                  detail="checkpoint signature does not verify"))
        elif stored is None:
            problems.setdefault(cp.chain, Problem(chain=cp.chain, seq=cp.seq, kind="removed",
                                                  detail=f"signed checkpoint names entry {cp.seq}, which is missing"))
        elif stored != cp.hash:
            problems.setdefault(cp.chain, Problem(chain=cp.chain, seq=cp.seq, kind="altered",
                                                  detail="entries were re-hashed: the signed checkpoint disagrees"))
        elif public_key is not None and cp.seq > covered.get(cp.chain, 0):
            covered[cp.chain] = cp.seq
    tails = []
    if public_key is not None:
        # A checkpoint covers every entry before it (the chain links them); the writer signs its
        # first commit, every SIGN_EVERY-th entry in the same transaction, and at least once a
        # second: entries the key vouches for none of, or a longer unsigned tail, were rewritten
        # (or written) by someone who removed the checkpoints, or by a proxy without the key.
        for chain, (seq, _) in last.items():
            if chain in problems:
                continue
            signed = covered.get(chain, 0)
            if signed == 0:
                problems[chain] = Problem(chain=chain, seq=1, kind="unsigned", detail=(
                    f"no checkpoint signed with this key covers the chain's {seq} entries: they could have "
                    "been written by anyone with access to the store (or by a proxy without "
                    "--ledger-signing-key)"))
            elif seq - signed >= SIGN_EVERY:
                problems[chain] = Problem(chain=chain, seq=signed + 1, kind="unsigned", detail=(
                    f"entries {signed + 1}-{seq} follow the last signed checkpoint, and the writer signs at least "
                    f"every {SIGN_EVERY}: checkpoints were removed (or a proxy without --ledger-signing-key "
                    "wrote them)"))
            elif seq > signed:
                tails.append((chain, signed + 1, seq))
    ordered = tuple(sorted(problems.values(), key=lambda p: (p.chain, p.seq)))
    return VerifyResult(entries=count, chains=len(set(last) | set(problems)), checkpoints=n_checkpoints,
                        problems=ordered, unsigned_tails=tuple(sorted(tails)))
