"""Prometheus metrics of `fdjax serve` (GET /metrics): requests and tokens by how they ended,
the queue, the running batch, KV pages in use, prefix-cache hits, the programs traced so
far (a recompile shows as a change), time to first token and inter-token latency.

`record` is called with every engine event, on the engine's thread, so each request is
counted once when it ends, whatever its client did. Latencies are measured where the
tokens reach the host: time to first token from the request's submission, inter-token
latency as the time since the request's previous tokens spread over the tokens that came
(several decode steps per host round trip arrive together).
"""
from __future__ import annotations

from fdjax.engine import steps

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:

  def __init__(self, engine):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import CounterMetricFamily
    self.engine = engine
    self.registry = r = CollectorRegistry()
    self.received = Counter("fdjax_requests_received", "Requests accepted into the queue.",
                            registry=r)
    self.rejected = Counter("fdjax_requests_rejected", "Requests refused with a 4xx, "
                            "by reason (queue_full, bad_request, unknown_field, invalid_value, "
                            "model_not_found, not_found, ...).", ["reason"], registry=r)
    self.finished = Counter("fdjax_requests_finished", "Requests ended, by finish reason "
                            "(stop, length, cancelled, error).", ["finish_reason"], registry=r)
    self.prompt_tokens = Counter("fdjax_prompt_tokens", "Prompt tokens of ended requests.",
                                 ["finish_reason"], registry=r)
    self.embedded = Counter("fdjax_embeddings", "Inputs embedded (/v1/embeddings).",
                            registry=r)
    self.embedded_tokens = Counter("fdjax_embedding_tokens", "Tokens of the inputs embedded.",
                                   registry=r)
    self.generation_tokens = Counter("fdjax_generation_tokens", "Tokens generated for ended "
                                     "requests (as their usage counts them).", ["finish_reason"],
                                     registry=r)
    gauges = {"fdjax_queue_length": ("Requests waiting to be admitted.",
                                     lambda: engine.queue_length),
              "fdjax_running_requests": ("Requests in the running batch (prefill or decode).",
                                         lambda: engine.running),
              "fdjax_kv_pages_in_use": ("KV-cache pages referenced by requests.",
                                        lambda: engine.kv.pages_in_use),
              "fdjax_kv_pages_total": ("KV-cache pages in the pool (every data replica's).",
                                       lambda: engine.kv.pages_total),
              "fdjax_traced_programs": ("Device programs traced (compiled) so far; steady "
                                        "under a steady load.",
                                        lambda: sum(steps.TRACE_COUNT.values()))}
    for name, (doc, fn) in gauges.items():
      Gauge(name, doc, registry=r).set_function(fn)
    self.ttft = Histogram("fdjax_time_to_first_token_seconds", "From submission to the first "
                          "token.", buckets=LATENCY_BUCKETS, registry=r)
    self.itl = Histogram("fdjax_inter_token_latency_seconds", "Time between a request's "
                         "tokens.", buckets=LATENCY_BUCKETS, registry=r)

    class PrefixHits:
      def collect(self):
        yield CounterMetricFamily("fdjax_prefix_cache_hit_tokens", "Prompt tokens served "
                                  "from the prefix cache.",
                                  value=engine.kv.prefix_hit_tokens)

    r.register(PrefixHits())
    if getattr(engine, "spec", None) is not None:
      r.register(_Speculation(engine.scheduler.decoder))

  def record(self, event):
    """One engine event of a request (engine thread)."""
    if event.tokens:
      if event.completion_tokens == event.tokens:
        self.ttft.observe(event.gap)
      else:
        for _ in range(event.tokens):
          self.itl.observe(event.gap / event.tokens)
    if event.finish_reason:
      self.finished.labels(event.finish_reason).inc()
      self.prompt_tokens.labels(event.finish_reason).inc(event.prompt_tokens)
      self.generation_tokens.labels(event.finish_reason).inc(event.completion_tokens)

  def text(self) -> tuple[bytes, str]:
    """The exposition (bytes) and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Speculation:
  """Speculative decoding's counters (engine.scheduler.decoder's totals): drafts proposed and
  accepted, and the mean accepted length (drafts kept per row per verification round)."""

  def __init__(self, decoder):
    self.decoder = decoder

  def collect(self):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    d = self.decoder
    yield CounterMetricFamily("fdjax_spec_draft_tokens", "Tokens drafted for verification.",
                              value=d.drafted)
    yield CounterMetricFamily("fdjax_spec_accepted_tokens", "Drafted tokens the target kept.",
                              value=d.accepted)
    yield CounterMetricFamily("fdjax_spec_verification_rounds", "Rows verified (one row in "
                              "one round each).", value=d.verified)
    yield GaugeMetricFamily("fdjax_spec_mean_accepted_length", "Drafts kept per row per "
                            "verification round, so far (a round yields this + 1 tokens).",
                            value=d.accepted / d.verified if d.verified else 0.0)
