"""Choosing a Hopper fast path at run time (the decode's and the store's): the decision as it is
logged, and each distinct decision logged once on the "vllm_gds.kernels" logger."""

from __future__ import annotations

import logging

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
