"""Block-hash chains and the prefix index: the request path's hot loop.

Two implementations with identical behaviour: ``_native`` (C, built from ``native/``) and
``_reference`` (pure Python, the readable spec). The native one is used when it was built,
unless ``PREFIXLB_NATIVE=0`` forces the reference. ``NATIVE`` says which one is active;
``IMPLEMENTATION`` names it.

Request path: ``chain, matches = index.lookup(prompt_bytes, block_size, seed)`` (one native
call: hash and match), decide, then ``index.insert(replica, chain)`` (one native call).
"""

from __future__ import annotations

import logging
import os

from ._reference import PrefixIndexPy, block_hashes_py, chain_py

__all__ = [
    "IMPLEMENTATION",
    "NATIVE",
    "NATIVE_FORCED_OFF",
    "PrefixIndex",
    "PrefixIndexPy",
    "block_hashes",
    "chain",
]

_log = logging.getLogger("prefixlb.index")

try:
    from . import _native
except ImportError as _exc:  # not built: no compiler at install time, or PREFIXLB_NO_EXTENSION
    _native = None
    _import_error: ImportError | None = _exc
else:
    _import_error = None

#: PREFIXLB_NATIVE=0 forces the pure-Python (and numpy) references for every C extension
NATIVE_FORCED_OFF = os.environ.get("PREFIXLB_NATIVE", "").strip().lower() in ("0", "false", "no", "off")

if _native is not None and not NATIVE_FORCED_OFF:
    from ._native import Chain, PrefixIndexC, block_hashes, chain

    PrefixIndex = PrefixIndexC
    NATIVE = True
    IMPLEMENTATION = "c"
    __all__ += ["Chain", "PrefixIndexC"]
else:
    block_hashes = block_hashes_py
    chain = chain_py
    PrefixIndex = PrefixIndexPy  # type: ignore[misc,assignment]
    NATIVE = False
    IMPLEMENTATION = "python"
    if _native is not None:
        from ._native import Chain, PrefixIndexC  # still importable for comparisons

        __all__ += ["Chain", "PrefixIndexC"]
    if NATIVE_FORCED_OFF:
        _log.info("prefixlb.index: PREFIXLB_NATIVE=0, using the pure-Python reference")
    else:
        _log.warning(
            "prefixlb.index: C extension not available (%s); using the pure-Python reference",
            _import_error,
        )
