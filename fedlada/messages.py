"""What crosses between the server and a client in a LaDa round: typed, serialisable message objects.

Only three kinds of content ever leave a side: reasoning **paths** (text) on *public* questions, **scalar scores**
(a path's log joint probability and token count under the sender's model), and **ids** of public questions. A
client's private records never appear in a message; a test (``tests/test_runner.py``) plants canary strings in every
client's private data and scans every serialised message of a whole run for them.

Messages serialise to UTF-8 JSON (``to_bytes``); their byte size is what the run directory reports per round and
per direction. ``from_bytes`` validates the content and raises :class:`MessageError` on anything malformed, so a
server can reject a bad client reply with a logged reason instead of crashing.

With a host framework configured (``host.name``, see ``fedlada.hosts``) a message may carry one more thing, the
host's payload (``host``): per-token top-k logits on public paths (FedMKT-like) or trainable weights and public
question ids (FedCoLLM-like). It travels base64-encoded in the JSON and counts in the message's byte size;
``from_bytes`` checks the encoding, ``fedlada.hosts`` checks the content.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import numbers
from dataclasses import asdict, dataclass, field

MESSAGE_VERSION = 1


class MessageError(ValueError):
    """A message that does not match its schema."""


@dataclass(frozen=True)
class PathItem:
    """One reasoning path on a public question, scored by the sender's own model."""

    question_id: str
    text: str
    logprob: float  # log pi_sender(path | question), summed over path tokens
    num_tokens: int

    def __post_init__(self):  # numpy numbers from score_paths as plain ones; a wrong type is refused when made
        if isinstance(self.logprob, numbers.Real) and not isinstance(self.logprob, bool):
            object.__setattr__(self, "logprob", float(self.logprob))
        object.__setattr__(self, "num_tokens", _plain_int(self.num_tokens))
        if not isinstance(self.question_id, str) or not isinstance(self.text, str):
            raise MessageError(f"path item: question_id and text must be strings, found {self.question_id!r}")
        if not isinstance(self.logprob, float) or not isinstance(self.num_tokens, int):
            raise MessageError(f"path item {self.question_id!r}: logprob must be a number and num_tokens an integer, "
                               f"found {self.logprob!r} and {self.num_tokens!r}")

    @property
    def nll(self) -> float:
        """Per-token negative log-likelihood under the sender's model."""
        return -self.logprob / max(self.num_tokens, 1)


def _items_from(raw: list, where: str) -> list[PathItem]:
    if not isinstance(raw, list):
        raise MessageError(f"{where}: 'paths' must be a list")
    out = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise MessageError(f"{where}: paths[{i}] must be an object")
        try:
            qid, text, lp, nt = r["question_id"], r["text"], r["logprob"], r["num_tokens"]
        except KeyError as e:
            raise MessageError(f"{where}: paths[{i}] lacks key {e}") from None
        if not isinstance(qid, str) or not isinstance(text, str):
            raise MessageError(f"{where}: paths[{i}]: question_id and text must be strings")
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or not math.isfinite(lp) or lp > 1e-6:
            raise MessageError(f"{where}: paths[{i}]: logprob must be a finite number <= 0, found {lp!r}")
        if not isinstance(nt, int) or isinstance(nt, bool) or nt < 1:
            raise MessageError(f"{where}: paths[{i}]: num_tokens must be an integer >= 1, found {nt!r}")
        out.append(PathItem(qid, text, float(lp), nt))
    return out


@dataclass(frozen=True)
class TeachMessage:
    """Server -> every client: this round's candidate public questions and the LLM's answer-correct paths."""

    round: int
    question_ids: tuple[str, ...]
    paths: tuple[PathItem, ...] = ()
    host: bytes | None = None  # the host framework's payload (fedlada.hosts), base64 in the JSON
    kind: str = field(default="teach", init=False)

    def __post_init__(self):  # lists given by a caller become tuples, so a message equals its round trip
        if isinstance(self.question_ids, (str, bytes)):
            raise MessageError("teach message: 'question_ids' must be a sequence of ids, not one string")
        object.__setattr__(self, "round", _plain_int(self.round))
        object.__setattr__(self, "question_ids", tuple(self.question_ids))
        object.__setattr__(self, "paths", tuple(self.paths))
        seen: set[str] = set()
        for q in self.question_ids:
            if not isinstance(q, str):
                raise MessageError(f"teach message: question ids must be strings, found {q!r}")
            if q in seen:
                raise MessageError(f"teach message: question id {q!r} is listed twice in 'question_ids'")
            seen.add(q)

    def to_bytes(self) -> bytes:
        d = {"kind": self.kind, "version": MESSAGE_VERSION, "round": self.round,
             "question_ids": list(self.question_ids), "paths": [asdict(p) for p in self.paths]}
        _put_host(d, self.host)
        return _dump(d)

    @classmethod
    def from_bytes(cls, data: bytes) -> "TeachMessage":
        d = _load(data, "teach")
        qids = d.get("question_ids")
        if not isinstance(qids, list) or not all(isinstance(q, str) for q in qids):
            raise MessageError("teach message: 'question_ids' must be a list of strings")
        return cls(round=_int(d, "round", "teach message"), question_ids=tuple(qids),
                   paths=tuple(_items_from(d.get("paths", []), "teach message")), host=_get_host(d, "teach message"))


