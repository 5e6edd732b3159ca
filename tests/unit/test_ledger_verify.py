"""ledger.verify with a public key: what the signed checkpoints vouch for (pure: rows in, result out)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dbguard.audit import ledger

KEY = Ed25519PrivateKey.generate()


def chain(n: int, signed_at: tuple[int, ...], name: str = "c") -> tuple[list[ledger.Row], list[ledger.Checkpoint]]:
    rows, checkpoints, prev = [], [], ledger.GENESIS
    for seq in range(1, n + 1):
        data = b'{"kind":"decision","stmt":%d}' % seq
        h = ledger.entry_hash(prev, seq, name, data)
        rows.append(ledger.Row(chain=name, seq=seq, prev=prev, hash=h, data=data))
        if seq in signed_at:
            checkpoints.append(ledger.Checkpoint(chain=name, seq=seq, hash=h,
                                                 signature=ledger.sign_checkpoint(KEY, name, seq, h)))
        prev = h
    return rows, checkpoints


def test_a_chain_no_signed_checkpoint_covers_is_not_vouched_for():
    """Entries rewritten with their checkpoints deleted chain perfectly; only the key can tell."""
    rows, _ = chain(20, ())
    assert ledger.verify(rows, []).ok  # without the key: nothing to compare
    result = ledger.verify(rows, [], KEY.public_key())
    assert [(p.kind, p.seq) for p in result.problems] == [("unsigned", 1)]
    assert "20 entries" in result.problems[0].detail


def test_a_short_unsigned_tail_is_reported_not_refused():
    """The writer signs within a second: a running proxy's (or a dead writer's) last entries are unsigned."""
    rows, checkpoints = chain(1500, (1, 1000, 1400))
    result = ledger.verify(rows, checkpoints, KEY.public_key())
    assert result.ok and result.unsigned_tails == (("c", 1401, 1500),)
    rows, checkpoints = chain(30, (1, 30))
    assert ledger.verify(rows, checkpoints, KEY.public_key()).unsigned_tails == ()


def test_a_tail_longer_than_the_signing_interval_means_checkpoints_were_removed():
    """Every SIGN_EVERY-th entry is signed in its own transaction: a longer unsigned run is not a crash."""
    rows, checkpoints = chain(ledger.SIGN_EVERY + 5, (1, 4))
    result = ledger.verify(rows, checkpoints, KEY.public_key())
    assert [(p.kind, p.seq) for p in result.problems] == [("unsigned", 5)]
    assert f"entries 5-{ledger.SIGN_EVERY + 5}" in result.problems[0].detail
    assert ledger.verify(rows, checkpoints).ok  # without the key nothing is claimed


def test_each_chain_is_judged_on_its_own_checkpoints():
    a_rows, a_cps = chain(10, (1, 10), "a")
    b_rows, _ = chain(10, (), "b")
    result = ledger.verify(a_rows + b_rows, a_cps, KEY.public_key())
    assert [(p.chain, p.kind) for p in result.problems] == [("b", "unsigned")]
