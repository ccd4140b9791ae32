"""shared/metrics.py: the Prometheus names it promises are the ones the exporter writes, and the
helpers behind the one-line call sites."""

from __future__ import annotations

import re

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from shared import metrics

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$")


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line of a text exposition."""
    found = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        found.append((match[1], labels, float(match[3])))
    return found


def test_every_metric_is_exported_under_the_names_shared_metrics_promises() -> None:
    """Each spec made into an instrument on a private provider and recorded once: the exporter's
    exposition has exactly `exported_series()`, with the spec's labels."""
    registry = CollectorRegistry(auto_describe=False)
    reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=registry)
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")

    def labels(spec: metrics.MetricSpec) -> dict[str, str]:
        return {label: "x" for label in spec.labels}

    for spec in metrics.METRICS:
        if spec.kind == "counter":
            meter.create_counter(spec.name, unit=spec.unit, description=spec.description).add(1, labels(spec))
        elif spec.kind == "histogram":
            meter.create_histogram(spec.name, unit=spec.unit, description=spec.description,
                                   explicit_bucket_boundaries_advisory=list(spec.buckets)).record(0.01, labels(spec))
        elif spec.kind == "up_down_counter":
            meter.create_up_down_counter(spec.name, unit=spec.unit, description=spec.description).add(1, labels(spec))
        else:
            def observe(_options: CallbackOptions, spec: metrics.MetricSpec = spec) -> list[Observation]:
                return [Observation(1, labels(spec))]

            meter.create_observable_gauge(spec.name, callbacks=[observe], unit=spec.unit,
                                          description=spec.description)
    found = samples(generate_latest(registry).decode())
    assert {name for name, _, _ in found} == set(metrics.exported_series())
    for name, sample_labels, _ in found:
        spec = metrics.exported_series()[name]
        assert set(sample_labels) - {"le"} == set(spec.labels), name
        if name.endswith("_bucket"):
            bounds = [float(v) for n, lab, _ in found if n == name for k, v in lab.items() if k == "le"]
            assert bounds == [*spec.buckets, float("inf")], name


def test_names_and_labels_are_prometheus_names_and_low_cardinality() -> None:
    names = [spec.prometheus_name for spec in metrics.METRICS]
    assert len(names) == len(set(names))
    allowed = {metrics.CHANNEL, metrics.RESULT, metrics.OUTCOME, metrics.GROUP, metrics.ENGINE, metrics.OPERATION,
               metrics.SERVICE, metrics.REASON, metrics.CAUSE}
    for spec in metrics.METRICS:
        assert re.fullmatch(r"threadline_[a-z_]+", spec.prometheus_name), spec
        assert spec.description and set(spec.labels) <= allowed, spec
        assert (spec.kind == "histogram") == bool(spec.buckets), spec
        assert list(spec.buckets) == sorted(set(spec.buckets)), spec


def test_a_durable_belongs_to_its_consumer_group() -> None:
    assert metrics.consumer_group("webhooks-events-p3") == "webhooks-events"
    assert metrics.consumer_group("whatsapp-outbound-p0") == "whatsapp-outbound"
    assert metrics.consumer_group("conversations-inbound") == "conversations-inbound"  # before partitioning
    assert metrics.consumer_group("some-durable-pump") == "some-durable-pump"


def test_pending_counts_sum_the_consumers_of_a_group_until_they_stop() -> None:
    counts = metrics.PendingCounts()
    first, second, other = object(), object(), object()
    counts.set(first, "webhooks-events", 3)
    counts.set(second, "webhooks-events", 4)
    counts.set(other, "conversations-inbound", 0)
    counts.set(first, "webhooks-events", 5)  # refreshed: replaces, never adds
    assert counts.totals() == {"webhooks-events": 9, "conversations-inbound": 0}
    counts.drop(second)
    counts.drop(second)
    assert counts.totals() == {"webhooks-events": 5, "conversations-inbound": 0}
    observed = {o.attributes["group"]: o.value for o in counts.observe(CallbackOptions()) if o.attributes}
    assert observed == {"webhooks-events": 5, "conversations-inbound": 0}
