"""A Prometheus endpoint for the daemon (prometheus_client), read from ``Daemon.health()``
at scrape time, so the numbers it serves are the ones the health topic carries."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .endpoint import host_port


class _Collector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        h = self.daemon.health()
        g = GaugeMetricFamily("panorama_patients", "patient streams by state", labels=["state"])
        for state in ("waiting", "calibrating", "streaming"):
            g.add_metric([state], h["patients"].get(state, 0))
        yield g
        for name, doc in (("latency_ms", "origin publish to virtual chunk queued, recent"),
                          ("inference_ms", "one batched inference call, recent")):
            q = GaugeMetricFamily(f"panorama_{name}", doc, labels=["quantile"])
            for k in ("p50", "p99"):
                if h[name][k] is not None:
                    q.add_metric([k], h[name][k])
            yield q
        yield CounterMetricFamily("panorama_chunks_in", "raw chunks accepted", value=h["chunks_in"])
        yield CounterMetricFamily("panorama_chunks_out", "virtual chunks published", value=h["chunks_out"])
        qd = GaugeMetricFamily("panorama_queue_depth", "messages waiting", labels=["queue"])
        for k, v in h["queues"].items():
            qd.add_metric([k], v)
        yield qd
        dr = CounterMetricFamily("panorama_dropped", "messages dropped at a full queue", labels=["queue"])
        for k, v in h["drops"].items():
            dr.add_metric([k], v)
        yield dr
        rj = CounterMetricFamily("panorama_rejected", "inputs refused, by reason code", labels=["code"])
        for k, v in h["rejected"].items():
            rj.add_metric([k], v)
        yield rj


class Metrics:
    def __init__(self, daemon, host: str, port: int):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(daemon))
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # most often another daemon on the port
            raise OSError(f"health.metrics_port: cannot serve /metrics on {host_port(host, port)}: "
                          f"{exc.strerror or exc}") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
