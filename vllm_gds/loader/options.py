"""The loader's settings, from ``--model-loader-extra-config '{...}'``."""

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vllm_gds.errors import GdsError
from vllm_gds.io.reader import ReadOptions


@dataclass(frozen=True)
class LoaderOptions:
    read: ReadOptions
    verify_checksums: bool = True
    report_dir: Path | None = None  # each rank writes load-report-rank-<r>.json here

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> "LoaderOptions":
        extra = dict(extra or {})
        # "gds" is the user's name for ReadOptions.policy: auto | require | off.
        tuning_keys = {f.name for f in fields(ReadOptions)} - {"policy"}
        allowed = tuning_keys | {"gds", "verify_checksums", "report_dir"}
        unknown = set(extra) - allowed
        if unknown:
            raise GdsError(
                f"--model-loader-extra-config has unknown keys {sorted(unknown)} for "
                f"--load-format gds; allowed: {sorted(allowed)}"
            )
        read_args = {k: extra[k] for k in tuning_keys & set(extra)}
        if "gds" in extra:
            read_args["policy"] = extra["gds"]
        verify = extra.get("verify_checksums", True)
        if not isinstance(verify, bool):
            raise GdsError(f"verify_checksums must be true or false, not {verify!r}")
        report_dir = extra.get("report_dir")
        try:
            read = ReadOptions(**read_args)
        except TypeError as e:
            raise GdsError(f"--model-loader-extra-config: {e}") from None
        return cls(read=read, verify_checksums=verify, report_dir=Path(report_dir) if report_dir else None)
