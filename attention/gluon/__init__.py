"""Hopper (sm_90) attention kernels written in Gluon, triton's low-level dialect: async warpgroup MMAs, TMA and
mbarriers that plain `tl.dot` does not expose. The upstream-Triton kernels (attention/triton/) stay the
portable path and the fallback for every case these kernels do not cover; dispatch.py decides per call.

Gluon's API moves between triton releases, so this package is written to one: GLUON_TRITON (the version the
GPU image ships). Any other triton, another GPU than sm_90, or the CPU interpreter (Gluon has none) leaves
`backend="auto"` on the Triton kernels; hopper_ready says which and why. The kernels also compile with the releases
in GLUON_COMPILES (compat.py maps the calls renamed since), which CPU CI checks for sm_90 without running them.
"""

from __future__ import annotations

import os

import torch

GLUON_TRITON = "3.6"  # the triton minor version whose Gluon API these kernels are written against
GLUON_COMPILES = ("3.6", "3.9")  # the triton minor versions the kernels compile with (tools/compile_sm90.py)


def triton_minor() -> str | None:
    """The installed triton's "major.minor", or None without triton."""
    try:
        import triton
    except ImportError:
        return None
    return ".".join(triton.__version__.split(".")[:2])


def triton_status() -> str | None:
    """None if the installed triton has the Gluon API these kernels use, else the reason it does not."""
    version = triton_minor()
    if version is None:
        return "triton is not installed"
    if version != GLUON_TRITON:
        import triton
        return f"triton {triton.__version__} (the Gluon kernels are written for triton {GLUON_TRITON}.x)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 (Gluon has no interpreter)"
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError as e:
        return f"triton.experimental.gluon is not importable ({e})"
    return None


_READY: dict = {}


def hopper_ready(device: torch.device) -> tuple[bool, str]:
    """(True, "") where the Gluon kernels can run on `device`, else (False, why not). Cached per device."""
    if device.type != "cuda":
        return False, f"device {device}"
    key = str(device)
    if key not in _READY:
        why = triton_status()
        if why is None:
            cap = torch.cuda.get_device_capability(device)
            why = None if cap == (9, 0) else f"compute capability {cap} (the Gluon kernels are sm_90 only)"
        _READY[key] = (why is None, why or "")
    return _READY[key]


_PROPS: dict = {}


def device_props(device: torch.device):
    """torch.cuda.get_device_properties(device), looked up once per device (SM count, L2 size, total memory)."""
    key = str(device)
    if key not in _PROPS:
        _PROPS[key] = torch.cuda.get_device_properties(device)
    return _PROPS[key]