@dataclass(frozen=True)
class ReportMessage:
    """Client -> server: the client's answer-correct paths on the candidates, scored by its SLM, plus scalar
    metrics (counts, accuracy on its own test split)."""

    round: int
    client: int
    paths: tuple[PathItem, ...] = ()
    metrics: dict = field(default_factory=dict)
    host: bytes | None = None  # the host framework's payload (fedlada.hosts), base64 in the JSON
    kind: str = field(default="report", init=False)

    def __post_init__(self):
        object.__setattr__(self, "round", _plain_int(self.round))
        object.__setattr__(self, "client", _plain_int(self.client))
        object.__setattr__(self, "paths", tuple(self.paths))
        # numpy scalars (np.float32(1.5)) as the plain numbers JSON writes
        object.__setattr__(self, "metrics", {k: (v.item() if hasattr(v, "item") and not isinstance(v, (int, float))
                                                 else v) for k, v in self.metrics.items()})
        bad = [k for k, v in self.metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float, type(None)))]
        if bad:  # what from_bytes would refuse is refused where the message is made
            raise MessageError(f"report message: metric {bad[0]!r} must be a number or None, found "
                               f"{self.metrics[bad[0]]!r}")

    def to_bytes(self) -> bytes:
        d = {"kind": self.kind, "version": MESSAGE_VERSION, "round": self.round, "client": self.client,
             "paths": [asdict(p) for p in self.paths], "metrics": self.metrics}
        _put_host(d, self.host)
        return _dump(d)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ReportMessage":
        d = _load(data, "report")
        metrics = d.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
                isinstance(v, (int, float, type(None))) and not isinstance(v, bool) for v in metrics.values()):
            raise MessageError("report message: 'metrics' must map names to numbers")
        if not all(v is None or math.isfinite(v) for v in metrics.values()):  # 1e400 parses as inf
            raise MessageError("report message: 'metrics' must hold finite numbers")
        return cls(round=_int(d, "round", "report message"), client=_int(d, "client", "report message"),
                   paths=tuple(_items_from(d.get("paths", []), "report message")), metrics=metrics,
                   host=_get_host(d, "report message"))

    def audit(self) -> dict:
        """What this message carries out of the client, by record kind (for the run's privacy audit)."""
        return {"paths_on_public_questions": len(self.paths), "scalar_scores": 2 * len(self.paths),
                "metrics": len(self.metrics), "bytes": len(self.to_bytes()),
                "path_text_bytes": sum(len(p.text.encode("utf-8")) for p in self.paths),
                "host_payload_bytes": len(self.host or b"")}


def _dump(d: dict) -> bytes:
    """Strict JSON: NaN or infinity has no JSON spelling, so a message holding one is refused when it is written
    (rather than written as ``NaN``, which the receiver's parser may reject)."""
    try:
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError as e:
        raise MessageError(f"{d['kind']} message: cannot be written as JSON ({e}): every number must be finite") \
            from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _load(data: bytes, kind: str) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"{kind} message: expected bytes, found {type(data).__name__}")
    try:
        d = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise MessageError(f"{kind} message: not UTF-8 JSON ({e})") from None
    except RecursionError:
        raise MessageError(f"{kind} message: JSON nested too deeply") from None
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise MessageError(f"expected a {kind} message, found kind={d.get('kind') if isinstance(d, dict) else d!r}")
    if d.get("version") != MESSAGE_VERSION:
        raise MessageError(f"{kind} message: version {d.get('version')!r}, expected {MESSAGE_VERSION}")
    return d


def _plain_int(v):
    """An integral number (a numpy integer too) as a Python int; anything else unchanged (``to_bytes`` writes it and
    the receiver refuses it)."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    return v


def _int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise MessageError(f"{where}: '{key}' must be an integer, found {v!r}")
    return v


def _put_host(d: dict, payload: bytes | None) -> None:
    # absent when there is no host payload, so messages without one serialise exactly as before
    if payload is not None:
        d["host"] = base64.b64encode(payload).decode("ascii")


def _get_host(d: dict, where: str) -> bytes | None:
    """The host payload's bytes, or None when the message has none. Its content is checked by ``fedlada.hosts``."""
    v = d.get("host")
    if v is None:
        return None
    if not isinstance(v, str):
        raise MessageError(f"{where}: 'host' must be a base64 string, found {type(v).__name__}")
    try:
        return base64.b64decode(v.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise MessageError(f"{where}: 'host' is not valid base64 ({e})") from None
