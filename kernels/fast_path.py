"""Choosing a Hopper fast path at run time (the decode's and the store's): the decision as it is
logged, and each distinct decision logged once on the "vllm_gds.kernels" logger."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("vllm_gds.kernels")

LOGGED: set[str] = set()


def hopper_path(capability: tuple[int, int] | None, gluon_error: str | None,
                unsupported: str | None, kernel: str = "kernel") -> tuple[bool, str]:
    """(take the Hopper `kernel`, the path as logged) from the device's compute capability (None:
    not CUDA), why Gluon did not import (None: it did) and why the fast path cannot take this
    launch (None: it can)."""
    if gluon_error is not None:
        return False, f"portable Triton kernel (no Gluon in this Triton: {gluon_error})"
    if capability is None:
        return False, "portable Triton kernel (not a CUDA device)"
    if capability[0] != 9:
        return False, (f"portable Triton kernel (sm_{capability[0]}{capability[1]}: the Hopper "
                       f"{kernel} is checked on sm_90 only)")
    if unsupported is not None:
        return False, f"portable Triton kernel ({unsupported})"
    return True, "Hopper fast path (Gluon, sm_90)"


def log_once(tables, job: str, path: str) -> None:
    """'<format> <job>: <path>' at INFO, once per distinct line in the process."""
    line = f"{getattr(tables, 'format_name', 'quantized KV')} {job}: {path}"
    if line not in LOGGED:
        LOGGED.add(line)
        log.info(line)


def choose(tables, job: str, kernel: str, want: bool | None, device: torch.device,
           gluon_error: str | None, why_unsupported, caller: str, tuning: str) -> bool:
    """Whether a plan's `job` ("decode", "store") takes its Hopper `kernel`: want (the tuning's
    hopper) False never, True always (raises where it cannot run), None where it can run
    (hopper_path; why_unsupported() asked only on an sm_90 GPU with Gluon). Logged once."""
    if want is False:
        use, path = False, f"portable Triton kernel ({tuning}(hopper=False))"
    else:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        unsupported = None
        if gluon_error is None and cap is not None and cap[0] == 9:
            unsupported = why_unsupported()
        use, path = hopper_path(cap, gluon_error, unsupported, kernel)
        if want and not use:
            raise ValueError(
                f"{caller}: {tuning}(hopper=True) but the Hopper {job} cannot run: {path}; "
                f"pass hopper=None (automatic) or hopper=False (portable)")
    log_once(tables, job, path)
    return use
