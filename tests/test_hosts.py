"""Host math and wire formats: the top-k KD loss and the min-CE rule against hand-computed values, FedAvg weighted
correctly, payloads that round-trip with exact byte counts, and malformed payloads rejected with a reason."""

from __future__ import annotations

import base64
import json
import math
import struct

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fedlada.hosts import (TopK, _pack, choose_targets, decode_state, decode_topk, encode_state, encode_topk, fedavg,
                           tokenizer_fingerprint, topk_kd_loss)
from fedlada.messages import MessageError, PathItem, ReportMessage, TeachMessage

LN3 = math.log(3.0)


# ------------------------------------------------------------------------------------------------ KD loss


def test_kd_loss_is_zero_when_the_student_matches_the_teacher_on_its_top_k():
    student = torch.tensor([[0.0, 0.0, LN3, 5.0]], requires_grad=True)  # softmax over ids 1, 2 = [1/4, 3/4]
    values, idx = torch.tensor([[0.0, LN3]]), torch.tensor([[1, 2]])  # q = [1/4, 3/4]
    loss = topk_kd_loss(student, values, idx)
    assert_close(loss, torch.tensor(0.0), atol=1e-7, rtol=0)
    loss.backward()
    assert_close(student.grad, torch.zeros_like(student), atol=1e-7, rtol=0)


def test_kd_loss_full_support_charges_the_mass_outside_the_top_k():
    student = torch.tensor([[0.0, 0.0, LN3, 5.0]], requires_grad=True)
    values, idx = torch.tensor([[0.0, LN3]]), torch.tensor([[1, 2]])
    loss = topk_kd_loss(student, values, idx, student_support="full")
    # p_full = p_topk * 4 / Z with Z = 1 + 1 + 3 + e^5, so KL = log(Z / 4)
    assert_close(loss, torch.tensor(math.log((5 + math.exp(5)) / 4)), atol=1e-6, rtol=0)
    loss.backward()
    assert student.grad[0, 3] > 0 and student.grad[0, 0] > 0  # pushes down the tokens outside the top k


def test_kd_loss_hand_computed_with_temperature_weights_and_normaliser():
    student = torch.tensor([[0.0, 0.0, LN3, 5.0], [1.0, 2.0, 3.0, 4.0]])
    values, idx = torch.tensor([[2.0, 2.0], [0.0, 0.0]]), torch.tensor([[1, 2], [0, 3]])
    # row 0: q = [1/2, 1/2], p = [1/4, 3/4] -> KL = 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3)
    row0 = 0.5 * math.log(4 / 3)
    # row 1: q = [1/2, 1/2], p = softmax([1, 4]) -> KL = 0.5 ln(0.5 / p0) + 0.5 ln(0.5 / p1)
    p0 = 1 / (1 + math.exp(3))
    row1 = 0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0))
    assert_close(topk_kd_loss(student, values, idx), torch.tensor((row0 + row1) / 2), atol=1e-6, rtol=0)
    assert_close(topk_kd_loss(student, values, idx, weights=torch.tensor([1.0, 0.0])), torch.tensor(row0),
                 atol=1e-6, rtol=0)
    assert_close(topk_kd_loss(student, values, idx, num_tokens=10), torch.tensor((row0 + row1) / 10),
                 atol=1e-6, rtol=0)
    # T = 2 on row 0: q stays uniform, p = softmax([0, ln3 / 2]); the term is scaled by T^2 = 4
    s3 = math.sqrt(3)
    t2 = 4 * (0.5 * math.log(0.5 * (1 + s3)) + 0.5 * math.log(0.5 * (1 + s3) / s3))
    assert_close(topk_kd_loss(student[:1], values[:1], idx[:1], temperature=2.0), torch.tensor(t2),
                 atol=1e-6, rtol=0)


def test_kd_loss_rejects_bad_arguments():
    s, v, i = torch.zeros(2, 4), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        topk_kd_loss(s, v, i, temperature=0.0)
    with pytest.raises(ValueError, match="student_support"):
        topk_kd_loss(s, v, i, student_support="vocab")
    with pytest.raises(ValueError, match="shapes"):
        topk_kd_loss(s, v[:1], i)


