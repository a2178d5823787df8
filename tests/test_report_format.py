"""The same load shows the same numbers everywhere, and counts read as English."""

import re

from vllm_gds.cli import main
from vllm_gds.cli.inspect_prepared import summary
from vllm_gds.loader.report import LoadReport
from vllm_gds.shards.manifest import read_manifest


def _report(nbytes, seconds, files=1, tensors=1):
    return LoadReport(model="m", source="prepared", rank=0, tp_rank=0, pp_rank=0, mode="host",
                      files=files, tensors=tensors, nbytes=nbytes, read_seconds=seconds,
                      checksums_verified=True, verify_seconds=0.0, total_seconds=seconds)


def test_log_line_and_report_show_the_same_rate(tmp_path, capsys):
    # 0.2546 GB/s: "0.25" from the raw numbers, "0.26" from the JSON's 3-digit 0.255
    report = _report(nbytes=2546, seconds=1e-5)
    report.write(tmp_path)
    logged = re.search(r"\(([\d.]+) GB/s\)", report.log_line()).group(1)
    assert main(["report", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[6] == logged == "0.25"


def test_counts_are_singular_or_plural():
    line = _report(nbytes=10**9, seconds=1.0, files=1, tensors=1).log_line()
    assert "from 1 file via" in line and "1 tensor installed" in line
    line = _report(nbytes=10**9, seconds=1.0, files=3, tensors=2).log_line()
    assert "from 3 files via" in line and "2 tensors installed" in line


def test_inspect_says_1_rank(prepared_tiny):
    text = summary(read_manifest(prepared_tiny), prepared_tiny)
    assert "(1 rank)" in text and "(1 ranks)" not in text
