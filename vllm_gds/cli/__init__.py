"""The `vllm-gds` command: prepare | inspect | report | doctor | calibrate | kv-plan.

One module per subcommand under vllm_gds/cli/, each with ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> exit code``.
"""

import argparse
import importlib
import sys

from vllm_gds.errors import EXIT_UNREADABLE, GdsError, os_error_message
from vllm_gds.interrupt import Interrupted

# subcommand -> its module
SUBCOMMANDS = {
    "prepare": "vllm_gds.cli.prepare",
    "inspect": "vllm_gds.cli.inspect_prepared",
    "report": "vllm_gds.cli.report",
    "doctor": "vllm_gds.cli.doctor",
    "calibrate": "vllm_gds.cli.calibrate",
    "kv-plan": "vllm_gds.cli.kv_plan",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="vllm-gds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
        runners[name] = module.run
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    except GdsError as e:
        print(f"vllm-gds {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the operating system refused a path no check above named
        print(f"vllm-gds {args.command}: error: {os_error_message(e.filename or '?', e, 'use')}", file=sys.stderr)
        return EXIT_UNREADABLE
    except Interrupted as e:
        print(f"vllm-gds {args.command}: interrupted by {e.signal_name}"
              + (f": {e.what}" if e.what else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a Ctrl-C outside the steps that convert it
        print(f"vllm-gds {args.command}: interrupted by SIGINT", file=sys.stderr)
        return 130
