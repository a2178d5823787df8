"""The one GPUDirect Storage checklist: read by the reader (policy ``require``) and by ``doctor``.

Each item is a Check with a status: OK; FAIL (GDS will not be used); WARN (GDS
would be used under policy ``auto``, but a file could fall back to compat mode
silently, which policy ``require`` refuses). The reader turns every item that is
not OK into a problem; ``doctor`` prints them all, with the node- and path-specific
checks it adds around them.
"""

from dataclasses import dataclass

from vllm_gds.io import gds_env

OK, FAIL, WARN, SKIP = "ok", "no", "warn", "--"


@dataclass
class Check:
    name: str
    status: str  # OK, FAIL, WARN or SKIP
    detail: str
    fix: str = ""


def nvidia_fs_check() -> Check:
    if gds_env.nvidia_fs_loaded():
        version = gds_env.nvidia_fs_version()
        return Check("nvidia-fs", OK, "kernel module loaded" + (f" ({version.splitlines()[0]})" if version else ""))
    return Check("nvidia-fs", FAIL,
                 "the nvidia-fs kernel module (GDS's kernel half) is not loaded (no /proc/driver/nvidia-fs, "
                 "not in lsmod): every read goes through compatibility mode",
                 "install NVIDIA's GDS package (nvidia-gds, matching the driver) and `modprobe nvidia_fs`; on AWS, "
                 "the Deep Learning AMIs ship it; in Kubernetes, the GPU operator's `gds.enabled=true`")


def cufile_json_check() -> Check:
    config = gds_env.read_cufile_json()
    if not config.exists:
        return Check("cufile.json", WARN, f"{config.path} does not exist: cuFile uses its defaults (compat mode "
                     "allowed, so a file it cannot serve with GDS is read through a bounce buffer without a word)",
                     f"write {config.path} (or point CUFILE_ENV_PATH_JSON at one) with "
                     '"properties": {"allow_compat_mode": false} to make such files fail instead')
    if config.error:
        return Check("cufile.json", FAIL, f"{config.path} does not parse: {config.error}",
                     f"fix the JSON in {config.path}")
    if config.allow_compat_mode:
        return Check("cufile.json", WARN, f"{config.path}: properties.allow_compat_mode is true (cuFile may fall "
                     "back silently per file; gds policy 'require' refuses this)",
                     f'set "allow_compat_mode": false under "properties" in {config.path}')
    return Check("cufile.json", OK, f"{config.path}: allow_compat_mode false")


def kvikio_compat_check() -> Check:
    compat = gds_env.kvikio_compat_env()
    if compat == "ON":
        return Check("kvikio compat", FAIL, "KVIKIO_COMPAT_MODE=ON forces kvikio's POSIX path",
                     "unset KVIKIO_COMPAT_MODE")
    return Check("kvikio compat", OK, f"KVIKIO_COMPAT_MODE={compat}")


def node_checks() -> list[Check]:
    """What GDS needs of the node, read without opening the cuFile driver."""
    return [nvidia_fs_check(), cufile_json_check(), kvikio_compat_check()]


def driver_check(view: dict) -> Check:
    """cuFile's own view through kvikio (gds_env.kvikio_driver_view: it opens the driver)."""
    if "error" in view:
        return Check("cuFile driver", FAIL, f"kvikio could not query the cuFile driver: {view['error']}",
                     "see cufile.log in the working directory, and run /usr/local/cuda/gds/tools/gdscheck -p")
    if not view.get("is_gds_available"):
        return Check("cuFile driver", FAIL, "cuFile's driver reports GDS unavailable",
                     "run /usr/local/cuda/gds/tools/gdscheck -p and read cufile.log")
    if view.get("compat_mode_preferred"):
        return Check("cuFile driver", FAIL, "kvikio prefers its compat mode here",
                     "run /usr/local/cuda/gds/tools/gdscheck -p and read cufile.log")
    if view.get("allow_compat_mode"):
        return Check("cuFile driver", WARN, "cuFile reports GDS available, but its driver still allows compat "
                     "mode (another cufile.json is in use?)",
                     'set "allow_compat_mode": false in the cufile.json the driver reads')
    return Check("cuFile driver", OK, "cuFile reports GDS available; kvikio will use it")


def problems(checks: list[Check]) -> list[str]:
    """Every item that is not OK, as one sentence with its fix (policy ``require`` refuses them all)."""
    return [c.detail + (f" (fix: {c.fix})" if c.fix else "") for c in checks if c.status in (FAIL, WARN)]
