"""Message tracking: find a message in the relay's log lines and put its path together.

The relay logs one ``received`` line per accepted message (client, sender, recipients,
Message-ID, the rules' verdicts, the action), ``delivery`` lines per attempt (relay, status,
reply, ``queued_as``: the next hop's queue id from its ``250 ... queued as ID``) and an ``ndr``
line when it makes a bounce (gateway/log.py).  Two steps:

1. :func:`search` on one host: one pass over its log lines (text or JSON format, e.g. from
   ``journalctl -u smg -o cat``), keeping only the lines of the queue ids that match (and of
   the NDRs they caused): memory is bounded by the matches, not the log.
2. :func:`paths`: the records of every host (``host`` set on each) joined into paths: a hop
   whose delivery names ``queued_as`` continues at the hop with that queue id on another host;
   a ``queued_as`` no host knows is the far end's queue id.

``smg trace`` (gateway/cli/trace.py) does both on one host; ``python -m deploykit trace``
runs step 1 on every host of an inventory over SSH and step 2 on the control machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# ``TIME smg[PID]: [QUEUEID: ][level: ]event key=value ...`` (gateway.log.TextFormatter)
_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT[\d:.]+Z) smg\[\d+\]:(?: (?P<qid>[A-Za-z0-9]+):)?"
    r"(?: (?:warning|error|critical):)? (?P<event>[a-z_]+)(?P<rest>(?: \w+=\S*.*)?)$"
)
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
EVENTS = {"received", "delivery", "ndr", "reject", "expired", "bad_gateway_down"}
MAX_ROUNDS = 4  # hops followed across hosts (customer -> good -> bad -> far end is 2)


@dataclass(frozen=True)
class Criteria:
    message_id: str | None = None
    queue_ids: frozenset[str] = frozenset()
    sender: str | None = None
    recipient: str | None = None

    def empty(self) -> bool:
        return not (self.message_id or self.queue_ids or self.sender or self.recipient)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def parse_line(line: str) -> dict[str, Any] | None:
    """One log line (text or JSON format) as a record, or None if it is no mail event."""
    line = line.strip()
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("event") not in EVENTS:
            return None
        known = {"ts", "level", "logger", "event", "queue_id"}
        fields = {k: str(v) for k, v in data.items() if k not in known}
        return {"ts": data.get("ts", ""), "queue_id": data.get("queue_id"),
                "event": data["event"], "fields": fields}  # fmt: skip
    match = _LINE.match(line)
    if match is None or match["event"] not in EVENTS:
        return None
    fields = {key: _unquote(value) for key, value in _FIELD.findall(match["rest"] or "")}
    return {"ts": match["ts"], "queue_id": match["qid"], "event": match["event"],
            "fields": fields}  # fmt: skip


def _addresses(value: str | None) -> set[str]:
    return {a.strip("<>").lower() for a in (value or "").split(",") if a.strip("<>")}


def _matches(record: dict[str, Any], criteria: Criteria) -> bool:
    fields = record["fields"]
    if record["queue_id"] in criteria.queue_ids:
        return True
    if criteria.message_id and fields.get("message_id") == criteria.message_id:
        return True
    sender = fields.get("sender", "").strip("<>").lower()
    if (
        criteria.sender
        and record["event"] in ("received", "reject")
        and (sender == criteria.sender.lower())
    ):
        return True
    if criteria.recipient and record["event"] in ("received", "delivery", "reject"):
        wanted = criteria.recipient.lower()
        if wanted in _addresses(fields.get("to")) or wanted in _addresses(fields.get("rcpt")):
            return True
    return False


def search(lines: Iterable[str], criteria: Criteria) -> Iterator[dict[str, Any]]:
    """The records of every queue id that matches ``criteria``, and of the NDRs it caused;
    refusals (``NOQUEUE``) that match the sender or recipient too.  One pass."""
    followed: set[str] = set(criteria.queue_ids)
    for line in lines:
        record = parse_line(line)
        if record is None:
            continue
        queue_id = record["queue_id"]
        if queue_id in followed or _matches(record, criteria):
            if queue_id and queue_id != "NOQUEUE":
                followed.add(queue_id)
            if record["event"] == "ndr" and record["fields"].get("ndr"):
                followed.add(record["fields"]["ndr"])
            yield record


# --- the path ---------------------------------------------------------------------------------


@dataclass
class Hop:
    host: str
    queue_id: str
    received: dict[str, Any] | None = None
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    ndrs: list[str] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        r = self.received["fields"] if self.received else {}
        return {
            "host": self.host,
            "queue_id": self.queue_id,
            "time": self.received["ts"] if self.received else None,
            "client": r.get("client"),
            "sender": r.get("sender"),
            "to": r.get("to"),
            "message_id": r.get("message_id"),
            "tenant": r.get("tenant"),
            "action": r.get("action"),
            "verdicts": r.get("verdicts"),
            "deliveries": [
                {
                    "time": d["ts"],
                    **{
                        k: d["fields"].get(k)
                        for k in ("to", "relay", "status", "reply", "queued_as", "route", "tls")
                    },
                }
                for d in self.deliveries
            ],
            "ndrs": self.ndrs,
            "events": [{"time": o["ts"], "event": o["event"], **o["fields"]} for o in self.other],
        }


def hops(records: Iterable[dict[str, Any]]) -> dict[str, Hop]:
    """Queue id -> its hop (queue ids are unique across the fleet: time + process salt)."""
    out: dict[str, Hop] = {}
    for record in sorted(records, key=lambda r: r["ts"]):
        queue_id = record["queue_id"]
        if not queue_id or queue_id == "NOQUEUE":
            continue
        hop = out.setdefault(queue_id, Hop(record.get("host", "?"), queue_id))
        if record["event"] == "received":
            hop.received = record
        elif record["event"] == "delivery":
            hop.deliveries.append(record)
        elif record["event"] == "ndr":
            hop.ndrs.append(record["fields"].get("ndr", ""))
        else:
            hop.other.append(record)
    return out


def unknown_next_ids(records: Iterable[dict[str, Any]]) -> set[str]:
    """``queued_as`` ids no record has yet: ask the fleet for them (the next hop's lines)."""
    records = list(records)
    known = {r["queue_id"] for r in records}
    nexts = {r["fields"].get("queued_as") for r in records if r["event"] == "delivery"}
    return {n for n in nexts if n and n not in known}


def paths(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Every message found, as its chain of hops, its far end(s) and its NDRs."""
    records = list(records)
    by_id = hops(records)
    reached = {d["fields"].get("queued_as") for h in by_id.values() for d in h.deliveries}
    ndr_ids = {n for h in by_id.values() for n in h.ndrs}
    starts = [h for q, h in by_id.items() if q not in reached and q not in ndr_ids]
    messages = [_chain(start, by_id) for start in starts]
    rejects = [{"host": r.get("host"), "time": r["ts"], **r["fields"]}
               for r in records if r["queue_id"] in (None, "NOQUEUE")]  # fmt: skip
    return {"messages": messages, "rejects": rejects}


def _chain(start: Hop, by_id: dict[str, Hop]) -> dict[str, Any]:
    chain, far_end, ndrs = [], [], []
    queue: list[Hop] = [start]
    seen: set[str] = set()
    while queue and len(seen) < 50:
        hop = queue.pop(0)
        if hop.queue_id in seen:
            continue
        seen.add(hop.queue_id)
        chain.append(hop.as_json())
        for delivery in hop.deliveries:
            nxt = delivery["fields"].get("queued_as")
            if nxt and nxt in by_id:
                queue.append(by_id[nxt])
            elif nxt or delivery["fields"].get("status") == "sent":
                far_end.append({"from_host": hop.host, "relay": delivery["fields"].get("relay"),
                                "queue_id": nxt, "to": delivery["fields"].get("to"),
                                "reply": delivery["fields"].get("reply")})  # fmt: skip
        for ndr in hop.ndrs:
            if ndr in by_id:
                ndrs.append(by_id[ndr].as_json())
    first = chain[0]
    return {"message_id": first["message_id"], "sender": first["sender"], "to": first["to"],
            "hops": chain, "far_end": far_end, "ndrs": ndrs}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    """The paths as text for a terminal (every value escaped by gateway.log.printable)."""
    from gateway.log import printable

    lines: list[str] = []
    for message in result["messages"]:
        lines.append(printable(f"{message['message_id'] or '-'} from {message['sender'] or '-'}"
                               f" to {message['to'] or '-'}"))  # fmt: skip
        for hop in message["hops"]:
            lines += _hop_lines(hop, printable)
        for end in message["far_end"]:
            lines.append(printable(f"  far end: {end['relay']}  queue id {end['queue_id'] or '?'}"
                                   f"  ({end['reply']})"))  # fmt: skip
        for ndr in message["ndrs"]:
            lines.append("  NDR:")
            lines += _hop_lines(ndr, printable, indent="    ")
        lines.append("")
    for reject in result["rejects"]:
        lines.append(printable(f"refused on {reject.get('host')} at {reject['time']}: "
                               f"{reject.get('sender')} {reject.get('reply')}"))  # fmt: skip
    if not lines:
        lines.append("no message found")
    return "\n".join(lines).rstrip() + "\n"


def _hop_lines(hop: dict[str, Any], printable: Any, indent: str = "  ") -> list[str]:
    verdicts = f"  verdicts: {hop['verdicts']}" if hop["verdicts"] else ""
    tenant = f"  customer {hop['tenant']}" if hop["tenant"] else ""
    head = (f"{indent}{hop['host']}  {hop['queue_id']}  received {hop['time'] or '?'} from "
            f"{hop['client'] or '?'}{tenant}  action={hop['action'] or '?'}{verdicts}")  # fmt: skip
    out = [printable(head)]
    for d in hop["deliveries"]:
        out.append(
            printable(f"{indent}    -> {d['relay']} {d['status']} {d['time']}: {d['reply']}")
        )
    return out
