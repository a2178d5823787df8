"""How numbers are shown to users: one rounding for a rate, one rule for plurals.

The load's log line, `vllm-gds report` and `vllm-gds inspect` all go through
these, so the same load never shows two different speeds.
"""


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def format_gb_per_s(nbytes: int, seconds: float) -> str:
    """A rate from the raw bytes and seconds (never from an already rounded rate)."""
    return f"{gb_per_s(nbytes, seconds):.2f}"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """'1 rank', '2 ranks', '0 files'."""
    return f"{count} {singular if count == 1 else (plural_form or singular + 's')}"
