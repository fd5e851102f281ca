"""The zarr internals gsae reads, as both zarr lines spell them.

CI runs Python 3.11, which pip gives zarr 3.1; Python 3.12+ gets zarr 3.2+ (3.4.2 on 2026-11-28), where
``BytesCodec.endian`` is a plain string rather than an Enum and indexers take the array's runtime chunk
grid rather than its metadata's.  Every `gsae cache` failed there until both were read either way; the
whole suite passes on Python 3.13 with zarr 3.4.2 (docs/benchmarks.md).  These tests give the installed
zarr's objects the other line's spelling, so that CI covers both."""
import dataclasses
import types

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec
from zarr.core.indexing import BasicIndexer

from stores.chunk_io import chunk_codec, get, indexing_grid
from stores.codecs import activation_codecs, small_array_codecs


def _array(tmp_path, compressors, filters=(), rows=8, d=4, dtype="float16"):
    return zarr.create_array(str(tmp_path / "a"), shape=(rows * 3, d), chunks=(rows, d), dtype=dtype,
                             filters=list(filters), compressors=compressors, fill_value=0)


def _with_endian(codecs, endian):
    """``codecs`` with the bytes codec's endian replaced by ``endian`` (a string, as zarr 3.2+ keeps it,
    or an Enum member, as zarr 3.1 does), whatever the installed zarr keeps."""
    first = codecs[0]
    assert isinstance(first, BytesCodec)
    other = dataclasses.replace(first)  # frozen: set the field as its own __init__ does
    object.__setattr__(other, "endian", endian)
    return (other, *codecs[1:])


class _Endian:  # zarr 3.1's Endian members: ``.value`` is the string
    def __init__(self, value):
        self.value = value


@pytest.mark.parametrize("spelling", ["string", "enum"])
def test_the_lossless_chain_is_recognised_whichever_way_the_endian_is_spelled(tmp_path, spelling):
    chain = activation_codecs("lossless", "float16")
    codecs = _array(tmp_path, chain.compressors).metadata.codecs
    wrap = (lambda e: e) if spelling == "string" else _Endian
    found = chunk_codec(_with_endian(codecs, wrap("little")))
    assert found is not None and found.cname == "zstd" and found.shuffle == 1  # numcodecs' Blosc.SHUFFLE
    assert chunk_codec(_with_endian(codecs, None)) is found  # a one-byte dtype's chain has no endian
    # a big-endian chain's bytes are not what gsae's own encoder writes: zarr must do it
    assert chunk_codec(_with_endian(codecs, wrap("big"))) is None
    # the tokens' and statistics' chain (zstd) only where asked for
    small = _array(tmp_path / "s", small_array_codecs(), dtype="int32").metadata.codecs
    assert chunk_codec(_with_endian(small, wrap("little"))) is None
    assert chunk_codec(_with_endian(small, wrap("little")), zstd=True).codec_id == "zstd"
    # a lossy chain (a filter first) is zarr's to encode
    lossy = activation_codecs("lossy", "float16")
    lossy_codecs = _array(tmp_path / "l", lossy.compressors, lossy.filters).metadata.codecs
    assert chunk_codec(lossy_codecs) is None


def test_indexers_get_the_runtime_grid_where_the_array_has_one(tmp_path):
    array = _array(tmp_path, activation_codecs("lossless", "float16").compressors)
    runtime = getattr(array.async_array, "_chunk_grid", None)
    # the installed zarr's own grid either way: the indexer it makes reads the rows asked for
    assert indexing_grid(array) is (array.metadata.chunk_grid if runtime is None else runtime)
    indexer = BasicIndexer(slice(8, 16), array.shape, indexing_grid(array))
    assert [tuple(c.chunk_coords) for c in indexer] == [(1, 0)]
    # zarr 3.2+'s spelling on zarr 3.1 (and the reverse): a runtime grid, when there is one, wins
    grid = object()
    fake = types.SimpleNamespace(async_array=types.SimpleNamespace(_chunk_grid=grid),
                                 metadata=types.SimpleNamespace(chunk_grid="metadata's"))
    assert indexing_grid(fake) is grid
    fake.async_array = types.SimpleNamespace()
    assert indexing_grid(fake) == "metadata's"


def test_a_selection_zarr_reads_for_gsae_is_the_rows_written(tmp_path):
    """``get`` on a part of a chunk goes through zarr's indexer with :func:`indexing_grid`."""
    array = _array(tmp_path, activation_codecs("lossless", "float16").compressors)
    values = np.arange(24 * 4, dtype=np.float16).reshape(24, 4)
    array[:] = values
    np.testing.assert_array_equal(get(array, slice(3, 13)), values[3:13])
    out = np.empty((8, 4), np.float16)  # one whole chunk: gsae's own decode
    np.testing.assert_array_equal(get(array, slice(8, 16), out), values[8:16])


def test_a_sharded_array_is_read_by_zarr(tmp_path):
    """The files of a sharded array are its shards, and their codec is zarr's own: gsae neither names a chunk
    file inside one nor decodes it itself."""
    from stores.chunk_io import chunk_layout, whole_chunk_file

    array = zarr.create_array(str(tmp_path / "s"), shape=(32, 4), chunks=(4, 4), shards=(16, 4), dtype="float16",
                              compressors=activation_codecs("lossless", "float16").compressors, fill_value=0)
    values = np.arange(32 * 4, dtype=np.float16).reshape(32, 4)
    array[:] = values
    assert chunk_layout(array).chunk_shape == (16, 4) and chunk_layout(array).blosc is None
    out = np.empty((16, 4), np.float16)
    assert whole_chunk_file(array, slice(16, 32), out.shape, out.dtype) is None
    np.testing.assert_array_equal(get(array, slice(16, 32), out), values[16:])
    np.testing.assert_array_equal(get(array, slice(4, 8)), values[4:8])
