"""vLLM's prefix-cache block hashes over token ids, and a fast variant for simulation.

vLLM (``vllm/v1/core/kv_cache_utils.py``, ``vllm/utils/hashing.py``) hashes every *full*
block of a request's token ids as a chain::

    h_i = H((parent, tuple(block_tokens), extra_keys))     parent = h_{i-1}, or NONE_HASH

``H`` is chosen by ``--prefix-caching-hash-algo``:

* ``"sha256"`` (vLLM's default): ``sha256(pickle.dumps(x, protocol=HIGHEST_PROTOCOL))``;
* ``"sha256_cbor"``: ``sha256(cbor2.dumps(x, canonical=True))`` (needs ``cbor2``);
* ``"fast"`` (ours, for the simulator): ``xxh64(little-endian uint32 token ids, seed=parent)``,
  the same chain as ``prefixlb.index.block_hashes`` over the ids' bytes with seed 0.

``NONE_HASH`` is ``H("vllm-none-hash")`` (vLLM >= 0.30 with ``PYTHONHASHSEED`` unset) or
``H(seed)`` when a seed string is given (vLLM uses the ``PYTHONHASHSEED`` string). KV events
carry :func:`external_hash`: the low 64 bits of the 32-byte digest as an unsigned int. The chain
itself runs on the full digests, so it cannot be recomputed from the event ints.

Extra keys (vLLM >= 0.32, tagged): LoRA ``("lora", name, path)`` on every block, then
``("cache_salt", salt)`` on the first block only; ``None`` when a block has none.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from array import array
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal, Union

import xxhash

__all__ = [
    "HASH_ALGOS",
    "NONE_HASH_SEED",
    "BlockHash",
    "BlockHasher",
    "ExtraKeys",
    "HashAlgo",
    "external_hash",
    "none_hash",
    "sha256_cbor",
    "sha256_pickle",
]

HashAlgo = Literal["sha256", "sha256_cbor", "fast"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor", "fast")
#: A chain value: the 32-byte digest (sha256*) or an unsigned 64-bit int ("fast").
BlockHash = Union[bytes, int]
#: Extra keys mixed into one block's hash, or None.
ExtraKeys = Union[tuple[Any, ...], None]
#: What vLLM >= 0.30 hashes for NONE_HASH when PYTHONHASHSEED is unset (sha256 algos).
NONE_HASH_SEED = "vllm-none-hash"

_U64 = (1 << 64) - 1
_LITTLE = sys.byteorder == "little"
assert array("I").itemsize == 4, "array('I') must be 32-bit for the fast hash"


def sha256_pickle(obj: Any) -> bytes:
    """vLLM's ``sha256``: SHA-256 of the object's pickle (highest protocol)."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 of the object's canonical CBOR (portable across languages)."""
    try:
        import cbor2
    except ImportError as exc:  # optional dependency: only this algorithm needs it
        raise ImportError(
            "hash_algo='sha256_cbor' needs the 'cbor2' package: pip install cbor2"
        ) from exc
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _ids_bytes(token_ids: Sequence[int]) -> bytes:
    a = token_ids if isinstance(token_ids, array) and token_ids.typecode == "I" else array("I", token_ids)
    if not _LITTLE:
        a = array("I", a)  # a copy: byteswap works in place
        a.byteswap()
    return a.tobytes()


@lru_cache(maxsize=32)
def none_hash(algo: str = "sha256", seed: str | None = None) -> BlockHash:
    """The parent of block 0 for ``algo``; ``seed`` plays the part of ``PYTHONHASHSEED``.

    For ``"fast"`` it is 0 without a seed (the ``block_hashes`` contract's default seed) and
    ``xxh64(seed)`` with one.
    """
    if algo == "sha256":
        return sha256_pickle(NONE_HASH_SEED if seed is None else seed)
    if algo == "sha256_cbor":
        return sha256_cbor(NONE_HASH_SEED if seed is None else seed)
    if algo == "fast":
        return 0 if seed is None else xxhash.xxh64_intdigest(seed.encode())
    raise ValueError(f"unknown hash_algo {algo!r}; known: {', '.join(HASH_ALGOS)}")


