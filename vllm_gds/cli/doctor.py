"""`vllm-gds doctor [PATH]`: would this node read PATH with GPUDirect Storage, and if not, why.

Stage 0 of a cold start. Checks, in the order a fix would be made: visible
GPUs, the nvidia-fs kernel module, cuFile's config (cufile.json and its
``allow_compat_mode``), kvikio and its compat mode, the file system under PATH,
an O_DIRECT read of one of its files, the alignment of its tensors, and, only
when everything before it passed, cuFile's own view through kvikio (asking it
opens the driver, which makes a CUDA context). Prints a verdict and the fixes;
exits 0 only when GDS would be used.
"""

import argparse
import json
import mmap
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_gds.io import gds_env

HELP = "say whether this node can use GPUDirect Storage for a path, and how to fix it"
OK, FAIL, WARN, SKIP = "ok", "no", "warn", "--"


@dataclass
class Check:
    name: str
    status: str  # OK, FAIL, WARN or SKIP
    detail: str
    fix: str = ""


@dataclass
class Diagnosis:
    path: str
    checks: list[Check] = field(default_factory=list)

    @property
    def gds(self) -> bool:
        return all(c.status in (OK, WARN, SKIP) for c in self.checks) and any(
            c.name == "cuFile driver" and c.status == OK for c in self.checks
        )

    def add(self, *args, **kw) -> Check:
        check = Check(*args, **kw)
        self.checks.append(check)
        return check


def _sample_files(path: Path, limit: int = 4) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    found = sorted(path.glob("*.safetensors"))
    if not found:
        found = sorted(p for p in path.iterdir() if p.is_file() and p.stat().st_size >= 4096)
    return found[:limit]