def test_min_ce_rule_takes_the_other_target_only_when_strictly_lower():
    other = np.array([1.0, 2.0, np.nan, 1.0, np.inf, 0.5])
    own = np.array([2.0, 1.0, 1.0, 1.0, 3.0, np.nan])
    assert choose_targets(other, own).tolist() == [True, False, False, False, False, False]
    with pytest.raises(ValueError, match="shapes"):
        choose_targets(np.zeros(2), np.zeros(3))


# ------------------------------------------------------------------------------------------------ FedAvg


def test_fedavg_is_weighted_by_train_size():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    avg = fedavg([a, b], [1, 3])  # (1 * a + 3 * b) / 4
    assert_close(avg["w"], torch.tensor([2.5, 5.0]))
    assert_close(avg["b"], torch.tensor([[3.0]]))
    # equal weights: the plain mean; a zero weight drops a state; dtypes are kept
    assert_close(fedavg([a, b], [5, 5])["w"], torch.tensor([2.0, 4.0]))
    assert_close(fedavg([a, b], [0, 2])["w"], b["w"])
    half = fedavg([{"w": a["w"].half()}, {"w": b["w"].half()}], [1, 1])["w"]
    assert half.dtype == torch.float16 and half.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("states, weights, fragment", [
    ([], [], "no states"),
    ([{"w": torch.zeros(2)}], [1, 2], "1 states but 2 weights"),
    ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [0, 0], "not all 0"),
    ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1, -1], ">= 0"),
    ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [1, 1], "different keys"),
    ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1], "has shape (3,) in state 1"),
])
def test_fedavg_refuses_what_it_cannot_average(states, weights, fragment):
    with pytest.raises(ValueError) as e:
        fedavg(states, weights)
    assert fragment in str(e.value)


# ------------------------------------------------------------------------------------------------ payloads


def _entries(big_ids: bool = False) -> list[TopK]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=(3, 4))
    if big_ids:
        ids[0, 0] = 69_999  # beyond uint16: indices travel as int32
    return [TopK(0, 1.25, rng.normal(size=(3, 4)).astype(np.float16), ids),
            TopK(2, 0.5, np.ones((1, 4), np.float16), np.arange(4)[None])]