def external_hash(h: BlockHash) -> int:
    """The value a KV event carries: low 64 bits of a digest (vLLM's int block hashes)."""
    if isinstance(h, int):
        return h
    return int.from_bytes(h, "big") & _U64


class BlockHasher:
    """Incremental block-hash chains for one algorithm, block size and seed.

    Only new full blocks are hashed: :meth:`extend` continues a chain from where it stopped,
    carrying the parent, so a request's output tokens cost one hash per block they fill.
    """

    __slots__ = ("algo", "block_size", "none_hash", "_digest")

    def __init__(self, algo: str = "sha256", block_size: int = 16, seed: str | None = None) -> None:
        if algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash_algo {algo!r}; known: {', '.join(HASH_ALGOS)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.algo = algo
        self.block_size = block_size
        self.none_hash: BlockHash = none_hash(algo, seed)
        self._digest: Callable[[Any], bytes] | None = (
            sha256_pickle if algo == "sha256" else sha256_cbor if algo == "sha256_cbor" else None
        )

    def hash_block(
        self, parent: BlockHash | None, tokens: Sequence[int], extra_keys: ExtraKeys = None
    ) -> BlockHash:
        """Hash one block given its parent (None, or falsy as in vLLM, means NONE_HASH)."""
        if not parent:
            parent = self.none_hash
        if self._digest is not None:
            return self._digest((parent, tuple(tokens), extra_keys))
        assert isinstance(parent, int)
        if extra_keys is not None:
            # repr of a tuple of str/int is stable across processes (no hash randomisation)
            parent = xxhash.xxh64_intdigest(repr(extra_keys).encode(), seed=parent)
        return xxhash.xxh64_intdigest(_ids_bytes(tokens), seed=parent)

    def extend(
        self,
        hashes: list[BlockHash],
        token_ids: Sequence[int],
        extra_keys: Callable[[int], ExtraKeys] | None = None,
    ) -> int:
        """Append to ``hashes`` the hash of every full block of ``token_ids`` it lacks.

        ``hashes`` must be this chain's prefix for ``token_ids``; ``extra_keys(i)`` gives block
        i's extra keys (None: no block has any). Returns the number of hashes added.
        """
        bs = self.block_size
        start = len(hashes)
        end = len(token_ids) // bs
        if end <= start:
            return 0
        parent: BlockHash = hashes[-1] if hashes else self.none_hash
        if self._digest is not None:
            digest = self._digest
            for i in range(start, end):
                ek = extra_keys(i) if extra_keys is not None else None
                parent = digest((parent, tuple(token_ids[i * bs : (i + 1) * bs]), ek))
                hashes.append(parent)
        else:
            # one bulk conversion, then a C call per block over a memoryview slice
            data = memoryview(_ids_bytes(token_ids[start * bs : end * bs]))
            step = 4 * bs
            h = xxhash.xxh64_intdigest
            p = parent
            assert isinstance(p, int)
            if extra_keys is None:
                append = hashes.append
                for o in range(0, (end - start) * step, step):
                    p = h(data[o : o + step], p)
                    append(p)
                return end - start
            for j in range(end - start):
                seed = p
                ek = extra_keys(start + j)
                if ek is not None:
                    seed = h(repr(ek).encode(), seed=seed)
                p = h(data[j * step : (j + 1) * step], seed=seed)
                hashes.append(p)
        return end - start

    def chain(
        self, token_ids: Sequence[int], extra_keys: Callable[[int], ExtraKeys] | None = None
    ) -> list[BlockHash]:
        """The full chain of ``token_ids`` (one hash per full block)."""
        out: list[BlockHash] = []
        self.extend(out, token_ids, extra_keys)
        return out

    def __repr__(self) -> str:
        return f"BlockHasher(algo={self.algo!r}, block_size={self.block_size})"
