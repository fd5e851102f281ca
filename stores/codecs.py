"""Codec chains of the activation store.

Measured on SmolLM2-135M residual streams (float16, 3640-row chunks, this 2-core CPU):

==========================================  ===============  ==========
chain                                       bytes per value  encode MB/s
==========================================  ===============  ==========
zstd(1)                                     1.86             370
shuffle(2) + zstd(1), numcodecs             1.72             220
blosc(zstd 1, shuffle), default blocks      1.86             270
blosc(zstd 1, shuffle), 256 KiB blocks      1.72             480
shuffle + lz4, or zstd at negative levels   2.00             330
bitround(3) + blosc(zstd 1, shuffle)        0.94             220
==========================================  ===============  ==========

Byte shuffle helps: it puts the sign/exponent bytes of float16 next to each other, where they
compress well; the low mantissa bytes are close to noise.  Blosc's default block size is too small
for that to pay off; with 256 KiB blocks it matches a separate shuffle pass at twice the speed,
which matters because stage one compresses while the model runs on the same two cores.  Every
chain ends in CRC32C so a corrupt chunk is detected on read.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch and zarr are imported where they are used: the chunk processes start without torch,
    import torch  # and `gsae`'s options (these choices) load without either


COMPRESSIONS = ("lossless", "lossy")


@contextlib.contextmanager
def quiet_numcodecs() -> Iterator[None]:
    """Silence zarr's warning that numcodecs codecs (BitRound, in lossy stores) are outside the Zarr v3
    spec, where gsae builds or parses them: every lossy store open would print it.  Scoped, so the
    process's own warning filters stay as they were."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


ZSTD_LEVEL = 1
BLOSC_BLOCK_BYTES = 256 * 1024
DEFAULT_KEEP_BITS = 3

#: Storage dtypes: name -> (zarr/numpy dtype of the array, bytes per value).  numpy has no
#: bfloat16, so bfloat16 values are stored as their raw uint16 bit patterns.
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "float16": ("float16", 2),
    "bfloat16": ("uint16", 2),
    "float32": ("float32", 4),
}

_MANTISSA_BITS = {"float16": 10, "float32": 23}


def bit_round(values: torch.Tensor, keep_bits: int) -> torch.Tensor:
    """What the lossy chain's BitRound filter stores for float16 or float32 ``values``: numcodecs'
    ``BitRound.encode``, the same integer operations (round half to even on the mantissa), in torch, so
    the cache's statistics are of the stored values and can be taken where the model runs."""
    import torch

    bits = _MANTISSA_BITS[{torch.float16: "float16", torch.float32: "float32"}[values.dtype]]
    if keep_bits >= bits:
        return values
    as_int = {torch.float16: torch.int16, torch.float32: torch.int32}[values.dtype]
    b = values.contiguous().view(as_int).clone()
    mask_bits = bits - keep_bits
    mask = (-1 >> mask_bits) << mask_bits
    b += ((b >> mask_bits) & 1) + ((1 << (mask_bits - 1)) - 1)
    b &= mask
    return b.view(values.dtype)


def keep_bits_range(dtype: str) -> range:
    """The mantissa bits lossy compression can keep for ``dtype`` (empty where it is not lossy-capable)."""
    return range(_MANTISSA_BITS.get(dtype, 0))


@dataclass(frozen=True)
class CodecChain:
    """The filters and compressors of one array, plus what to record about them."""

    filters: list[Any]
    compressors: list[Any]
    description: dict[str, Any]


def activation_codecs(compression: str, dtype: str, keep_bits: int = DEFAULT_KEEP_BITS) -> CodecChain:
    """Codec chain for the per-layer activation arrays.

    ``compression`` is ``lossless`` (shuffle + zstd + crc32c) or ``lossy`` (mantissa bit rounding
    to ``keep_bits`` bits first; the relative error of every normal value is at most
    2**-(keep_bits+1); float16 subnormals, below 2**-14, lose at most 2**-(25-(10-keep_bits)) absolute).
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    itemsize = STORAGE_DTYPES[dtype][1]
    compressors = [
        BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle", typesize=itemsize, blocksize=BLOSC_BLOCK_BYTES),
        Crc32cCodec(),
    ]
    chain = [f"blosc(zstd {ZSTD_LEVEL}, byte shuffle, {BLOSC_BLOCK_BYTES // 1024} KiB blocks)", "crc32c"]
    if compression == "lossless":
        return CodecChain(
            filters=[],
            compressors=compressors,
            description={
                "compression": "lossless",
                "chain": chain,
                "keep_bits": None,
                "relative_error_bound": 0.0,
            },
        )
    if compression == "lossy":
        if dtype not in _MANTISSA_BITS:
            raise ValueError(f"lossy compression needs --dtype float16 or float32 (got {dtype})")
        if keep_bits not in keep_bits_range(dtype):
            raise ValueError(f"keep_bits must be from 0 to {_MANTISSA_BITS[dtype] - 1} for {dtype} (got {keep_bits})")
        from zarr.codecs.numcodecs import BitRound

        return CodecChain(
            filters=[BitRound(keepbits=keep_bits)],
            compressors=compressors,
            description={
                "compression": "lossy",
                "chain": [f"bitround({keep_bits})", *chain],
                "keep_bits": keep_bits,
                # round-to-nearest on the mantissa: half a unit in the last kept place
                "relative_error_bound": 2.0 ** -(keep_bits + 1),
            },
        )
    raise ValueError(f"unknown compression {compression!r}; choose lossless or lossy")


def small_array_codecs() -> list[Any]:
    """Compressors for tokens and statistics: zstd with a checksum."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]
