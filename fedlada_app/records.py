"""Every Flower record key of a LaDa run, and the conversion between the library's values and Flower records.

The library already serialises what crosses between the sides (``fedlada.messages``: ``TeachMessage`` and
``ReportMessage`` as UTF-8 JSON bytes); Flower only carries those bytes. What travels, by message type:

=================  ==============================================  ===============================================
message type       server -> client (ConfigRecord ``fedlada``)     client -> server
=================  ==============================================  ===============================================
``query.setup``    config, digest, evaluate                        ``setup``: partition-id, num-partitions,
                                                                   SLM info, split sizes (JSON);
                                                                   [``eval``] before round 1
``train``          config, digest, round, resume, evaluate,        ``report``: **report** bytes;
                   **teach** bytes                                 ``telemetry``: local metrics, selections (JSON);
                                                                   [``eval``] of the updated SLM
``evaluate``       config, digest, round, resume                   ``eval``: result (JSON); ``eval-metrics``
``query.save``     config, digest, round, resume, checkpoint dir   ``saved``: the files written (JSON)
=================  ==============================================  ===============================================

A setup or train request with ``evaluate`` set asks for the client's evaluation in the same reply: in a deployment
every message costs a new ClientApp process (importing torch and transformers, loading the SLM), so the server
asks separately (``evaluate``) only the clients whose step failed.

Only the teach and report bytes are the protocol (their sizes are what the run directory reports per round).
The ``telemetry`` record is the experimenter's view of the client's local log (its train metrics and every filter
decision with its gaps and scores), written to the run directory as the in-process runner does; a client sends it
only when ``flower.telemetry`` is true and its node config does not say ``telemetry=false``. The config travels as
JSON with every request, so a ClientApp needs nothing but the message (in ``run_simulation`` Flower gives
ClientApps no run config) and can check that it runs the server's config (the digest).

A node keeps its SLM's trained state between messages in ``context.state``: an ArrayRecord ``fedlada.weights``
(the trainable weights) and a ConfigRecord ``fedlada.state`` (state id, round, config digest, filter state as
``torch.save`` bytes). Malformed content raises :class:`RecordError`; the server counts that node as failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlada import config as config_mod
from fedlada.config import RunConfig

from fedlada_app.settings import FlowerConfig, flower_config

REQUEST = "fedlada"
SETUP = "setup"
REPORT = "report"
TELEMETRY = "telemetry"
EVAL = "eval"
EVAL_METRICS = "eval-metrics"
SAVED = "saved"
STOP = "stop"
STATE_WEIGHTS = "fedlada.weights"
STATE_META = "fedlada.state"

SETUP_TYPE, TRAIN, EVALUATE, SAVE_TYPE = "query.setup", "train", "evaluate", "query.save"


class RecordError(ValueError):
    """Message content that lacks a record or key, or holds a value of the wrong type."""


def _get(content: RecordDict, record: str, key: str, types: type | tuple[type, ...]) -> Any:
    if record not in content:
        raise RecordError(f"content lacks record '{record}' (has: {', '.join(sorted(content.keys())) or 'none'})")
    rec = content[record]
    if key not in rec:
        raise RecordError(f"record '{record}' lacks key '{key}'")
    value = rec[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise RecordError(f"record '{record}' key '{key}': expected {types}, found {type(value).__name__}")
    return value


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{what}: not JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------- config


def config_digest(cfg: RunConfig) -> str:
    """A short digest of the resolved config (the text every run directory stores)."""
    return hashlib.sha256(config_mod.dump_toml(cfg).encode()).hexdigest()[:16]


def _flatten_tables(d: dict, prefix: str = "") -> dict[str, Any]:
    # Tables become dotted keys; lists (of tables, too) stay whole, which load_config accepts as one value.
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten_tables(v, key))
        else:
            out[key] = v
    return out


def wire_config(cfg: RunConfig, fcfg: FlowerConfig) -> str:
    """The config as it travels to clients: JSON of the run's keys plus the ``flower`` knobs."""
    return json.dumps({"run": _flatten_tables(config_mod.to_dict(cfg)), "flower": dataclasses.asdict(fcfg)},
                      sort_keys=True)


