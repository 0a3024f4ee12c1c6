"""The autoscaling signals: capacity, backlog per replica and drain time.

Computed once, in flowbatch.metrics, from the stats record; Prometheus
writes them, ``flowbatch top`` reads a scrape back into the same record and
gets the same figures, the broker worker exports its queue's lag. Figures
here are on hand-built records, so each expected value is worked out below.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import flowbatch as fb
from flowbatch.brokers import MemoryBroker, QueueStats, Worker, WorkerCollector, WorkerConfig
from flowbatch.brokers.base import encode_job
from flowbatch.metrics import PipelineStats, StageStats, Summary, capacity, drain_seconds
from flowbatch.observe.top import compute, parse
from flowbatch.prometheus import render
from polling import until


def stage(name: str, workers: int, done: int, busy: float, **kw: Any) -> StageStats:
    base = StageStats(
        name=name, executor="thread", workers=workers, batch_max_size=0, done=done, failed=0,
        retried=0, expired=0, dropped=0, queued=0, in_flight=0, utilization=0.5,
        busy_seconds=busy, service_time=Summary(), queue_wait=Summary(), batches=0,
        mean_batch_size=0.0,
    )
    return dataclasses.replace(base, **kw)


def pipeline(*stages: StageStats, in_flight: int, bottleneck: str | None) -> PipelineStats:
    return PipelineStats(
        name="p", elapsed=100.0, submitted=200, completed=200 - in_flight, failed=0, expired=0,
        cancelled=0, in_flight=in_flight, items_per_s=2.0, latency=Summary(), stages=stages,
        bottleneck=bottleneck,
    )


# prep: 4 workers, 100 items (90 done, 10 failed) in 50 busy worker-seconds:
# 2 items per busy worker-second, 8/s with all 4 busy. embed: 1 worker,
# 100 items in 20 s: 5/s. The pipeline drains at 5/s, the slower of the two.
PREP = stage("prep", 4, 90, 50.0, failed=10, queued=3)
EMBED = stage("embed", 1, 100, 20.0, queued=12, in_flight=5, utilization=0.9)


def test_capacity_and_drain_formulas() -> None:
    assert capacity(100, 50.0, 4) == 8.0
    assert capacity(0, 50.0, 4) is None  # nothing finished: unknown, not 0
    assert capacity(10, 0.0, 4) is None
    assert drain_seconds(20, 5.0) == 4.0
    assert drain_seconds(0, None) == 0.0  # nothing to drain: known without a rate
    assert drain_seconds(20, None) is None


def test_figures_of_a_hand_built_record() -> None:
    s = pipeline(PREP, EMBED, in_flight=20, bottleneck="embed")
    assert s.stage("prep").capacity == 8.0
    assert s.stage("embed").capacity == 5.0
    assert s.capacity == 5.0
    assert s.drain_seconds == 4.0  # 20 in flight / 5 per second
    assert s.backlog_per_replica == 20.0  # per worker of the bottleneck (1)
    # With prep the bottleneck, the backlog spreads over its 4 workers.
    assert dataclasses.replace(s, bottleneck="prep").backlog_per_replica == 5.0
    d = s.to_dict()
    assert (d["capacity"], d["drain_seconds"], d["backlog_per_replica"]) == (5.0, 4.0, 20.0)
    assert [st["capacity"] for st in d["stages"]] == [8.0, 5.0]


def test_unknown_speed_is_none_and_an_idle_stage_does_not_count() -> None:
    # embed holds items but has finished none: its speed, and so the drain
    # time, is unknown.
    waiting = dataclasses.replace(EMBED, done=0, busy_seconds=3.0)
    s = pipeline(PREP, waiting, in_flight=20, bottleneck="prep")
    assert s.capacity is None and s.drain_seconds is None
    assert s.backlog_per_replica == 5.0
    # A stage that has neither finished nor holds anything (a filter nothing
    # reached yet) does not bound the others.
    idle = dataclasses.replace(EMBED, done=0, busy_seconds=0.0, queued=0, in_flight=0)
    assert pipeline(PREP, idle, in_flight=3, bottleneck="prep").capacity == 8.0
    # Before any work: no bottleneck, the stage with the fewest workers.
    fresh = pipeline(
        stage("prep", 4, 0, 0.0), stage("embed", 2, 0, 0.0, queued=6), in_flight=6, bottleneck=None
    )
    assert fresh.backlog_per_replica == 3.0 and fresh.drain_seconds is None
    empty = pipeline(PREP, EMBED, in_flight=0, bottleneck="embed")
    assert empty.drain_seconds == 0.0 and empty.backlog_per_replica == 0.0


def test_recent_capacity_is_over_the_interval() -> None:
    before = pipeline(PREP, EMBED, in_flight=20, bottleneck="embed")
    # In the next 10 s embed finished 80 more items in 10 busy seconds: 8/s now.
    after = dataclasses.replace(
        before,
        elapsed=110.0,
        stages=(PREP, dataclasses.replace(EMBED, done=180, busy_seconds=30.0)),
    )
    recent = after.since(before)
    assert recent.stage("embed").capacity == 8.0
    assert recent.capacity is None  # prep finished nothing in the interval but holds 3
    assert after.capacity == pytest.approx(180 / 30)


class _Fixed:
    def __init__(self, stats: PipelineStats) -> None:
        self._stats = stats

    def stats(self) -> PipelineStats:
        return self._stats


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_prometheus_writes_the_record_figures_and_top_reads_them_back() -> None:
    s = pipeline(PREP, EMBED, in_flight=20, bottleneck="embed")
    text = render({"p": _Fixed(s)}).decode()  # type: ignore[dict-item]
    got = samples(text)
    lab = (("pipeline", "p"),)
    assert got[("flowbatch_pipeline_backlog_per_replica", lab)] == 20.0
    assert got[("flowbatch_pipeline_drain_seconds", lab)] == 4.0
    assert got[("flowbatch_pipeline_capacity_items_per_second", lab)] == 5.0
    back = parse(text)["p"]
    assert (back.capacity, back.drain_seconds, back.backlog_per_replica) == (5.0, 4.0, 20.0)
    [view] = compute({"p": back}, {"p": back}, 1.0)  # no work in between: the since-start drain
    assert (view.drain_seconds, view.backlog_per_replica) == (4.0, 20.0)
    # Unknown capacity: the series are absent, not 0 (an autoscaler reads 0 as idle).
    unknown = pipeline(PREP, dataclasses.replace(EMBED, done=0), in_flight=20, bottleneck="prep")
    got = samples(render({"p": _Fixed(unknown)}).decode())  # type: ignore[dict-item]
    assert ("flowbatch_pipeline_drain_seconds", lab) not in got
    assert ("flowbatch_pipeline_capacity_items_per_second", lab) not in got
    assert got[("flowbatch_pipeline_backlog_per_replica", lab)] == 5.0


def test_a_real_runner_reports_its_capacity() -> None:
    def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    pipe = fb.Pipeline([fb.stage(double, batch=fb.Batch(max_size=8))], name="d")

    async def main() -> PipelineStats:
        async with pipe.open() as runner:
            assert [y async for y in runner.map(range(50))] == [2 * x for x in range(50)]
            return runner.stats()

    s = asyncio.run(main())
    st = s.stage("double")
    assert st.capacity == pytest.approx(50 / st.busy_seconds * st.workers)
    assert s.capacity == st.capacity and s.drain_seconds == 0.0


# ------------------------------------------------------------ broker worker


def test_worker_config_rejects_a_bad_lag_interval() -> None:
    for bad in (0, -1.0, "5"):
        with pytest.raises(ValueError, match="lag_interval must be a number > 0 or None"):
            WorkerConfig(lag_interval=bad)  # type: ignore[arg-type]
    assert WorkerConfig(lag_interval=None).lag_interval is None


class _FlakyLag(MemoryBroker):
    """A memory broker whose queue_lag fails while ``failing`` is set."""

    failing = False
    reads = 0

    async def queue_lag(self) -> QueueStats:
        self.reads += 1
        if self.failing:
            raise ConnectionError("broker away")
        return await super().queue_lag()


def test_the_worker_reads_the_lag_periodically_and_exports_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = asyncio.Event()

    async def held(x: Any) -> Any:
        await gate.wait()
        return x

    pipe = fb.Pipeline([fb.stage(held)], name="held")
    broker = _FlakyLag("lagq")

    async def main() -> None:
        await broker.open()
        await broker.publish([encode_job(f"j{i}", i) for i in range(5)])
        worker = Worker(pipe, broker, WorkerConfig(prefetch=2, poll=0.01, lag_interval=0.01))
        collector = WorkerCollector(worker)
        assert worker.lag is None
        running = asyncio.create_task(worker.run())
        try:
            # Two messages are held in the pipeline, three wait.
            await until(
                lambda: worker.lag is not None and worker.lag.waiting == 3, 10, "lag == 3"
            )
            assert worker.lag is not None and worker.lag.in_flight == 2
            got = samples(render({}, collector).decode())
            assert got[("flowbatch_broker_lag_messages", (("queue", "lagq"),))] == 3.0
            assert got[("flowbatch_broker_in_flight_messages", (("queue", "lagq"),))] == 2.0
            assert worker.lag.dead is None and worker.lag.results is None  # no scans
            # A failing read drops the gauges and is logged; the worker goes on.
            broker.failing = True
            await until(lambda: worker.lag is None, 10, "the failed read")
            assert not any(n.startswith("flowbatch_broker_") for n, _ in samples(
                render({}, collector).decode()))
            reads = broker.reads
            await until(lambda: broker.reads >= reads + 3, 10, "more reads")
            broker.failing = False
            await until(lambda: worker.lag is not None, 10, "a reading again")
            gate.set()
            await until(lambda: len(broker._results) == 5, 10, "all five answered")
        finally:
            worker.stop()
            await running
        assert worker.lag is None
        warned = [r for r in caplog.records if "reading the queue's lag failed" in r.getMessage()]
        assert [r.levelname for r in warned][:1] == ["WARNING"]
        assert all(r.levelname == "DEBUG" for r in warned[1:])  # once per failing streak

    caplog.set_level("DEBUG", logger="flowbatch.brokers")
    asyncio.run(main())
