from __future__ import annotations

import hashlib

import pytest

from dbguard.errors import ConfigError
from dbguard.identity.static import StaticTokens


def test_clear_and_hashed_tokens_authenticate(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("tokens:\n- {user: alice, groups: [dev], token: alice-token-1}\n"
                 f"- {{user: bob, sha256: {hashlib.sha256(b'bob-token-22').hexdigest()}}}\n")
    tokens = StaticTokens.load(f)
    assert tokens.lookup("alice-token-1").user == "alice"
    assert tokens.lookup("alice-token-1").groups == ("dev",)
    assert tokens.lookup("bob-token-22").user == "bob"
    assert tokens.lookup("nope-nope-nope") is None


@pytest.mark.parametrize("text, error", [
    ("tokens: 3", "'tokens' list"),
    ("tokens:\n- {user: a, token: short}", "at least 8"),
    ("tokens:\n- {user: a, token: longenough, sha256: ab}", "exactly one"),
    ("tokens:\n- {user: a, sha256: zz}", "64 hex"),
    ("tokens:\n- {user: a, token: longenough, role: x}", "unknown field"),
    ("tokens: [", "not valid YAML"),
])
def test_bad_token_files_name_the_problem(tmp_path, text, error):
    f = tmp_path / "t.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=error):
        StaticTokens.load(f)
