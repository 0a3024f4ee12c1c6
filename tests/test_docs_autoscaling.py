"""docs/autoscaling.md's YAML stays valid: the KEDA ScaledObjects, the
prometheus-adapter rules and the HPAs that users paste into a cluster.

No cluster here, so each kind is checked offline against what defines it:
the HPAs against the official Kubernetes client's models (unknown keys,
required fields), the ScaledObjects against what KEDA's documentation and
admission check require, every PromQL query with a real parser, and every
metric those queries select against a page flowbatch really renders. Each
check has a negative test on a broken copy, so none passes vacuously.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes.client
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import flowbatch as fb
from flowbatch.brokers import WorkerCollector
from flowbatch.brokers.base import QueueStats
from flowbatch.prometheus import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "autoscaling.md"
Doc = dict[str, Any]


# ------------------------------------------------------------ the YAML blocks


def yaml_blocks(markdown: str) -> list[Doc]:
    """Every document of every ```yaml block (a block that does not parse raises)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)
    return [d for b in blocks for d in yaml.safe_load_all(b) if d is not None]


def kind_of(doc: Doc) -> str:
    if doc.get("apiVersion") == "autoscaling/v2" and doc.get("kind") == "HorizontalPodAutoscaler":
        return "hpa"
    if doc.get("apiVersion") == "keda.sh/v1alpha1" and doc.get("kind") == "ScaledObject":
        return "keda"
    if "rules" in doc or "externalRules" in doc:
        return "adapter"
    return "unknown"


@functools.cache
def docs() -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = {"hpa": [], "keda": [], "adapter": [], "unknown": []}
    for d in yaml_blocks(DOC.read_text()):
        out[kind_of(d)].append(d)
    return out


def test_every_block_parses_and_is_a_known_kind() -> None:
    got = docs()
    assert got["unknown"] == []
    assert len(got["hpa"]) == 2 and len(got["keda"]) == 2 and len(got["adapter"]) == 1


def test_a_block_that_does_not_parse_fails() -> None:
    with pytest.raises(yaml.YAMLError):
        yaml_blocks("text\n```yaml\nspec:\n  a: [1, 2\n  b: 3\n```\n")


# ------------------------------------------------- HPAs: the Kubernetes models

_PRIMITIVES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "object": object,
}
_LIST = re.compile(r"(?:List|list)\[(.+)\]$")
_DICT = re.compile(r"(?:Dict\[str, |dict\(str, )(.+)[\])]$")


def model_problems(value: Any, type_name: str, path: str = "") -> list[str]:
    """Walk ``value`` against the client's type ``type_name``: unknown keys, wrong shapes."""
    if m := _LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in model_problems(v, m[1], f"{path}[{i}]")]
    if m := _DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        return [p for k, v in value.items() for p in model_problems(v, m[1], f"{path}.{k}")]
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and not (
            isinstance(value, bool) and type_name != "bool"
        )
        return [] if ok else [f"{path}: {value!r} is not {type_name}"]
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    problems = []
    for key, v in value.items():
        if key not in by_key:
            problems.append(f"{path}.{key}: not a field of {type_name}")
        else:
            problems += model_problems(v, model.openapi_types[by_key[key]], f"{path}.{key}")
    return problems


def build_model(doc: Doc, type_name: str = "V2HorizontalPodAutoscaler") -> Any:
    """The client's own objects from ``doc``: raises ValueError on a missing required field."""
    api = kubernetes.client.ApiClient()
    text = json.dumps(doc)
    if "response_text" in inspect.signature(api.deserialize).parameters:  # client >= 35
        return api.deserialize(text, type_name, "application/json")
    return api.deserialize(SimpleNamespace(data=text), type_name)  # older: a response


def test_hpas_match_the_kubernetes_models() -> None:
    for hpa in docs()["hpa"]:
        assert model_problems(hpa, "V2HorizontalPodAutoscaler") == []
        built = build_model(hpa)
        assert built.spec.scale_target_ref.name == hpa["spec"]["scaleTargetRef"]["name"]
        assert built.spec.metrics[0].type in ("Pods", "External")


def test_a_misspelled_or_missing_hpa_field_fails() -> None:
    hpa = docs()["hpa"][0]
    bad = copy.deepcopy(hpa)
    metric = bad["spec"]["metrics"][0]["pods"]["metric"]
    metric["selecter"] = metric.pop("selector")
    assert model_problems(bad, "V2HorizontalPodAutoscaler") == [
        ".spec.metrics[0].pods.metric.selecter: not a field of V2MetricIdentifier"
    ]
    bad = copy.deepcopy(hpa)
    bad["spec"]["metrics"][0]["pods"]["metric"]["selector"]["matchLabels"]["pipeline"] = 1
    assert model_problems(bad, "V2HorizontalPodAutoscaler") != []
    bad = copy.deepcopy(hpa)
    del bad["spec"]["maxReplicas"]
    assert model_problems(bad, "V2HorizontalPodAutoscaler") == []  # the walker sees keys only
    with pytest.raises(ValueError, match="maxReplicas|max_replicas"):
        build_model(bad)


# ------------------------------------------------------------ KEDA ScaledObjects

_METRIC_TYPES = {"AverageValue", "Value", "Utilization"}


def keda_problems(so: Doc) -> list[str]:
    """What KEDA's documentation (and its admission check) requires of a ScaledObject."""
    spec = so.get("spec", {})
    problems = []
    if not spec.get("scaleTargetRef", {}).get("name"):
        problems.append("spec.scaleTargetRef.name is required")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append("minReplicaCount > maxReplicaCount")
    for i, t in enumerate(spec.get("triggers", [])):
        kind = t.get("metricType", "AverageValue")
        if kind not in _METRIC_TYPES:
            problems.append(f"triggers[{i}].metricType {kind!r} is not one of {_METRIC_TYPES}")
        if "fallback" in spec and kind != "AverageValue":
            # KEDA: "Fallback can only be enabled for triggers with metric of type AverageValue"
            problems.append(f"triggers[{i}]: a fallback needs metricType AverageValue")
        if t.get("type") == "prometheus":
            meta = t.get("metadata", {})
            for key in ("serverAddress", "query", "threshold"):
                if key not in meta:
                    problems.append(f"triggers[{i}].metadata.{key} is required")
            if not isinstance(meta.get("threshold", ""), str):
                problems.append(f"triggers[{i}].metadata.threshold must be a string")
    return problems


def test_scaled_objects_have_what_keda_requires() -> None:
    for so in docs()["keda"]:
        assert keda_problems(so) == []
        assert any(t["type"] == "prometheus" for t in so["spec"]["triggers"])


def test_a_broken_scaled_object_fails() -> None:
    so = docs()["keda"][0]
    for breaks, why in [
        (lambda s: s["spec"]["scaleTargetRef"].pop("name"), "scaleTargetRef.name"),
        (lambda s: s["spec"].update(minReplicaCount=30), "minReplicaCount >"),
        (lambda s: s["spec"]["triggers"][0].update(metricType="Average"), "metricType 'Average'"),
        (lambda s: s["spec"]["triggers"][0].update(metricType="Value"), "needs metricType"),
        (lambda s: s["spec"]["triggers"][0]["metadata"].pop("query"), "metadata.query"),
        (lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=200), "a string"),
    ]:
        bad = copy.deepcopy(so)
        breaks(bad)
        assert any(why in p for p in keda_problems(bad)), why


# ------------------------------------------------ PromQL and exported names


@functools.cache
def exported() -> frozenset[str]:
    """Series names flowbatch writes: a runner with a latency target and an
    adaptive stage, and a broker worker's collector (a stand-in worker: the
    collector reads only ``lag`` and ``broker.queue``)."""

    async def double(x: str) -> str:
        return x * 2

    def embed(xs: list[str]) -> list[int]:
        return [len(x) for x in xs]

    pipe = fb.Pipeline(
        [
            fb.stage(double, name="prep", concurrency=fb.Adaptive(min=1, max=4)),
            fb.stage(embed, name="embed", batch=fb.Batch(max_size=8)),
        ],
        name="p",
    )
    worker = SimpleNamespace(
        lag=QueueStats(waiting=3, in_flight=1, delayed=0, oldest_waiting_age=1.0),
        broker=SimpleNamespace(queue="q"),
    )

    async def main() -> bytes:
        async with pipe.open(latency_target=1.0) as runner:
            assert [y async for y in runner.map(["a", "bb"] * 8)] == [2, 4] * 8
            return render({"p": runner}, WorkerCollector(worker))  # type: ignore[arg-type]

    names = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for fam in text_string_to_metric_families(asyncio.run(main()).decode()):
        # A family declared without a sample yet (a figure not known) still counts.
        names |= {fam.name + s for s in suffixes.get(fam.type, [""])}
        names |= {s.name for s in fam.samples}
    return frozenset(names)


def selected_metrics(query: str) -> set[str]:
    """The metric names ``query`` selects (raises ValueError if it does not parse)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers if node.matchers else []:
                if m.name == "__name__":
                    names.add(m.value)

    promql_parser.walk(promql_parser.parse(query), visit)
    return names


def adapter_queries(rule: Doc) -> list[str]:
    """A rule's seriesQuery and its metricsQuery with the adapter's templates filled in."""
    (series,) = selected_metrics(rule["seriesQuery"])
    filled = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="ml"')
        .replace("<<.GroupBy>>", "namespace, pod")
    )
    return [rule["seriesQuery"], filled]


def all_queries() -> list[str]:
    queries = [
        t["metadata"]["query"]
        for so in docs()["keda"]
        for t in so["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]
    for config in docs()["adapter"]:
        for rule in config.get("rules", []) + config.get("externalRules", []):
            queries += adapter_queries(rule)
    return queries


def unknown_metrics(query: str) -> set[str]:
    return selected_metrics(query) - exported()


def test_queries_parse_and_select_only_exported_metrics() -> None:
    queries = all_queries()
    assert len(queries) == 8  # 4 KEDA triggers, 2 adapter rules x (series, metrics)
    assert "flowbatch_broker_lag_messages" in exported()
    assert "flowbatch_pipeline_rejected_total" in exported()
    for q in queries:
        assert unknown_metrics(q) == set(), q


def test_a_bad_query_or_an_unknown_metric_fails() -> None:
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        selected_metrics('max(flowbatch_broker_lag_messages{queue="embed"}')
    with pytest.raises(ValueError, match="unexpected character"):  # a template left unfilled
        selected_metrics("max by (<<.GroupBy>>) (flowbatch_pipeline_in_flight)")
    assert unknown_metrics("sum(rate(flowbatch_pipeline_rejected_total[1m]))") == set()
    assert unknown_metrics("sum(flowbatch_pipeline_backlog_per_replicas)") == {
        "flowbatch_pipeline_backlog_per_replicas"
    }
    assert unknown_metrics('{__name__="flowbatch_broker_lag"}') == {"flowbatch_broker_lag"}
    assert unknown_metrics("flowbatch_pipeline_rejected") == {"flowbatch_pipeline_rejected"}


# ------------------------------------------------ the HPA <-> adapter names


def adapter_names(rules: list[Doc]) -> tuple[set[str], list[str]]:
    """The metric names the rules serve, and the rules whose ``name.matches``
    misses their own ``seriesQuery`` metric (the adapter's regex, unanchored)."""
    names, problems = set(), []
    for rule in rules:
        (series,) = selected_metrics(rule["seriesQuery"])
        name = rule.get("name", {})
        m = re.search(name.get("matches", ".*"), series)
        if m is None:
            problems.append(f"{name.get('matches')!r} does not match {series}")
            continue
        as_ = name.get("as") or ("$1" if m.re.groups == 1 else "$0")
        names.add(re.sub(r"\$\{?(\d+)\}?", lambda g, m=m: m[int(g[1])] or "", as_))
    return names, problems


def cross_problems(hpas: list[Doc], config: Doc) -> list[str]:
    pods, bad_pods = adapter_names(config.get("rules", []))
    external, bad_ext = adapter_names(config.get("externalRules", []))
    problems = bad_pods + bad_ext
    for hpa in hpas:
        for spec in hpa["spec"].get("metrics", []):
            served = {"Pods": pods, "External": external}.get(spec["type"])
            if served is None:
                continue
            name = spec[spec["type"].lower()]["metric"]["name"]
            if name not in served:
                problems.append(f"{hpa['metadata']['name']}: {spec['type']} {name} not served")
    return problems


def test_hpa_metrics_are_served_by_the_adapter_rules() -> None:
    (config,) = docs()["adapter"]
    assert cross_problems(docs()["hpa"], config) == []


def test_an_hpa_metric_no_rule_serves_fails() -> None:
    (config,) = docs()["adapter"]
    hpas = copy.deepcopy(docs()["hpa"])
    hpas[0]["spec"]["metrics"][0]["pods"]["metric"]["name"] = "flowbatch_pipeline_backlog"
    assert cross_problems(hpas, config) == [
        "embed-http: Pods flowbatch_pipeline_backlog not served"
    ]
    # A Pods metric is not served by an external rule, nor the other way round.
    swapped = {"rules": config["externalRules"], "externalRules": config["rules"]}
    assert len(cross_problems(docs()["hpa"], swapped)) == 2
    bad = copy.deepcopy(config)
    bad["rules"][0]["name"]["matches"] = "^flowbatch_backlog_per_replica$"
    assert cross_problems(docs()["hpa"], bad) == [
        "'^flowbatch_backlog_per_replica$' does not match flowbatch_pipeline_backlog_per_replica",
        "embed-http: Pods flowbatch_backlog_per_replica not served",
    ]
