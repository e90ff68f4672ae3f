"""Every worker's counters in worker 0's /metrics (gateway.metrics_share): the others' files
are added, files of another run or of workers beyond the setting are not."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.metrics import Metrics
from gateway.metrics_share import CounterShare, share_dir


async def test_worker_0_adds_the_other_workers_counters(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    first, second = Metrics(), Metrics()
    first.inc("received")
    first.inc("smg_tenant_spam_total", tenant="customer-a")
    second.inc("received", 2)
    second.inc("smg_tenant_spam_total", tenant="customer-a")
    second.inc("smg_tenant_virus_total", tenant="customer-b")  # only worker 1 saw one
    CounterShare(spool, 1, 3, run_id="run-1").write(second)
    stale = share_dir(spool) / "worker-2.json"  # an earlier start of the service
    stale.write_text(json.dumps({"run": "run-0", "counters": second.counter_snapshot()}))
    (share_dir(spool) / "worker-7.json").write_text("{}")  # workers was 8 before
    (share_dir(spool) / "worker-x.json").write_text("not json")

    zero = CounterShare(spool, 0, 3, run_id="run-1")
    zero.forget_others()
    assert sorted(p.name for p in share_dir(spool).iterdir()) == ["worker-1.json", "worker-2.json"]
    first.add_peers(zero.peers)
    text = await first.render()
    assert "smg_messages_received_total 3" in text
    assert 'smg_tenant_spam_total{tenant="customer-a"} 2' in text
    assert 'smg_tenant_virus_total{tenant="customer-b"} 1' in text
    assert first.value("received") == 1  # its own counter is untouched


async def test_a_torn_file_is_skipped(tmp_path: Path) -> None:
    share_dir(tmp_path).mkdir()
    (share_dir(tmp_path) / "worker-1.json").write_text('{"run": "r", "counters": {"smg_x_total"')
    metrics = Metrics()
    metrics.inc("received")
    metrics.add_peers(CounterShare(tmp_path, 0, 2, run_id="r").peers)
    assert "smg_messages_received_total 1" in await metrics.render()
