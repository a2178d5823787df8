"""What a load did, per rank: one log line, and the same as JSON where the user asks for it."""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_gds.units import format_gb_per_s, gb_per_s, plural


@dataclass
class LoadReport:
    model: str
    source: str  # "prepared" (vllm-gds shards) or "huggingface" (plain safetensors)
    rank: int
    tp_rank: int
    pp_rank: int
    mode: str  # gds | compat | host
    files: int
    tensors: int
    nbytes: int
    read_seconds: float
    checksums_verified: bool
    verify_seconds: float
    total_seconds: float
    # How the reads ran, as the reader chose them from the machine (vllm_gds.io.engine_choice).
    engine: str = ""
    threads: int = 0
    task_size: int = 0
    pinned_bytes: int = 0  # pinned host memory the reads held (kvikio's bounce buffers, the ring)
    choice: str = ""  # why these threads and sizes
    resident_fraction: float | None = None  # share of the files' pages in memory before reading
    direct_io: bool = False  # read around the page cache (O_DIRECT): cold files on a local disk
    # The staged engine with the page pinner: bytes copied through the ring, bytes the GPU copied in
    # place from pinned page-cache pages, and the pinner's own rate (its bytes over its time).
    ring_bytes: int = 0
    page_pinned_bytes: int = 0
    pinner_gb_per_s: float = 0.0
    pin_refused: str = ""  # a registration the driver refused: the rest went through the ring

    @staticmethod
    def engine_fields(detail: dict) -> dict:
        """The report's engine fields from a ReadStats.detail."""
        return {"engine": str(detail.get("engine", "")), "threads": int(detail.get("threads", 0)),
                "task_size": int(detail.get("task_size", 0)), "pinned_bytes": int(detail.get("pinned_bytes", 0)),
                "choice": str(detail.get("choice", "")), "resident_fraction": detail.get("resident_fraction"),
                "direct_io": bool(detail.get("direct_io", False)), "ring_bytes": int(detail.get("ring_bytes", 0)),
                "page_pinned_bytes": int(detail.get("pin_bytes", 0)),
                "pinner_gb_per_s": round(float(detail.get("pin_gb_per_s", 0.0)), 3),
                "pin_refused": str(detail.get("pin_refused", ""))}

    @property
    def warmth(self) -> str:
        if self.resident_fraction is None:
            return "page cache not measured"
        kind = "warm" if self.resident_fraction >= 0.9 else "cold" if self.resident_fraction <= 0.1 else "partly warm"
        return f"{kind}: {self.resident_fraction:.0%} of the files' pages were in memory before reading"

    @property
    def gb_per_s(self) -> float:
        return gb_per_s(self.nbytes, self.read_seconds)

    def log_line(self) -> str:
        verified = (
            f"checksums verified ({self.verify_seconds:.2f} s after the last byte landed)"
            if self.checksums_verified else "checksums not verified"
        )
        return (
            f"vllm-gds rank {self.rank} (tp {self.tp_rank}, pp {self.pp_rank}): read {self.nbytes / 1e9:.3f} GB "
            f"of {self.source} weights from {plural(self.files, 'file')} via {self.mode} in {self.read_seconds:.2f} s "
            f"({format_gb_per_s(self.nbytes, self.read_seconds)} GB/s); {verified}; "
            f"{plural(self.tensors, 'tensor')} installed; "
            f"load took {self.total_seconds:.2f} s; {self.warmth}"
            + (f"; {self.engine} engine, {self.threads} threads x {self.task_size >> 10} KiB tasks"
               + (", O_DIRECT" if self.direct_io else "")
               + f", {self.pinned_bytes >> 20} MiB pinned ({self.choice})" if self.engine else "")
            + (f"; page pinner: {self.page_pinned_bytes / 1e9:.3f} GB copied in place from the page cache at "
               f"{self.pinner_gb_per_s:.1f} GB/s, {self.ring_bytes / 1e9:.3f} GB through the ring"
               + (f" ({self.pin_refused})" if self.pin_refused else "") if self.page_pinned_bytes else "")
        )

    def to_json(self) -> dict:
        return {**asdict(self), "gb_per_s": round(self.gb_per_s, 3)}

    def write(self, report_dir: Path) -> Path:
        report_dir.mkdir(parents=True, exist_ok=True)
        path = report_dir / f"load-report-rank-{self.rank}.json"
        partial = path.with_name(f".{path.name}.{os.getpid()}")  # readers never see half a file
        partial.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(partial, path)
        return path


def read_reports(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("load-report-rank-*.json"))]


def format_reports(reports: list[dict]) -> str:
    """A table of per-rank reports, with the aggregate (bytes over the slowest rank's time)."""
    rows = [("rank", "source", "path", "files", "GB", "seconds", "GB/s", "checksums", "in page cache", "threads x task")]
    for r in reports:
        rows.append((
            str(r["rank"]), r["source"], r["mode"], str(r["files"]), f"{r['nbytes'] / 1e9:.3f}",
            f"{r['read_seconds']:.2f}", format_gb_per_s(r["nbytes"], r["read_seconds"]),
            "verified" if r["checksums_verified"] else "off",
            "?" if r.get("resident_fraction") is None else f"{r['resident_fraction']:.0%}",
            f"{r['threads']} x {r['task_size'] >> 20} MiB" if r.get("threads") else "",
        ))
    if len(reports) > 1:
        total = sum(r["nbytes"] for r in reports)
        slowest = max(r["read_seconds"] for r in reports)
        rows.append(("all", "", "", str(sum(r["files"] for r in reports)), f"{total / 1e9:.3f}",
                     f"{slowest:.2f}", format_gb_per_s(total, slowest), "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
