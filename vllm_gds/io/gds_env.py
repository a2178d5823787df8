"""What this node offers GPUDirect Storage, read without creating a CUDA context.

Shared by the reader (policy ``require``) and ``vllm-gds doctor``, through the one
checklist in :mod:`vllm_gds.io.gds_checklist`. Nothing here
opens the cuFile driver: that creates CUDA contexts on every visible GPU, so
callers do it only after setting their device, and only where nvidia-fs exists.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CUFILE_JSON = "/etc/cufile.json"

# File systems cuFile can read with GDS (given the vendor's GDS-enabled client or
# driver); everything else (tmpfs, overlay, ...) always goes through compat mode.
GDS_FILESYSTEMS = {
    "ext4": "ext4 (data=ordered), which GDS reads from NVMe drives",
    "xfs": "xfs, which GDS reads from NVMe drives",
    "lustre": "Lustre with a GDS-enabled client (FSx for Lustre with EFA, DDN EXAScaler)",
    "nfs": "NFS over RDMA (mount with proto=rdma)",
    "nfs4": "NFS over RDMA (mount with proto=rdma)",
    "wekafs": "WekaFS",
    "gpfs": "IBM Storage Scale (GPFS)",
    "beegfs": "BeeGFS",
    "vast": "VAST (NFS over RDMA)",
}


def nvidia_fs_loaded() -> bool:
    """The nvidia-fs kernel module (GDS's kernel half) is loaded."""
    if Path("/proc/driver/nvidia-fs").exists():
        return True
    try:
        modules = Path("/proc/modules").read_text()
    except OSError:
        return False
    return any(line.split(" ", 1)[0] == "nvidia_fs" for line in modules.splitlines())


def nvidia_fs_version() -> str | None:
    try:
        return Path("/proc/driver/nvidia-fs/version").read_text().strip() or None
    except OSError:
        return None


def cufile_json_path() -> Path:
    return Path(os.environ.get("CUFILE_ENV_PATH_JSON") or DEFAULT_CUFILE_JSON)


def _strip_comments(text: str) -> str:
    # cufile.json carries // comments (NVIDIA's sample does); drop them outside strings.
    out = []
    for line in text.splitlines():
        in_string = False
        cut = len(line)
        i = 0
        while i < len(line) - 1:
            c = line[i]
            if c == '"' and (i == 0 or line[i - 1] != "\\"):
                in_string = not in_string
            elif not in_string and c == "/" and line[i + 1] == "/":
                cut = i
                break
            i += 1
        out.append(line[:cut])
    return re.sub(r",(\s*[}\]])", r"\1", "\n".join(out))  # trailing commas too


@dataclass(frozen=True)
class CufileConfig:
    path: Path
    exists: bool
    error: str | None = None
    allow_compat_mode: bool = True  # cuFile's default when the key is absent
    raw: dict | None = None


def read_cufile_json() -> CufileConfig:
    path = cufile_json_path()
    if not path.is_file():
        return CufileConfig(path=path, exists=False)
    try:
        raw = json.loads(_strip_comments(path.read_text()))
    except (OSError, ValueError) as e:
        return CufileConfig(path=path, exists=True, error=str(e))
    props = raw.get("properties", {}) if isinstance(raw, dict) else {}
    allow = props.get("allow_compat_mode", True)
    return CufileConfig(path=path, exists=True, allow_compat_mode=bool(allow), raw=raw)


def kvikio_compat_env() -> str:
    """KVIKIO_COMPAT_MODE as kvikio reads it: ON, OFF or AUTO (the default)."""
    value = os.environ.get("KVIKIO_COMPAT_MODE", "AUTO").strip().upper()
    return {"TRUE": "ON", "YES": "ON", "1": "ON", "FALSE": "OFF", "NO": "OFF", "0": "OFF"}.get(value, value)


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(mount point, fs type, source, super options) for every mount."""
    mounts = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        point = fields[4].encode().decode("unicode_escape")
        mounts.append((point, rest[0], rest[1], rest[2] if len(rest) > 2 else ""))
    return mounts


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str
    options: str


def mount_of(path: str | os.PathLike) -> Mount | None:
    """The mount that holds ``path`` (the longest mount point that is a prefix of it)."""
    real = os.path.realpath(path)
    best = None
    for point, fstype, source, options in _mountinfo():
        if real == point or real.startswith(point.rstrip("/") + "/") or point == "/":
            if best is None or len(point) >= len(best.point):
                best = Mount(point, fstype, source, options)
    return best


def visible_gpus() -> list[str]:
    """GPUs the driver exposes here, filtered by CUDA_VISIBLE_DEVICES; no CUDA context is made."""
    root = Path("/proc/driver/nvidia/gpus")
    try:
        gpus = sorted(p.name for p in root.iterdir())
    except OSError:
        gpus = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        if not wanted or wanted[0] in ("-1", "none", "NoDevFiles"):
            return []
        numeric = [w for w in wanted if w.isdigit()]
        if len(numeric) == len(wanted):
            return [gpus[int(w)] for w in numeric if int(w) < len(gpus)]
        return wanted  # UUIDs or MIG names: trust them
    return gpus


def kvikio_driver_view(device=None) -> dict:
    """kvikio's view of the cuFile driver. Opens the driver: call after setting the device.

    Returns is_gds_available, allow_compat_mode (as cuFile parsed its config) and
    compat_mode_preferred (kvikio would read through its POSIX path); an "error"
    key where kvikio or the driver could not be asked.
    """
    view: dict = {}
    try:
        import kvikio
        import kvikio.cufile_driver
        import kvikio.defaults
    except ImportError as e:
        return {"error": f"kvikio is not importable ({e})"}
    if device is not None:
        import torch

        torch.cuda.set_device(device)
    try:
        view["compat_mode_preferred"] = bool(kvikio.defaults.is_compat_mode_preferred())
        view["is_gds_available"] = bool(kvikio.cufile_driver.get("is_gds_available"))
        view["allow_compat_mode"] = bool(kvikio.cufile_driver.get("allow_compat_mode"))
    except Exception as e:  # the driver's errors come as RuntimeError or its own types
        view["error"] = f"{type(e).__name__}: {e}"
    return view