def config_from_wire(text: str) -> tuple[RunConfig, FlowerConfig]:
    d = _json(text, "config")
    if not isinstance(d, dict) or not isinstance(d.get("run"), dict) or not isinstance(d.get("flower"), dict):
        raise RecordError("config: expected an object with 'run' and 'flower' tables")
    return config_mod.load_config(overrides=d["run"]), flower_config(d["flower"])


# ---------------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """What every server -> client message carries."""

    config: str
    digest: str
    round: int = 0
    resume_round: int = 0  # the last round this client saved its state: a node without state in its context loads
    # its newest files up to that round (0: the node starts from the prepared SLM)
    checkpoint_dir: str = ""  # the run's checkpoints directory (a node's own ``checkpoint-dir`` overrides it)
    teach: bytes | None = None
    evaluate: bool = False  # setup/train: also evaluate the SLM afterwards and add an ``eval`` record to the reply


def request_content(req: Request) -> RecordDict:
    rec = {"config": req.config, "digest": req.digest, "round": req.round, "resume-round": req.resume_round,
           "checkpoint-dir": req.checkpoint_dir, "evaluate": req.evaluate}
    if req.teach is not None:
        rec["teach"] = req.teach
    return RecordDict({REQUEST: ConfigRecord(rec)})


def request_from(content: RecordDict) -> Request:
    teach = _get(content, REQUEST, "teach", bytes) if "teach" in content.get(REQUEST, {}) else None
    return Request(config=_get(content, REQUEST, "config", str), digest=_get(content, REQUEST, "digest", str),
                   round=_get(content, REQUEST, "round", int),
                   resume_round=_get(content, REQUEST, "resume-round", int),
                   checkpoint_dir=_get(content, REQUEST, "checkpoint-dir", str), teach=teach,
                   evaluate=_get(content, REQUEST, "evaluate", bool))


# ----------------------------------------------------------------------------------------------------- replies


def setup_content(partition: int, num_partitions: int, info: dict, sizes: dict) -> RecordDict:
    """A node's answer to setup: which client it is, what it prepared."""
    return RecordDict({SETUP: ConfigRecord({"partition-id": partition, "num-partitions": num_partitions,
                                            "info": json.dumps(info), "sizes": json.dumps(sizes)})})


def setup_refusal_content(partition: int, num_partitions: int, reason: str) -> RecordDict:
    """A node's answer to setup when the run cannot start on it for a user error (its data or model): the reason,
    one line, which the server reports and stops on, as the in-process runner does."""
    return RecordDict({SETUP: ConfigRecord({"partition-id": partition, "num-partitions": num_partitions,
                                            "refused": reason})})


def stop_content(reason: str) -> RecordDict:
    """A client's answer to a train message when its step hit a user error (the config, a plug-in selection rule
    that raises or returns the wrong thing): the reason, one line; the server stops the run on it, as the
    in-process runner does, rather than counting a failed client and going on."""
    return RecordDict({STOP: ConfigRecord({"reason": reason})})


def stop_reason(content: RecordDict) -> str | None:
    rec = content.get(STOP) if hasattr(content, "get") else None
    return None if rec is None or "reason" not in rec else str(rec["reason"])


def setup_refusal(content: RecordDict) -> str | None:
    """The reason of a setup refusal, or None for a normal setup reply."""
    rec = content.get(SETUP) if hasattr(content, "get") else None
    if rec is None or "refused" not in rec:
        return None
    return str(rec["refused"])


