"""The load report on vLLM's Prometheus endpoint: GET /metrics of a real server (the CPU build)
gives each rank's bytes, seconds, GB/s, path, reader and checksum state, equal to the rank's JSON
report. Served once from the default registry (one API server) and once from the multiprocess
files (PROMETHEUS_MULTIPROC_DIR, as vLLM sets it for --api-server-count > 1)."""

import importlib.metadata
import json
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_server import ApiServer
from vllm_sources import RELEASES, run_on_sources

GAUGES = ("vllm_gds_load_bytes", "vllm_gds_load_seconds", "vllm_gds_load_gbps", "vllm_gds_load_total_seconds",
          "vllm_gds_checksums_verified", "vllm_gds_load_page_cache_fraction")


def test_stat_logger_entry_point_is_installed():
    entries = [e for e in importlib.metadata.entry_points(group="vllm.stat_logger_plugins") if e.name == "vllm_gds"]
    assert [e.value for e in entries] == ["vllm_gds.loader.metrics:LoadReportMetrics"], (
        "the vllm.stat_logger_plugins entry point of pyproject.toml is not installed: "
        "run `make install` (pip install -e . again)")


@pytest.fixture(scope="module", params=["one-registry", "multiprocess"])
def served(request, prepared_tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"metrics-{request.param}")
    env = dict(os.environ)
    if request.param == "multiprocess":
        (tmp / "prometheus").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "prometheus")
    extra = json.dumps({"report_dir": str(tmp / "reports")})
    with ApiServer(prepared_tiny, tmp / "serve.log", "--model-loader-extra-config", extra, env=env) as server:
        metrics = server.get("/metrics")
    (report,) = [json.loads(p.read_text()) for p in (tmp / "reports").glob("load-report-rank-*.json")]
    return request.param, metrics, report, prepared_tiny


@pytest.mark.engine
def test_metrics_equal_the_load_report(served):
    mode, metrics, report, model = served
    families = {f.name: f for f in text_string_to_metric_families(metrics) if f.name.startswith("vllm_gds_")}
    assert sorted(families) == sorted(GAUGES), metrics[-3000:]
    labels = {"model_name": str(model), "rank": "0", "tp_rank": "0", "pp_rank": "0", "path": "host",
              "source": "prepared", "reader": "kvikio"}
    values = {}
    for name, family in families.items():
        assert family.type == "gauge"
        (sample,) = family.samples  # one rank; several API servers' files would still give one
        assert sample.labels == labels, (mode, sample)
        values[name] = sample.value
    assert report["mode"] == "host" and report["engine"] == "kvikio" and report["checksums_verified"] is True
    assert values["vllm_gds_load_bytes"] == report["nbytes"] > 0
    assert values["vllm_gds_load_seconds"] == report["read_seconds"] > 0
    assert values["vllm_gds_load_total_seconds"] == report["total_seconds"]
    assert values["vllm_gds_load_gbps"] == pytest.approx(report["nbytes"] / report["read_seconds"] / 1e9, rel=1e-12)
    assert values["vllm_gds_checksums_verified"] == 1.0
    assert values["vllm_gds_load_page_cache_fraction"] == report["resident_fraction"]


@pytest.mark.parametrize("minor", RELEASES)
def test_stat_logger_plugin_fits_gpu_release_sources(minor, tmp_path):
    """vLLM's own discovery of stat logger plugins accepts the class on each GPU release (a
    StatLoggerBase with no abstract method left), and it sets the gauges from a rank's report."""
    run_on_sources(minor, f"""
        import os
        os.environ["VLLM_PLUGINS"] = "vllm_gds"
        os.environ["VLLM_GDS_RUN_DIR"] = {str(tmp_path)!r}
        from prometheus_client import REGISTRY
        from vllm.v1.metrics.loggers import AggregateStatLoggerBase, load_stat_logger_plugin_factories
        from vllm_gds.loader.metrics import LoadReportMetrics
        from vllm_gds.loader.report import LoadReport
        assert load_stat_logger_plugin_factories() == [LoadReportMetrics]
        assert issubclass(LoadReportMetrics, AggregateStatLoggerBase)
        from pathlib import Path
        LoadReport(model="m", source="prepared", rank=3, tp_rank=1, pp_rank=1, mode="gds", files=2, tensors=9,
                   nbytes=4_000_000_000, read_seconds=0.5, checksums_verified=False, verify_seconds=0.0,
                   total_seconds=0.9, engine="kvikio").write(Path({str(tmp_path)!r}))
        stat_logger = LoadReportMetrics(None, [0])
        stat_logger.log_engine_initialized()
        labels = dict(model_name="", rank="3", tp_rank="1", pp_rank="1", path="gds", source="prepared",
                      reader="kvikio")
        assert REGISTRY.get_sample_value("vllm_gds_load_gbps", labels) == 8.0
        assert REGISTRY.get_sample_value("vllm_gds_checksums_verified", labels) == 0.0
        assert REGISTRY.get_sample_value("vllm_gds_load_page_cache_fraction", labels) is None
        print("OK")
    """)
