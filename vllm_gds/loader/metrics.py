"""The load reports on vLLM's Prometheus endpoint, /metrics.

A ``vllm.stat_logger_plugins`` entry point (vLLM's hook for a plugin's metrics): vLLM builds this
logger in process 0 of `vllm serve`, the API server that serves /metrics, once the engine is up.
The loader runs in the workers; each writes its rank's load report into the run's directory
(vllm_gds.run_dir), and this logger sets one sample per rank and gauge from them. Gauges made in
process 0 land where /metrics reads on vLLM 0.32, 0.33 and 0.34 alike: the default registry with
one API server; with several (--api-server-count), or PROMETHEUS_MULTIPROC_DIR set by the user,
the multiprocess files that vLLM's endpoint collects ("mostrecent": N API servers, one sample).
"""

from pathlib import Path

from prometheus_client import Gauge
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_gds import run_dir
from vllm_gds.loader.report import read_reports
from vllm_gds.units import gb_per_s

LABELS = ("model_name", "rank", "tp_rank", "pp_rank", "path", "source", "reader")

# name: (help, value from a report; None leaves the rank's sample out)
GAUGES = {
    "vllm_gds_load_bytes": ("Bytes of weights the rank read at its last load",
                            lambda r: r["nbytes"]),
    "vllm_gds_load_seconds": ("Seconds the rank spent reading its weights",
                              lambda r: r["read_seconds"]),
    "vllm_gds_load_gbps": ("The rank's read rate, GB/s (1e9 bytes per second): bytes over read seconds",
                           lambda r: gb_per_s(r["nbytes"], r["read_seconds"])),
    "vllm_gds_load_total_seconds": ("Seconds from the start of the rank's load to its weights in place",
                                    lambda r: r["total_seconds"]),
    "vllm_gds_checksums_verified": ("1 if the rank verified every tensor's checksum after reading, else 0",
                                    lambda r: int(bool(r["checksums_verified"]))),
    "vllm_gds_load_page_cache_fraction": ("Share of the rank's file pages in the page cache before reading",
                                          lambda r: r.get("resident_fraction")),
}

_gauges: dict[str, Gauge] = {}


def gauges() -> dict[str, Gauge]:
    """The gauges, made once per process (vLLM may build its stat loggers again)."""
    if not _gauges:
        for name, (help_text, _) in GAUGES.items():
            _gauges[name] = Gauge(name, help_text, LABELS, multiprocess_mode="mostrecent")
    return _gauges


def labels(report: dict, model_name: str) -> dict[str, str]:
    return {"model_name": model_name, "rank": str(report["rank"]), "tp_rank": str(report["tp_rank"]),
            "pp_rank": str(report["pp_rank"]), "path": report["mode"], "source": report["source"],
            "reader": report.get("engine") or "none"}


def export(reports: list[dict], model_name: str) -> None:
    for name, gauge in gauges().items():
        value_of = GAUGES[name][1]
        gauge.clear()  # a reload may change a rank's labels (its path, say)
        for report in reports:
            value = value_of(report)
            if value is not None:
                gauge.labels(**labels(report, model_name)).set(value)


class LoadReportMetrics(AggregateStatLoggerBase):
    """Sets the vllm_gds_* gauges from the workers' load reports; ignores vLLM's per-step stats."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        model_config = getattr(vllm_config, "model_config", None)
        self.model_name = str(model_config.served_model_name) if model_config is not None else ""
        self._seen: tuple | None = None

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        pass

    def log_engine_initialized(self):
        self.refresh()

    def log(self):
        self.refresh()  # vLLM calls this every few seconds: a reload's new reports show up

    def refresh(self) -> None:
        directory = run_dir.current()
        if directory is None:
            return
        files = sorted(directory.glob("load-report-rank-*.json"))
        seen = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        if seen != self._seen:
            self._seen = seen
            export(read_reports(Path(directory)), self.model_name)
