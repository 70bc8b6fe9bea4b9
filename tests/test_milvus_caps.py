"""What the gallery takes a Milvus to support, from what it says and what it accepts."""

from __future__ import annotations

import pytest

from biolit_id.index.milvus.caps import is_index_kind_refusal, parse_caps, probe
from biolit_id.index.milvus.errors import MilvusConfigError


@pytest.mark.parametrize("text, lite, version, scalar, reads", [
    ("milvus_lite-3.2.2", True, (2, 6, 0), ("INVERTED", "Trie"), "Strong"),
    ("v2.3.5-lite", False, (2, 3, 5), ("Trie",), "Session"),  # the `milvus` package
    ("v2.4.13-hotfix", False, (2, 4, 13), ("INVERTED", "Trie"), "Session"),
    ("2.6.1", False, (2, 6, 1), ("INVERTED", "Trie"), "Session"),
    ("Zilliz Cloud (Compatible with Milvus 2.5)", False, (2, 5, 0), ("INVERTED", "Trie"),
     "Session"),
])
def test_versions_give_the_first_guess(text, lite, version, scalar, reads):
    caps = parse_caps(text, lite=False)
    assert (caps.lite, caps.version, caps.scalar_index_candidates, caps.read_consistency) == (
        lite, version, scalar, reads)


def test_servers_older_than_2_3_are_refused_with_a_reason():
    with pytest.raises(MilvusConfigError, match="upsert and ARRAY"):
        parse_caps("v2.2.16", lite=False)


def test_a_server_that_cannot_say_is_taken_for_a_current_one():
    class Mute:
        def get_server_version(self):
            raise RuntimeError("unimplemented")

    assert probe(Mute(), lite=False).version == (2, 6, 0)
    assert parse_caps("nightly", lite=False).scalar_index_candidates[0] == "INVERTED"


def test_scalar_index_refusals_are_told_from_other_errors():
    assert is_index_kind_refusal(RuntimeError(
        "index type not match: invalid parameter[expected=Trie][actual=INVERTED]"))
    assert not is_index_kind_refusal(RuntimeError("Fail connecting to server"))
