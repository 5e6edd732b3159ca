"""The completion tracker matches result messages to forwarded statements in protocol order."""

from __future__ import annotations

from dbguard.session.completions import CompletionTracker, Pending, rows_affected


def test_rows_affected_reads_every_tag_form():
    assert rows_affected(["INSERT 0 5", "UPDATE 3", "DELETE 0", "SELECT 10", "COPY 7", "BEGIN", ""]) == 25


def test_extended_batch_error_skips_the_rest_of_the_round_trip():
    t = CompletionTracker()
    a, b, c = Pending(1, 1, False, None), Pending(2, 1, False, None), Pending(3, 1, False, None)
    for p in (a, b, c):
        t.expect(p)
    t.command_complete("UPDATE 2")
    t.error("23505", "duplicate key")
    done = t.ready(1)
    assert [p.fields()["status"] for p in done] == ["ok", "error", "skipped"]
    assert done[0].fields()["rows"] == 2 and done[1].fields()["error"]["sqlstate"] == "23505"


def test_a_pipelined_later_round_trip_is_not_answered_by_an_earlier_message():
    t = CompletionTracker()
    first, second = Pending(1, 1, False, None), Pending(2, 2, False, None)
    t.expect(first)
    t.expect(second)
    t.error("42P01", "no such table")  # round 1's Parse failed before its Execute
    assert [p.stmt for p in t.ready(1)] == [1]
    t.command_complete("SELECT 1")
    (done,) = t.ready(2)
    assert done.stmt == 2 and done.fields()["status"] == "ok" and done.fields()["rows"] == 1


def test_an_error_that_arrives_before_its_execute_is_registered_belongs_to_it():
    t = CompletionTracker()
    t.error("22012", "division by zero")  # raised at Bind, forwarded ahead of the Execute
    t.expect(Pending(7, 1, False, None))
    (done,) = t.ready(1)
    assert done.fields()["error"]["sqlstate"] == "22012"


def test_a_simple_query_collects_every_tag_until_ready():
    t = CompletionTracker()
    t.expect(Pending(1, 1, True, None))
    t.command_complete("INSERT 0 1")
    t.command_complete("UPDATE 4")
    (done,) = t.ready(1)
    assert done.fields()["tags"] == ["INSERT 0 1", "UPDATE 4"] and done.fields()["rows"] == 5


def test_what_the_session_never_saw_finish_is_interrupted():
    t = CompletionTracker()
    t.expect(Pending(1, 1, False, None))
    (left,) = t.drain()
    assert left.fields()["status"] == "interrupted"
