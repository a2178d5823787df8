"""`vllm-gds report DIR`: the load reports that ranks wrote to --model-loader-extra-config's report_dir."""

from pathlib import Path

from vllm_gds.errors import GdsError
from vllm_gds.loader.report import format_reports, read_reports

HELP = "print the per-rank load reports written by --load-format gds"


def add_arguments(parser) -> None:
    parser.add_argument("report_dir", type=Path, help='the "report_dir" given to --model-loader-extra-config')


def run(args) -> int:
    reports = read_reports(args.report_dir)
    if not reports:
        raise GdsError(f"{args.report_dir} holds no load-report-rank-*.json files; serve with "
                       '--model-loader-extra-config \'{"report_dir": "DIR"}\' to write them')
    print(format_reports(reports))
    return 0
