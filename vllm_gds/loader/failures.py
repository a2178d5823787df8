"""A load failure, said once more where the user looks last.

The loader fails in a worker process. vLLM then prints the worker's traceback, the engine core's,
and last process 0's, which ends "Engine core initialization failed. See root cause above": the
message that names the file and the fix is some 120 lines up. So the loader logs the message at
ERROR level, records it in the run's directory (vllm_gds.run_dir), and process 0 prints every
recorded message again when it exits, after those tracebacks.
"""

import json
import os
import sys
from pathlib import Path

from vllm_gds import run_dir


def record(message: str, rank: int | None) -> None:
    """Keep a worker's load failure for process 0 (nothing where no run directory exists)."""
    directory = run_dir.current()
    if directory is None:
        return
    path = directory / f"load-failure-{os.getpid()}.json"
    path.write_text(json.dumps({"rank": rank, "message": message}) + "\n")


def recorded(directory: Path) -> list[tuple[list[int | None], str]]:
    """The distinct messages recorded in ``directory``, each with the ranks that gave it."""
    by_message: dict[str, list[int | None]] = {}
    for path in sorted(directory.glob("load-failure-*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        by_message.setdefault(entry["message"], []).append(entry["rank"])
    return [(sorted(ranks, key=lambda r: -1 if r is None else r), message)
            for message, ranks in by_message.items()]


def summary(failures: list[tuple[list[int | None], str]]) -> str:
    lines = []
    for ranks, message in failures:
        known = [r for r in ranks if r is not None]
        who = (f"rank {known[0]}" if len(known) == 1 else
               f"ranks {', '.join(map(str, known))}" if known else "the loader")
        lines.append(f"vllm-gds: {who} could not load the model: {message}")
    return "\n".join(lines)


def print_recorded(directory: Path) -> None:
    """At process 0's exit: print the recorded failures last, on stderr."""
    failures = recorded(directory) if directory.is_dir() else []
    if not failures:
        return
    sys.stdout.flush()
    sys.stderr.write("\n" + summary(failures) + "\n")
    sys.stderr.flush()