def _o_direct_read(path: Path) -> str | None:
    """None when a 4 KiB O_DIRECT read of ``path`` works, else why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        return f"open with O_DIRECT failed: {e.strerror}"
    try:
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        try:
            os.preadv(fd, [buf], 0)
        finally:
            buf.close()
    except OSError as e:
        return f"O_DIRECT read failed: {e.strerror}"
    finally:
        os.close(fd)
    return None


def _alignment(files: list[Path]) -> tuple[int, int]:
    """(tensors at 4 KiB-aligned offsets, tensors) over the safetensors files given."""
    from vllm_gds.shards.safetensors_layout import tensor_placements

    aligned = total = 0
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            placed = tensor_placements(f)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        total += len(placed)
        aligned += sum(1 for p in placed if p.offset % 4096 == 0)
    return aligned, total


def diagnose(path: str | os.PathLike = ".", *, query_driver: bool = True) -> Diagnosis:
    target = Path(path)
    d = Diagnosis(path=str(target))

    gpus = gds_env.visible_gpus()
    if gpus:
        d.add("GPUs", OK, f"{len(gpus)} visible ({', '.join(gpus[:8])}{'...' if len(gpus) > 8 else ''})")
    else:
        d.add("GPUs", FAIL, "no NVIDIA GPU is visible (no /proc/driver/nvidia/gpus, or CUDA_VISIBLE_DEVICES hides them)",
              "run on a GPU node with the NVIDIA driver loaded, and check CUDA_VISIBLE_DEVICES")

    if gds_env.nvidia_fs_loaded():
        version = gds_env.nvidia_fs_version()
        d.add("nvidia-fs", OK, "kernel module loaded" + (f" ({version.splitlines()[0]})" if version else ""))
    else:
        d.add("nvidia-fs", FAIL, "the nvidia-fs kernel module is not loaded (no /proc/driver/nvidia-fs, not in lsmod): "
              "cuFile can only run in compatibility mode",
              "install NVIDIA's GDS package (nvidia-gds, matching the driver) and `modprobe nvidia_fs`; on AWS, "
              "the Deep Learning AMIs ship it; in Kubernetes, the GPU operator's `gds.enabled=true`")

    config = gds_env.read_cufile_json()
    if not config.exists:
        d.add("cufile.json", WARN, f"{config.path} does not exist: cuFile uses its defaults (compat mode allowed, "
              "so a file it cannot serve with GDS is read through a bounce buffer without a word)",
              f"write {config.path} (or point CUFILE_ENV_PATH_JSON at one) with "
              '"properties": {"allow_compat_mode": false} to make such files fail instead')
    elif config.error:
        d.add("cufile.json", FAIL, f"{config.path} does not parse: {config.error}",
              f"fix the JSON in {config.path}")
    elif config.allow_compat_mode:
        d.add("cufile.json", WARN, f"{config.path}: properties.allow_compat_mode is true (cuFile may fall back "
              "silently per file; gds policy 'require' refuses this)",
              f'set "allow_compat_mode": false under "properties" in {config.path}')
    else:
        d.add("cufile.json", OK, f"{config.path}: allow_compat_mode false")

    try:
        import kvikio  # noqa: F401

        compat = gds_env.kvikio_compat_env()
        if compat == "ON":
            d.add("kvikio", FAIL, "KVIKIO_COMPAT_MODE=ON forces kvikio's POSIX path", "unset KVIKIO_COMPAT_MODE")
        else:
            d.add("kvikio", OK, f"kvikio {getattr(kvikio, '__version__', '?')}, KVIKIO_COMPAT_MODE={compat}")
    except ImportError as e:
        d.add("kvikio", FAIL, f"kvikio is not importable ({e})", "pip install 'vllm-gds[gpu]' (kvikio-cu13)")

    files: list[Path] = []
    if not target.exists():
        d.add("path", FAIL, f"{target} does not exist", "give the model directory the server will load")
    else:
        mount = gds_env.mount_of(target)
        fstype = mount.fstype if mount else "?"
        where = f"{target} is on {fstype}" + (f" ({mount.source} at {mount.point})" if mount else "")
        if fstype in ("nfs", "nfs4") and "rdma" not in (mount.options if mount else ""):
            d.add("file system", FAIL, where + " over TCP: GDS needs NFS over RDMA",
                  "mount with proto=rdma (and a GDS-capable NFS client), or copy the model to local NVMe or Lustre")
        elif fstype in gds_env.GDS_FILESYSTEMS:
            d.add("file system", OK, where + f": {gds_env.GDS_FILESYSTEMS[fstype]}")
        else:
            d.add("file system", FAIL, where + ": cuFile has no GDS path for it (tmpfs, overlay and FUSE "
                  "file systems are read through compat mode)",
                  "put the model on a GDS-capable file system: local NVMe (ext4/xfs), FSx for Lustre or "
                  "Lustre with a GDS-enabled client, NFS over RDMA, WekaFS, GPFS, BeeGFS")
        files = _sample_files(target)
        if not files:
            d.add("O_DIRECT", SKIP, f"no file under {target} to try")
        else:
            why = _o_direct_read(files[0])
            if why is None:
                d.add("O_DIRECT", OK, f"4 KiB O_DIRECT read of {files[0].name} works")
            else:
                d.add("O_DIRECT", FAIL, f"{files[0]}: {why}",
                      "GDS reads need O_DIRECT: use a file system that supports it (not tmpfs before Linux 6.6)")
        aligned, total = _alignment(files)
        if total:
            if aligned == total:
                d.add("alignment", OK, f"all {total} tensors sampled start at 4 KiB-aligned offsets")
            else:
                d.add("alignment", WARN, f"{total - aligned} of {total} tensors sampled are not 4 KiB-aligned: "
                      "cuFile reads their unaligned edges through a bounce buffer",
                      "prepare the model with `vllm-gds prepare` (aligned shards per rank)")

    blocked = [c for c in d.checks if c.status == FAIL]
    if blocked or not query_driver:
        d.add("cuFile driver", SKIP, "not asked: " + ("the checks above already rule GDS out" if blocked
                                                      else "driver query disabled"))
    else:
        view = gds_env.kvikio_driver_view()
        if "error" in view:
            d.add("cuFile driver", FAIL, f"kvikio could not query cuFile: {view['error']}",
                  "see cufile.log in the working directory, and run /usr/local/cuda/gds/tools/gdscheck -p")
        elif not view.get("is_gds_available") or view.get("compat_mode_preferred"):
            d.add("cuFile driver", FAIL, f"cuFile reports is_gds_available={view.get('is_gds_available')}, "
                  f"kvikio prefers compat mode={view.get('compat_mode_preferred')}",
                  "run /usr/local/cuda/gds/tools/gdscheck -p and read cufile.log")
        else:
            d.add("cuFile driver", OK, "cuFile reports GDS available; kvikio will use it"
                  + (" (allow_compat_mode still true)" if view.get("allow_compat_mode") else ""))
    return d


def format_diagnosis(d: Diagnosis) -> str:
    width = max(len(c.name) for c in d.checks)
    lines = [f"vllm-gds doctor: {d.path}", ""]
    for c in d.checks:
        lines.append(f"  [{c.status:>4}] {c.name.ljust(width)}  {c.detail}")
    lines.append("")
    if d.gds:
        lines.append("Verdict: GDS WOULD BE USED: --load-format gds reads this path straight into GPU memory.")
        warns = [c for c in d.checks if c.status == WARN]
        if warns:
            lines.append("To make it certain (gds policy 'require'):")
            lines += [f"  - {c.fix}" for c in warns if c.fix]
    else:
        lines.append("Verdict: GDS WOULD NOT BE USED: --load-format gds still works, through its pinned-buffer "
                     "compatibility path (the load report says 'compat').")
        lines.append("To use GDS, fix in this order:")
        lines += [f"  - {c.name}: {c.fix}" for c in d.checks if c.status == FAIL and c.fix]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("path", nargs="?", default=".", help="the model directory (or a file) to be loaded")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--no-driver", action="store_true",
                        help="do not ask the cuFile driver (it creates a CUDA context)")
    return parser


def run(args: argparse.Namespace) -> int:
    d = diagnose(args.path, query_driver=not getattr(args, "no_driver", False))
    if getattr(args, "json", False):
        print(json.dumps({"path": d.path, "gds": d.gds, "checks": [asdict(c) for c in d.checks]}, indent=1))
    else:
        print(format_diagnosis(d))
    return 0 if d.gds else 1
