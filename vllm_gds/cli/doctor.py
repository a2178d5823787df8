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

from vllm_gds.io import gds_checklist, gds_env
from vllm_gds.io.block_device import block_device_of
from vllm_gds.io.gds_checklist import FAIL, OK, SKIP, WARN, Check

HELP = "say whether this node can use GPUDirect Storage for a path, and how to fix it"


@dataclass
class Diagnosis:
    path: str
    checks: list[Check] = field(default_factory=list)

    @property
    def gds(self) -> bool:
        return all(c.status in (OK, WARN, SKIP) for c in self.checks) and any(
            c.name == "cuFile driver" and c.status in (OK, WARN) for c in self.checks
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


def _kvikio_check(target: Path, compat: Check) -> Check:
    """kvikio importable, its compat mode not forced ON, and a real small read through it works."""
    try:
        import kvikio
    except ImportError as e:
        return Check("kvikio", FAIL, f"kvikio is not importable ({e})", "pip install 'vllm-gds[gpu]' (kvikio-cu13)")
    if compat.status != OK:
        return Check("kvikio", compat.status, compat.detail, compat.fix)
    from vllm_gds.io.kvikio_probe import PROBE_BYTES, kvikio_read_problem

    version = f"kvikio {getattr(kvikio, '__version__', '?')}, {compat.detail}"
    problem = kvikio_read_problem(target if target.exists() else Path("."))
    if problem is not None:
        from vllm_gds.io.cuda_driver import missing_driver_message

        fix = ("see the message: " + missing_driver_message()) if "libcuda" in problem else \
            "reinstall kvikio-cu13 and libkvikio-cu13 of the same version"
        return Check("kvikio", FAIL, f"{version}, but a read of {PROBE_BYTES} bytes through it failed: {problem}", fix)
    return Check("kvikio", OK, f"{version}; a read of {PROBE_BYTES} bytes through it into host memory is byte-exact")


def _file_system_detail(target: Path, mount, fstype: str):
    where = f"{target} is on {fstype}" + (f" ({mount.source} at {mount.point})" if mount else "")
    device = block_device_of(target)
    return where + (f", {device.describe()}" if device else ""), device


def _report_mode(d: "Diagnosis") -> str:
    """What the load report's path column will say when GDS is not used, on this platform."""
    gpus = next((c for c in d.checks if c.name == "GPUs"), None)
    return "host" if gpus is not None and gpus.status != OK else "compat"


def diagnose(path: str | os.PathLike = ".", *, query_driver: bool = True) -> Diagnosis:
    target = Path(path)
    d = Diagnosis(path=str(target))

    gpus = gds_env.visible_gpus()
    if gpus:
        d.add("GPUs", OK, f"{len(gpus)} visible ({', '.join(gpus[:8])}{'...' if len(gpus) > 8 else ''})")
    else:
        d.add("GPUs", FAIL, "no NVIDIA GPU is visible (no /proc/driver/nvidia/gpus, or CUDA_VISIBLE_DEVICES hides them)",
              "run on a GPU node with the NVIDIA driver loaded, and check CUDA_VISIBLE_DEVICES")

    node = gds_checklist.node_checks()  # nvidia-fs, cufile.json, kvikio compat mode: the reader's list too
    d.checks += node[:2]
    d.checks.append(_kvikio_check(target, node[2]))

    files: list[Path] = []
    if not target.exists():
        d.add("path", FAIL, f"{target} does not exist", "give the model directory the server will load")
    else:
        mount = gds_env.mount_of(target)
        fstype = mount.fstype if mount else "?"
        where, device = _file_system_detail(target, mount, fstype)
        if fstype in ("nfs", "nfs4") and "rdma" not in (mount.options if mount else ""):
            d.add("file system", FAIL, where + " over TCP: GDS needs NFS over RDMA",
                  "mount with proto=rdma (and a GDS-capable NFS client), or copy the model to local NVMe or Lustre")
        elif fstype in ("ext4", "xfs") and device is not None and device.kind in ("virtio", "scsi"):
            d.add("file system", FAIL, where + f": cuFile reads {fstype} with GDS only from NVMe (local or over "
                  "fabrics), so this disk is read through compat mode",
                  f"put the model on an NVMe drive with {fstype} (or FSx for Lustre, NFS over RDMA, WekaFS, "
                  "GPFS, BeeGFS with their GDS-enabled clients)")
        elif fstype in gds_env.GDS_FILESYSTEMS:
            d.add("file system", OK if device is None or device.kind == "nvme" else WARN,
                  where + f": {gds_env.GDS_FILESYSTEMS[fstype]}")
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
        d.checks.append(gds_checklist.driver_check(gds_env.kvikio_driver_view()))
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
        if _report_mode(d) == "host":
            lines.append("Verdict: GDS WOULD NOT BE USED: no GPU is visible, so vLLM runs on its CPU platform and "
                         "--load-format gds reads into host memory through kvikio (the load report says 'host').")
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
