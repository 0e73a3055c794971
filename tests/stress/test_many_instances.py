"""200 process instances at once on a 2-core machine, started and stopped twice."""

from __future__ import annotations

import os

import psutil

import spear_nb
from tests import _remote
from tests._support import ReadySignal, all_gone

COUNT = 200


def test_two_hundred_instances_started_and_stopped_twice() -> None:
    me = psutil.Process()
    fds_before = me.num_fds()
    children_before = {p.pid for p in me.children(recursive=True)}
    # 200 agents on two cores under a loaded CI machine can each be starved of
    # CPU for seconds; generous heartbeats keep a slow one from being replaced
    # (which the fault tests cover) so that the test checks scale alone.
    with spear_nb.Session(
        stop_grace=0.5,
        execution_timeout=120,
        max_instances_per_task=COUNT,
        heartbeat_interval=2.0,
        heartbeat_misses=10,
    ) as s:
        s.register("pid", _remote.report_and_block, max_instances=COUNT)
        seen: set[int] = set()
        for round_ in range(2):
            s.scale("pid", COUNT)
            table = s.instances()
            ready = table[table["status"] == "ready"]
            assert len(ready) == COUNT
            pids = {int(p) for p in ready["pid"]}
            assert len(pids) == COUNT
            assert not pids & seen, "an instance of the first round came back"
            seen |= pids
            # All of them really are live processes of this session...
            descendants = {p.pid for p in me.children(recursive=True)}
            assert pids <= descendants

            # ...and each answers: COUNT calls in flight at once, each blocked
            # until all have reported, so each must be on an instance of its own.
            signal_ = ReadySignal()
            try:
                handles = [s.submit("pid", signal_.port, i) for i in range(COUNT)]
                reported = {signal_.wait(timeout=60) for _ in range(COUNT)}
                assert reported == pids, f"round {round_}: not every instance served"
                signal_.release()
                results = [h.result(timeout=60) for h in handles]
                assert results == list(range(COUNT))
            finally:
                signal_.release()
                signal_.close()
            assert len(s.channels().query("state == 'connected'")) == COUNT

            s.scale("pid", 0)
            assert all_gone(sorted(pids), timeout=30) == []
            table = s.instances()
            assert (table["status"] == "stopped").sum() == COUNT * (round_ + 1)
            assert len(s.channels().query("state == 'connected'")) == 0
            left = {p.pid for p in me.children(recursive=True)} - children_before
            # Only the session's helpers remain: the watchdog and the zygote.
            assert len(left) <= 2, left
        workdir = s._workdir
        sockets = [n for n in os.listdir(workdir) if n.endswith(".sock")]
        assert sockets == ["host.sock"], sockets
    assert not os.path.exists(workdir)
    assert me.num_fds() <= fds_before + 2
