"""What kind of disk holds a path, read from /sys/block (no privileges needed).

GDS reads ext4/xfs files by DMA only from NVMe (local or over fabrics); a
virtio-blk disk of a virtual machine or a SCSI/SATA disk is not one, whatever
its file system.
"""

import os
from dataclasses import dataclass
from pathlib import Path

SYS_DEV_BLOCK = Path("/sys/dev/block")


@dataclass(frozen=True)
class BlockDevice:
    name: str  # the whole disk: vda, nvme0n1, sda, dm-0
    kind: str  # nvme | virtio | scsi | device-mapper | md | unknown
    model: str = ""
    transport: str = ""  # NVMe: pcie, rdma, tcp, fc
    rotational: bool | None = None

    def describe(self) -> str:
        extra = ", ".join(x for x in (self.model, self.transport and f"transport {self.transport}") if x)
        extra = f" ({extra})" if extra else ""
        if self.kind == "nvme":
            where = "NVMe over fabrics" if self.transport in ("rdma", "tcp", "fc") else "local NVMe"
            return f"{where} /dev/{self.name}{extra}"
        if self.kind == "virtio":
            return f"virtio disk /dev/{self.name} (a virtual machine's disk, not NVMe){extra}"
        if self.kind == "scsi":
            spin = {True: "spinning", False: "solid-state"}.get(self.rotational, "")
            return f"SCSI/SATA {spin + ' ' if spin else ''}disk /dev/{self.name}{extra}"
        if self.kind in ("device-mapper", "md"):
            return f"{self.kind} volume /dev/{self.name}{extra}"
        return f"local disk /dev/{self.name}{extra}"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _kind(disk: Path) -> str:
    name = disk.name
    if name.startswith("dm-"):
        return "device-mapper"
    if name.startswith("md"):
        return "md"
    for link in ("device/driver", "device/subsystem", "device/device/driver"):
        target = os.path.basename(os.path.realpath(disk / link)) if (disk / link).exists() else ""
        if target.startswith("nvme"):
            return "nvme"
        if target.startswith("virtio"):
            return "virtio"
        if target in ("sd", "scsi"):
            return "scsi"
    return "nvme" if name.startswith("nvme") else "unknown"


def block_device_of(path: str | os.PathLike) -> BlockDevice | None:
    """The disk under ``path``'s file system; None for tmpfs, overlay, network file systems."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    node = SYS_DEV_BLOCK / f"{os.major(dev)}:{os.minor(dev)}"
    if not node.exists():
        return None
    disk = Path(os.path.realpath(node))
    if (disk / "partition").exists():  # a partition: the disk is its parent
        disk = disk.parent
    rotational = _read(disk / "queue" / "rotational")
    return BlockDevice(
        name=disk.name, kind=_kind(disk), model=" ".join(_read(disk / "device" / "model").split()),
        transport=_read(disk / "device" / "transport"),
        rotational=None if rotational == "" else rotational == "1",
    )