@pytest.mark.parametrize("big_ids, index_bytes", [(False, 2), (True, 4)])
def test_topk_payload_round_trips_and_its_size_is_what_it_carries(big_ids, index_bytes):
    entries = _entries(big_ids)
    data = encode_topk(entries, k=4, meta={"tokenizer": "abc"})
    got, meta = decode_topk(data)
    assert meta == {"tokenizer": "abc", "k": 4}
    assert [(e.path_index, e.ce) for e in got] == [(0, 1.25), (2, 0.5)]
    for e, g in zip(entries, got):
        assert g.values.dtype == np.float16 and np.array_equal(g.values, e.values)
        assert np.array_equal(g.indices, e.indices)
    # 4 token rows x k=4: fp16 values + indices, plus per entry a length, a path index (int32) and a CE (float32)
    (header,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + header + 4 * 4 * (2 + index_bytes) + 2 * (4 + 4 + 4)


def test_state_payload_round_trips_in_float32_and_float16():
    state = {"a.lora_A": torch.tensor([[0.5, -1.25]]), "a.lora_B": torch.zeros(2, 1)}
    got, meta = decode_state(encode_state(state, meta={"train_size": 7}))
    assert meta == {"train_size": 7, "dtype": "float32"}
    for k in state:
        assert_close(got[k], state[k], atol=0, rtol=0)
    small = encode_state(state, dtype="float16")
    assert len(small) < len(encode_state(state))
    assert_close(decode_state(small)[0]["a.lora_A"], state["a.lora_A"], atol=0, rtol=0)


def _bad_payloads() -> list[tuple[bytes, str]]:
    good = encode_topk(_entries(), k=4)
    v, i = np.zeros((2, 4), np.float16), np.zeros((2, 4), np.uint16)
    meta = {"k": 4}
    per = {"path_index": np.zeros(1, np.int32), "ce": np.ones(1, np.float32)}
    return [
        (b"", "not a safetensors blob"),
        (b"\xff" * 40, "does not fit"),
        (good[:-5], "not a valid safetensors blob"),
        (encode_state({"w": torch.zeros(1)}), "expected a 'topk' host payload"),
        (_pack({"values": v, "indices": i, "lengths": np.array([3], np.int32), **per}, "topk", meta), "add up"),
        (_pack({"values": v, "indices": i, "lengths": np.array([2], np.int32), **per}, "topk", {"k": 3}),
         "do not match k=3"),
        (_pack({"values": v * np.nan, "indices": i, "lengths": np.array([2], np.int32), **per}, "topk", meta),
         "non-finite"),
        (_pack({"values": v, "indices": i, "lengths": np.array([2], np.int32), "path_index": per["path_index"],
                "ce": -per["ce"]}, "topk", meta), "negative"),
        (_pack({"values": v, "indices": i, "lengths": np.array([2], np.int32)}, "topk", meta), "expected"),
    ]


@pytest.mark.parametrize("i", range(9))
def test_malformed_topk_payloads_are_rejected_with_a_reason(i):
    data, fragment = _bad_payloads()[i]
    with pytest.raises(MessageError) as e:
        decode_topk(data, where="report of client 1")
    assert "report of client 1" in str(e.value) and fragment in str(e.value)


def test_malformed_state_payload_is_rejected():
    bad = _pack({"w": np.array([np.inf], np.float32)}, "state", {})
    with pytest.raises(MessageError, match="non-finite"):
        decode_state(bad)


# ------------------------------------------------------------------------------------------------ messages


def test_messages_carry_the_host_payload_and_count_it():
    payload = encode_topk(_entries(), k=4)
    path = PathItem("p-1", "2 + 3 = 5\nAnswer: 5", -3.5, 7)
    plain = TeachMessage(round=1, question_ids=("p-1",), paths=(path,))
    t = TeachMessage(round=1, question_ids=("p-1",), paths=(path,), host=payload)
    assert TeachMessage.from_bytes(t.to_bytes()) == t
    assert b'"host"' not in plain.to_bytes()  # no payload: the bytes of a message without a host
    b64 = base64.b64encode(payload)
    assert len(t.to_bytes()) - len(plain.to_bytes()) == len(b',"host":""') + len(b64)
    r = ReportMessage(round=1, client=2, paths=(path,), metrics={"selected": 1}, host=payload)
    back = ReportMessage.from_bytes(r.to_bytes())
    assert back == r and back.host == payload
    assert r.audit()["host_payload_bytes"] == len(payload) and r.audit()["bytes"] == len(r.to_bytes())


@pytest.mark.parametrize("value, fragment", [("not base64!", "not valid base64"), ("QUJD=X", "not valid base64"),
                                             (123, "must be a base64 string"), (["QUJD"], "must be a base64")])
def test_messages_with_a_malformed_host_field_are_rejected(value, fragment):
    d = {"kind": "report", "version": 1, "round": 1, "client": 0, "paths": [], "metrics": {}, "host": value}
    with pytest.raises(MessageError) as e:
        ReportMessage.from_bytes(json.dumps(d).encode())
    assert fragment in str(e.value)
    d["kind"] = "teach"
    d["question_ids"] = []
    with pytest.raises(MessageError):
        TeachMessage.from_bytes(json.dumps(d).encode())


def test_tokenizer_fingerprint_tells_tokenizers_apart():
    from fedlada.models import train_tokenizer

    texts = ["Question: 3 boxes of 4 pens\nAnswer: 12"] * 20
    a, b = train_tokenizer(texts, vocab_size=280), train_tokenizer(texts, vocab_size=280)
    c = train_tokenizer(["a completely different corpus of words"] * 20, vocab_size=280)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) != tokenizer_fingerprint(c)