def setup_from(content: RecordDict) -> tuple[int, int, dict, dict]:
    return (_get(content, SETUP, "partition-id", int), _get(content, SETUP, "num-partitions", int),
            _json(_get(content, SETUP, "info", str), "setup info"),
            _json(_get(content, SETUP, "sizes", str), "setup sizes"))


def report_content(report: bytes, metrics: dict | None = None, selections: list[dict] | None = None) -> RecordDict:
    rd = RecordDict({REPORT: ConfigRecord({"report": report})})
    if metrics is not None:
        rd[TELEMETRY] = ConfigRecord({"metrics": json.dumps(metrics), "selections": json.dumps(selections or [])})
    return rd


def report_from(content: RecordDict) -> tuple[bytes, dict, list[dict]]:
    """(report bytes, local metrics, selections); the last two are empty when the client sent no telemetry."""
    report = _get(content, REPORT, "report", bytes)
    if TELEMETRY not in content:
        return report, {}, []
    metrics = _json(_get(content, TELEMETRY, "metrics", str), "telemetry metrics")
    selections = _json(_get(content, TELEMETRY, "selections", str), "telemetry selections")
    if not isinstance(metrics, dict) or not isinstance(selections, list) or \
            not all(isinstance(s, dict) for s in selections):
        raise RecordError("telemetry: expected metrics as an object and selections as a list of objects")
    return report, metrics, selections


def eval_content(result: dict, rd: RecordDict | None = None) -> RecordDict:
    """A reply with an evaluation result (added to ``rd`` when given: a setup or train reply)."""
    rd = rd if rd is not None else RecordDict()
    rd[EVAL] = ConfigRecord({"result": json.dumps(result)})
    if result.get("accuracy") is not None:
        rd[EVAL_METRICS] = MetricRecord({"accuracy": float(result["accuracy"]), "num-examples": int(result["n"])})
    return rd


def has_eval(content: RecordDict) -> bool:
    return EVAL in content


def eval_from(content: RecordDict) -> dict:
    result = _json(_get(content, EVAL, "result", str), "eval result")
    if not isinstance(result, dict) or "accuracy" not in result:
        raise RecordError("eval result: expected an object with 'accuracy'")
    return result


def saved_content(files: list[str]) -> RecordDict:
    return RecordDict({SAVED: ConfigRecord({"files": json.dumps(files)})})


def saved_from(content: RecordDict) -> list[str]:
    return _json(_get(content, SAVED, "files", str), "saved files")


# ------------------------------------------------------------------------------------------------ node state


def filter_bytes(state_dict: dict) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def filter_from_bytes(data: bytes) -> dict:
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def store_state(state: RecordDict, *, weights: dict, filter_state: dict | None, state_id: str, round: int,
                digest: str) -> None:
    """Put a client's trained state into its node's ``context.state``."""
    meta = {"state-id": state_id, "round": round, "digest": digest}
    if filter_state is not None:
        meta["filter"] = filter_bytes(filter_state)
    state[STATE_WEIGHTS] = ArrayRecord(weights)
    state[STATE_META] = ConfigRecord(meta)


@dataclass
class NodeState:
    state_id: str
    round: int
    digest: str
    filter_bytes: bytes | None
    record: ArrayRecord

    def weights(self) -> dict:
        return dict(self.record.to_torch_state_dict())

    def filter_state(self) -> dict | None:
        return filter_from_bytes(self.filter_bytes) if self.filter_bytes is not None else None


def load_state(state: RecordDict) -> NodeState | None:
    """The client state kept in ``context.state``, or None when this node has none yet."""
    if STATE_META not in state or STATE_WEIGHTS not in state:
        return None
    meta = state[STATE_META]
    return NodeState(state_id=str(meta["state-id"]), round=int(meta["round"]), digest=str(meta["digest"]),
                     filter_bytes=meta.get("filter"), record=state[STATE_WEIGHTS])


# ------------------------------------------------------------------------------------------------------ sizes


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it (every record, array and chunk object)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
