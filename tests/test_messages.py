"""Messages between the sides: exact round trips, byte counts, and malformed content rejected with a reason."""

import json

import pytest

from fedlada.messages import MessageError, PathItem, ReportMessage, TeachMessage


def test_round_trip_and_size():
    t = TeachMessage(round=2, question_ids=("p-1", "p-2"), paths=(PathItem("p-1", "2 + 3 = 5\nAnswer: 5", -3.5, 7),))
    b = t.to_bytes()
    assert TeachMessage.from_bytes(b) == t
    assert len(b) == len(json.dumps(json.loads(b), separators=(",", ":"), ensure_ascii=False).encode())
    r = ReportMessage(round=2, client=1, paths=t.paths, metrics={"selected": 3})
    assert ReportMessage.from_bytes(r.to_bytes()) == r
    a = r.audit()
    assert a["paths_on_public_questions"] == 1 and a["scalar_scores"] == 2 and a["bytes"] == len(r.to_bytes())
    assert t.paths[0].nll == pytest.approx(0.5)


@pytest.mark.parametrize("payload, fragment", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1,2]", "expected a report message"),
    (json.dumps({"kind": "teach", "version": 1}).encode(), "expected a report message"),
    (json.dumps({"kind": "report", "version": 9, "round": 1, "client": 0}).encode(), "version 9"),
    (json.dumps({"kind": "report", "version": 1, "round": "1", "client": 0}).encode(), "'round' must be an integer"),
    (json.dumps({"kind": "report", "version": 1, "round": 1, "client": 0,
                 "paths": [{"question_id": "q", "text": "x", "logprob": 5.0, "num_tokens": 3}]}).encode(),
     "logprob must be a finite number <= 0"),
    (json.dumps({"kind": "report", "version": 1, "round": 1, "client": 0,
                 "paths": [{"question_id": "q", "text": "x", "logprob": -1.0}]}).encode(), "lacks key"),
    (json.dumps({"kind": "report", "version": 1, "round": 1, "client": 0, "metrics": {"a": "x"}}).encode(),
     "'metrics' must map names to numbers"),
    (b'{"kind":"report","version":1,"round":1,"client":0,"metrics":{"a":NaN}}', "NaN is not a JSON number"),
    (b'{"kind":"report","version":1,"metrics":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("a str, not bytes", "expected bytes, found str"),
    (None, "expected bytes, found NoneType"),
])
def test_malformed_reports_are_rejected(payload, fragment):
    with pytest.raises(MessageError) as e:
        ReportMessage.from_bytes(payload)
    assert fragment in str(e.value)


def test_a_message_is_written_as_strict_json_and_equals_its_round_trip():
    with pytest.raises(MessageError, match="teach message: cannot be written as JSON .* every number must be finite"):
        TeachMessage(1, ("q",), (PathItem("q", "t", float("nan"), 1),)).to_bytes()
    with pytest.raises(MessageError, match="report message: cannot be written"):
        ReportMessage(1, 0, metrics={"a": float("inf")}).to_bytes()
    t = TeachMessage(1, ["q"], [PathItem("q", "t", -1.0, 1)])  # lists from a caller
    assert TeachMessage.from_bytes(memoryview(t.to_bytes())) == t
    r = ReportMessage(1, 0, paths=[PathItem("q", "t", -1.0, 1)])
    assert ReportMessage.from_bytes(bytearray(r.to_bytes())) == r


def test_numpy_numbers_and_misused_fields_are_caught_where_the_message_is_made():
    import numpy as np

    t = TeachMessage(round=np.int64(1), question_ids=("a", "b"))  # a loop over np.arange(1, 3)
    assert type(t.round) is int and TeachMessage.from_bytes(t.to_bytes()) == t
    r = ReportMessage(round=np.int32(2), client=np.int64(0), metrics={"a": np.float32(1.5), "n": np.int64(3)})
    assert ReportMessage.from_bytes(r.to_bytes()) == r and r.metrics == {"a": 1.5, "n": 3}
    with pytest.raises(MessageError, match="question id 'a' is listed twice"):
        TeachMessage(round=1, question_ids=("a", "b", "a"))
    with pytest.raises(MessageError, match="question id 'a' is listed twice"):
        TeachMessage.from_bytes(b'{"kind":"teach","version":1,"round":1,"question_ids":["a","a"],"paths":[]}')
    with pytest.raises(MessageError, match="not one string"):
        TeachMessage(round=1, question_ids="abc")
    with pytest.raises(MessageError, match="'metrics' must hold finite numbers"):
        ReportMessage.from_bytes(b'{"kind":"report","version":1,"round":1,"client":0,"metrics":{"a":1e400}}')


def test_path_items_take_numpy_scores_and_refuse_wrong_types_when_made():
    import numpy as np

    p = PathItem("q", "t", np.float32(-1.5), np.int64(3))  # as score_paths returns them
    assert (type(p.logprob), type(p.num_tokens)) == (float, int)
    assert ReportMessage.from_bytes(ReportMessage(1, 0, paths=(p,)).to_bytes()).paths == (p,)
    for bad in (("q", "t", "-1", 3), (None, "t", -1.0, 3), ("q", "t", -1.0, 2.5)):
        with pytest.raises(MessageError):
            PathItem(*bad)
    with pytest.raises(MessageError, match="question ids must be strings"):
        TeachMessage(round=1, question_ids=(1, 2))
