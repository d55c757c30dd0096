"""The Gluon calls whose names differ between the triton releases the kernels compile with.

The kernels run, and are tested, on GLUON_TRITON (3.6, the GPU image's). Later releases (3.9 checked) renamed the
TMA and cp.async copies and made shared-memory reinterpretation public; the names here take whichever the installed
triton has, so that every kernel variant also compiles with those releases (tools/compile_sm90.py --gluon; CPU CI
compiles them all for sm_90 with the triton it installs). They still run only under GLUON_TRITON
(attention.gluon.triton_status): nothing has checked their results on a GPU under another release.
"""

from __future__ import annotations

from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import tma

RENAMED = hasattr(tma, "async_load")  # triton after 3.6: async_load / async_store

# TMA tile copies global -> shared (completing on an mbarrier) and shared -> global
tma_load = tma.async_load if RENAMED else tma.async_copy_global_to_shared
tma_store = tma.async_store if RENAMED else tma.async_copy_shared_to_global
# cp.async of rows of pointers into shared memory
cp_async_load = async_copy.async_load if RENAMED else async_copy.async_copy_global_to_shared


@builtin
def reinterpret(smem, dtype, shape, layout, _semantic=None):
    """The shared-memory descriptor smem viewed with another dtype, shape and layout (same bytes): its public
    reinterpret where the installed triton has one (after 3.6), else 3.6's _reinterpret."""
    view = getattr(smem, "reinterpret", None) or smem._reinterpret
    return view(dtype, shape, layout, _semantic=_semantic)
