"""The `vllm-gds` command: prepare | inspect | report | doctor | calibrate | kv-plan."""

import argparse
import importlib
import sys

from vllm_gds.errors import GdsError
from vllm_gds.interrupt import Interrupted

# subcommand -> (module, add-arguments function, run function, help)
SUBCOMMANDS = {
    "prepare": ("vllm_gds.cli_prepare", "add_prepare_arguments", "run_prepare",
                "shard a model once per parallel layout for --load-format gds"),
    "inspect": ("vllm_gds.inspect", "add_inspect_arguments", "run_inspect",
                "summarize a prepared directory and check that it is intact"),
    "report": ("vllm_gds.cli_report", "add_report_arguments", "run_report",
               "print the per-rank load reports written by --load-format gds"),
    "doctor": ("vllm_gds.doctor", "add_doctor_arguments", "run_doctor",
               "say whether this node can use GPUDirect Storage for a path, and how to fix it"),
    "calibrate": ("vllm_gds.kvcache.calibration", "add_calibrate_arguments", "run_calibrate",
                  "write the KV cache calibration file beside a model"),
    "kv-plan": ("vllm_gds.kvcache.kv_plan", "add_kv_plan_arguments", "run_kv_plan",
                "how many tokens and sequences fit per KV cache dtype"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="vllm-gds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (module_name, add_name, run_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, add_name)(sub_parser)
        runners[name] = getattr(module, run_name)
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    except GdsError as e:
        print(f"vllm-gds {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"vllm-gds {args.command}: interrupted by {e.signal_name}"
              + (f": {e.what}" if e.what else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a Ctrl-C outside the steps that convert it
        print(f"vllm-gds {args.command}: interrupted by SIGINT", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
