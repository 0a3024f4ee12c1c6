"""``flowbatch bench``: loading the target, the run's figures, advice, the HTML report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from observehelpers import chromium, dump_dom

import flowbatch as fb
from flowbatch.metrics import PipelineStats, StageStats, Summary
from flowbatch.observe.analysis import advise
from flowbatch.observe.bench import bench, read_inputs
from flowbatch.target import load_pipeline as load_target


def stage_stats(name: str, **kw: object) -> StageStats:
    base: dict[str, object] = {
        "name": name, "executor": "thread", "workers": 1, "batch_max_size": 0, "done": 100, "failed": 0,
        "retried": 0, "expired": 0, "dropped": 0, "queued": 0, "in_flight": 0,
        "utilization": 0.1, "busy_seconds": 1.0, "service_time": Summary(),
        "queue_wait": Summary(), "batches": 0, "mean_batch_size": 0.0,
    }
    base.update(kw)
    return StageStats(**base)  # type: ignore[arg-type]


def pipeline_stats(*stages: StageStats) -> PipelineStats:
    return PipelineStats(
        name="p", elapsed=10.0, submitted=100, completed=100, failed=0, expired=0,
        cancelled=0, in_flight=0, items_per_s=10.0, latency=Summary(), stages=stages,
        bottleneck=None,
    )


def embed_pipeline(max_size: int = 64) -> fb.Pipeline:
    def embed(xs: list[str]) -> list[int]:
        return [len(x) for x in xs]

    return fb.Pipeline([fb.stage(embed, batch=fb.Batch(max_size=max_size))], name="p")


def test_advice_names_the_bottleneck_and_what_to_change() -> None:
    busy_small = pipeline_stats(
        stage_stats("fetch", executor="async", workers=32, utilization=0.2),
        stage_stats("embed", utilization=0.97, batches=10, mean_batch_size=6.0),
    )
    assert advise(busy_small, embed_pipeline())[0] == (
        "stage embed is 97% busy with mean batch 6 of 64: "
        "more replicas or a larger max_wait would raise throughput"
    )
    full = pipeline_stats(stage_stats("embed", utilization=0.9, batches=10, mean_batch_size=63.0))
    assert "full batches (mean 63 of 64)" in advise(full, embed_pipeline())[0]
    limited = pipeline_stats(stage_stats("embed", utilization=0.9, batches=10, mean_batch_size=8.0))
    assert "every item in flight (8 callers)" in advise(limited, embed_pipeline(), callers=8)[0]
    cpu = pipeline_stats(stage_stats("parse", utilization=0.95, workers=2))
    assert "executor='process'" in advise(cpu)[0]
    idle = pipeline_stats(stage_stats("a", utilization=0.1), stage_stats("b", utilization=0.3))
    assert "spare capacity" in advise(idle, load="--concurrency 4")[0]
    assert "(--concurrency 4)" in advise(idle, load="--concurrency 4")[0]
    troubled = pipeline_stats(
        stage_stats("a", failed=5, retried=3, expired=2, batch_cost=Summary(count=1),
                    padding_waste=0.4)
    )
    text = "\n".join(advise(troubled))
    assert "failed 5 items" in text and "retried 3 attempts" in text
    assert "2 items passed their deadline" in text and "40% of their cost on padding" in text
    # Recent figures (the live views) override the since-start ones.
    assert advise(idle, utilization={"b": 0.99})[0].startswith("stage b is 99% busy")
    assert advise(pipeline_stats()) == []


def test_load_target_and_read_inputs(tmp_path: Path) -> None:
    assert load_target("observepipes:PIPELINE").name == "bench"
    assert load_target("observepipes:make_pipeline").name == "factory"
    for bad, msg in (
        ("observepipes", "expected module:attr"),
        ("observepipes:nothing", "no attribute"),
        ("observepipes:CONTENT_TYPE", "name a flowbatch.Pipeline"),
    ):
        with pytest.raises((ValueError, TypeError), match=msg):
            load_target(bad)
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n[2]\n')
    (tmp_path / "c.json").write_text('["p", "q"]')
    (tmp_path / "d.json").write_text('{"p": 1}')
    (tmp_path / "e.txt").write_text("\n")
    assert read_inputs(tmp_path / "a.txt") == ["one", "two"]
    assert read_inputs(tmp_path / "b.jsonl") == [{"x": 1}, [2]]
    assert read_inputs(tmp_path / "c.json") == ["p", "q"]
    with pytest.raises(ValueError, match="must hold a list"):
        read_inputs(tmp_path / "d.json")
    with pytest.raises(ValueError, match="no input items"):
        read_inputs(tmp_path / "e.txt")


def run_bench_cli(tmp_path: Path) -> tuple[str, Path, dict[str, object]]:
    inputs = tmp_path / "in.txt"
    inputs.write_text("".join("bad\n" if i % 20 == 0 else f"sentence {i}\n" for i in range(40)))
    report, figures = tmp_path / "report.html", tmp_path / "figures.json"
    result = CliRunner().invoke(
        bench,
        ["observepipes:PIPELINE", "--input", str(inputs), "--concurrency", "4",
         "--duration", "600", "--requests", "40", "--report", str(report),
         "--json", str(figures)],
    )
    assert result.exit_code == 0, result.output
    return result.output, report, json.loads(figures.read_text())


def test_bench_reports_throughput_latency_bottleneck_and_writes_a_page(tmp_path: Path) -> None:
    out, report, figures = run_bench_cli(tmp_path)
    assert "flowbatch bench bench: 4 callers" in out
    assert "38 done, 2 failed" in out
    assert "throughput" in out and "p99" in out
    assert "bottleneck: embed" in out
    assert "errors: embed: ValueError x2" in out
    assert "stage embed is" in out  # the advice
    summary = figures["summary"]
    assert isinstance(summary, dict)
    assert summary["ok"] == 38 and summary["failed"] == 2
    stages = figures["stages"]
    assert isinstance(stages, list)
    assert [s["name"] for s in stages] == ["prep", "embed", "store"]
    assert stages[1]["batch_max_size"] == 64 and stages[1]["batch_sizes"]
    assert figures["timeline"]  # at least the final sample

    page = report.read_text()
    assert page.startswith("<!doctype html>")
    assert "FB.renderReport" in page and '"bottleneck":"embed"' in page
    # Self-contained: nothing is fetched.
    assert not re.search(r"(src|href)\s*=|@import|url\(|https?:", page)


@pytest.mark.skipif(chromium() is None, reason="needs chromium")
def test_the_report_draws_its_charts_in_a_browser(tmp_path: Path) -> None:
    _, report, _ = run_bench_cli(tmp_path)
    browser = chromium()
    assert browser is not None
    dom = dump_dom(browser, report.as_uri(), 2000)
    # The script ran: the charts and the stage table are in the document.
    assert dom.count('class="chart"') >= 5
    for title in ("Throughput (items/s)", "Latency (ms)", "Utilization per stage",
                  "Batch sizes: embed"):
        assert title in dom
    assert 'class="neck"' in dom and "embed ◀ bottleneck" in dom
