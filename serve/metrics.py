"""Prometheus metrics: latency histograms and token/outcome counters recorded per request, and the
engine's gauges (slots, pages, queue, prefix hit rate, preemptions, mixed steps, and for a mixture-of-experts
model `xlaserve_moe_routed_tokens_total{layer,expert}`, for a speculating engine its guesses made
and kept and the tokens a guessing sequence emitted per verify step) read from its `EngineStats` at
scrape time.

Every request that reached the engine is counted once, when it ends, however it ends (finished,
cancelled by its client, past its deadline, cut at shutdown): the engine loop calls `finished` from
its thread. Every refusal is counted in `xlaserve_rejected_total{reason}`: the transport's
(unauthenticated, malformed, message_too_large, open_stream_limit) and admission's (the limit's
name); admission refusals also count in `xlaserve_requests{outcome}` by status.

The endpoint (`serve`) has no authentication: bind it to an address only operators reach."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from xlaserve.runtime.request import Request
from xlaserve.runtime.stats import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineCollector:
    """The engine's gauges, read from `stats()` at every scrape."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        gauges = {
            "xlaserve_slots_busy": ("Decode slots holding a request", s.slots_busy),
            "xlaserve_slots_total": ("Decode slots", s.slots_total),
            "xlaserve_queue_length": ("Requests waiting for a slot", s.queue_length),
            "xlaserve_kv_pages_used": ("KV pages held by requests", s.pages_used),
            "xlaserve_kv_pages_free": ("KV pages free", s.pages_free),
            "xlaserve_kv_pages_cached": ("KV pages kept by the prefix cache, evictable", s.pages_cached),
            "xlaserve_prefix_cache_hit_rate": (
                "Prompt tokens served from the prefix cache / prompt tokens",
                s.prefix_hit_rate,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "xlaserve_preemptions", "Sequences preempted for lack of KV pages", value=s.preemptions
        )
        yield CounterMetricFamily(
            "xlaserve_mixed_steps",
            "Steps whose running sequences decoded inside a prefill call (mixed_batch)",
            value=s.mixed_steps,
        )
        if s.moe_routed:  # a mixture-of-experts model: its load per layer and expert
            routed = CounterMetricFamily(
                "xlaserve_moe_routed_tokens",
                "Tokens each mixture-of-experts layer routed to each expert",
                labels=["layer", "expert"],
            )
            for layer, row in enumerate(s.moe_routed):
                for expert, n in enumerate(row):
                    routed.add_metric([str(layer), str(expert)], n)
            yield routed
        if s.speculative_emitted:  # the engine speculates
            yield from _speculative(s)


def _speculative(s: EngineStats):
    yield CounterMetricFamily(
        "xlaserve_speculative_proposed_tokens", "Speculative guesses made", value=s.speculative_proposed
    )
    yield CounterMetricFamily(
        "xlaserve_speculative_accepted_tokens",
        "Speculative guesses the target model kept",
        value=s.speculative_accepted,
    )
    # counts[n]: verify steps in which a sequence that guessed emitted n tokens (buckets le=1..K+1)
    counts, cumulative, buckets = s.speculative_emitted, 0, []
    for n in range(1, len(counts)):
        cumulative += counts[n]
        buckets.append((str(float(n)), cumulative))
    buckets.append(("+Inf", cumulative))
    yield HistogramMetricFamily(
        "xlaserve_speculative_accepted_length",
        "Tokens a sequence that guessed emitted per verify step (guesses kept + 1)",
        buckets=buckets,
        sum_value=sum(n * c for n, c in enumerate(counts)),
    )


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "xlaserve_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "xlaserve_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "xlaserve_request_latency_seconds",
            "Arrival to end of request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "xlaserve_queue_time_seconds", "Arrival to first scheduled", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(
            "xlaserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter("xlaserve_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("xlaserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.rejections = Counter(
            "xlaserve_rejected", "Requests refused before they ran, by reason", ["reason"], registry=r
        )
        if stats is not None:
            r.register(EngineCollector(stats))

    def tokens_streamed(self, n: int, seconds_since_last: float | None) -> None:
        if n and seconds_since_last is not None:
            for _ in range(n):
                self.itl.observe(seconds_since_last / n)

    def finished(self, req: Request) -> None:
        t = req.timings
        if req.score_start is not None:  # a scoring item: counted, but no generation latencies
            self.prompt_tokens.inc(len(req.prompt_ids))
            self.requests.labels(outcome=req.finish_reason.value if req.finish_reason else "unknown").inc()
            return
        if t.ttft_s is not None:
            self.ttft.observe(t.ttft_s)
        if t.queue_s is not None:
            self.queue.observe(t.queue_s)
        if t.finished is not None:
            self.e2e.observe(t.finished - t.arrival)
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generated_tokens.inc(len(req.output_ids))
        self.requests.labels(outcome=req.finish_reason.value if req.finish_reason else "unknown").inc()

    def rejected(self, outcome: str, reason: str | None = None) -> None:
        """A request refused by the service: `outcome` is its status, `reason` the limit's name."""
        self.requests.labels(outcome=outcome).inc()
        self.rejections.labels(reason=reason or outcome).inc()

    def transport_rejected(self, reason: str) -> None:
        """An RPC refused before its handler ran (see serve/guards.py)."""
        self.rejections.labels(reason=reason).inc()

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)
