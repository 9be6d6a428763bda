"""A pure-numpy reader of TensorFlow's tensor-bundle ("V2") checkpoint format. No TensorFlow, no protobuf.

A TF checkpoint written by ``tf.train.Saver`` (V2 format, the default since TF 1.0) or by ``tf.train.Checkpoint``
is a *prefix* such as ``.../model.ckpt`` naming two kinds of file:

``<prefix>.index``
    An SSTable in LevelDB's table format (TF's copy lives in ``tensorflow/core/lib/io/table*``). Its keys are
    tensor names, sorted bytewise. The empty key ``""`` maps to a serialized ``BundleHeaderProto`` and every
    other key to a serialized ``BundleEntryProto`` describing one tensor.
``<prefix>.data-<shard:05d>-of-<num_shards:05d>``
    Raw tensor bytes, concatenated. A ``BundleEntryProto`` says which shard holds a tensor and at which byte
    offset and size, plus the masked CRC32C of those bytes.

The table file layout (all integers little-endian; ``varint`` is protobuf's base-128 varint)::

    [data block 0][trailer] ... [data block N-1][trailer] [metaindex block][trailer] [index block][trailer] [footer]

    block   := entry* restarts:uint32[num_restarts] num_restarts:uint32
    entry   := shared:varint non_shared:varint value_len:varint key_delta:bytes[non_shared] value:bytes[value_len]
               (the key is the previous entry's key[:shared] + key_delta; at every restart point shared == 0)
    trailer := compression_type:uint8 masked_crc32c:uint32      (crc over the block's bytes + the type byte)
    footer  := metaindex_handle index_handle <zero padding up to 40 bytes> magic:uint64 (0xdb4775248b80fb57)
    handle  := offset:varint size:varint                        (size excludes the 5-byte trailer)

The index block maps a separator key ``>=`` the last key of each data block to that block's handle. LevelDB allows
snappy-compressed blocks (compression type 1); TensorFlow's ``BundleWriter`` always writes them uncompressed (type
0), so this reader supports type 0 only and raises :class:`TFBundleError` for anything else.

The two protobuf messages (``tensorflow/core/protobuf/tensor_bundle.proto``) are decoded by the tiny wire-format
decoder below; only these fields are used::

    BundleHeaderProto { int32 num_shards = 1; Endianness endianness = 2 (LITTLE = 0, BIG = 1); VersionDef version = 3; }
    BundleEntryProto  { DataType dtype = 1; TensorShapeProto shape = 2; int32 shard_id = 3; int64 offset = 4;
                        int64 size = 5; fixed32 crc32c = 6; repeated TensorSliceProto slices = 7; }
    TensorShapeProto  { repeated Dim dim = 2 { int64 size = 1; string name = 2; }; bool unknown_rank = 3; }

Checksums. Every table block's trailer CRC and (by default) every tensor's data CRC is checked. CRC32C is
computed in numpy (:func:`crc32c`): buffers under 512 KiB go through a pure-Python slicing-by-4 loop; larger
ones are split into 16384 interleaved lanes that are advanced together with vectorised table look-ups (4 bytes
per step) and then merged with GF(2) "shift by n zero bytes" operators, so verifying the 500 MB of the 124M
GPT-2 checkpoint costs a few seconds rather than minutes. Pass ``verify_checksums=False`` to skip it.

Supported tensor dtypes: float16, bfloat16 (via ``ml_dtypes``), float32, float64, int8/16/32/64, uint8/16/32/64,
bool, complex64/128. String, resource, variant and quantized tensors are listed by :func:`read_bundle_index`
(with ``dtype=None``) but :func:`read_tensor` refuses them. Partitioned ("sliced") variables are refused too.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Iterator

import numpy as np

from .safetensors_io import CheckpointError

__all__ = [
    "BundleEntry",
    "BundleHeader",
    "TFBundleError",
    "TFChecksumError",
    "crc32c",
    "masked_crc32c",
    "unmask_crc32c",
    "data_shard_path",
    "read_bundle_header",
    "read_bundle_index",
    "read_tensor",
    "load_tensor_bundle",
]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
_COMPRESSION_NAMES = {0: "none", 1: "snappy", 2: "zlib"}


class TFBundleError(CheckpointError):
    """A TensorFlow checkpoint is malformed, truncated or uses something this reader does not support.

    A subclass of the project's :class:`CheckpointError` (itself a ``ValueError``). Missing files raise
    ``FileNotFoundError`` instead.
    """


class TFChecksumError(TFBundleError):
    """Stored bytes do not match their CRC32C checksum."""


# ---------------------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by LevelDB tables and TF tensor bundles.
# ---------------------------------------------------------------------------------------------------------------
_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8


def _make_byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_T8 = _make_byte_table()  # one byte step: s -> T8[s & 0xff] ^ (s >> 8)
# Slicing-by-4: _T4[k][b] is the effect of byte b followed by k zero bytes (k = 3 for the first byte of a word).
_T4 = [_T8.copy()]
for _k in range(3):
    _T4.append((_T8[_T4[-1] & 0xFF] ^ (_T4[-1] >> 8)).astype(np.uint32))
# Four-byte step on a 32-bit word x = state ^ data_word, split into 16-bit halves for vectorised look-ups.
_lo = np.arange(65536, dtype=np.uint32)
_W_LO = (_T4[3][_lo & 0xFF] ^ _T4[2][_lo >> 8]).astype(np.uint32)  # bytes 0 and 1 of the word
_W_HI = (_T4[1][_lo & 0xFF] ^ _T4[0][_lo >> 8]).astype(np.uint32)  # bytes 2 and 3 of the word
del _lo, _k
_T8_LIST = _T8.tolist()
_W_LO_LIST = _W_LO.tolist()
_W_HI_LIST = _W_HI.tolist()

_SCALAR_LIMIT = 512 * 1024  # below this many bytes the pure-Python loop is fast enough (a few tens of ms)
_LANES = 16384  # interleaved lanes of the vectorised path; a power of two so lanes merge pairwise
_COLUMN_BLOCK = 64  # lane words transposed per numpy copy in the vectorised path
_LITTLE_ENDIAN_HOST = np.little_endian


def _crc_raw_scalar(state: int, data: memoryview | bytes) -> int:
    """Advance a raw (un-inverted) CRC register over ``data`` in pure Python, four bytes at a time."""
    data = memoryview(data).cast("B")
    n = len(data)
    n4 = n - n % 4
    lo, hi = _W_LO_LIST, _W_HI_LIST
    if n4:
        for word in (
            memoryview(data[:n4]).cast("I") if _LITTLE_ENDIAN_HOST else struct.unpack(f"<{n4 // 4}I", data[:n4])
        ):
            x = state ^ word
            state = lo[x & 0xFFFF] ^ hi[x >> 16]
    t8 = _T8_LIST
    for b in data[n4:]:
        state = t8[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


def _apply_operator(op: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Apply a GF(2)-linear map on 32-bit registers, given as the images ``op[i]`` of the unit vectors ``1 << i``."""
    states = np.asarray(states, dtype=np.uint32)
    out = np.zeros_like(states)
    for i in range(32):
        out ^= np.where((states >> np.uint32(i)) & np.uint32(1), op[i], np.uint32(0)).astype(np.uint32)
    return out


def _zeros_operator(nbytes: int) -> np.ndarray:
    """The linear map "advance the raw CRC register over ``nbytes`` zero bytes", as 32 column images."""
    units = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
    one_byte = (_T8[units & 0xFF] ^ (units >> 8)).astype(np.uint32)
    result = units.copy()  # identity
    power = one_byte
    while nbytes:
        if nbytes & 1:
            result = _apply_operator(power, result)
        nbytes >>= 1
        if nbytes:
            power = _apply_operator(power, power)
    return result


def _crc_raw_vectorized(state: int, data: np.ndarray) -> int:
    """Advance a raw CRC register over a large uint8 buffer using ``_LANES`` interleaved lanes.

    Lane ``j`` covers bytes ``[j*L, (j+1)*L)`` of the head of the buffer (L a multiple of 4); lane 0 starts from
    ``state`` and the others from 0. CRC registers are linear, so ``R(s, A + B) = Z_|B|(R(s, A)) ^ R(0, B)`` where
    ``Z_n`` advances over n zero bytes; lanes are merged pairwise with that rule. The tail that does not fill
    the lanes evenly goes through the scalar loop.
    """
    lanes = _LANES
    lane_words = len(data) // (4 * lanes)
    head = lanes * lane_words * 4
    words = data[:head].view("<u4").reshape(lanes, lane_words)
    states = np.zeros(lanes, dtype=np.uint32)
    states[0] = state
    mask16 = np.uint32(0xFFFF)
    sixteen = np.uint32(16)
    for start in range(0, lane_words, _COLUMN_BLOCK):
        block = np.ascontiguousarray(words[:, start : start + _COLUMN_BLOCK].T)
        if block.dtype.byteorder not in ("=", "|"):
            block = block.astype(np.uint32)
        for row in block:
            x = states ^ row
            states = _W_LO[x & mask16] ^ _W_HI[x >> sixteen]
    span = lane_words * 4
    while len(states) > 1:
        states = _apply_operator(_zeros_operator(span), states[0::2]) ^ states[1::2]
        span *= 2
    return _crc_raw_scalar(int(states[0]), memoryview(data[head:]))


def crc32c(data, value: int = 0) -> int:
    """CRC32C of ``data`` (bytes-like or a numpy array, read as its raw bytes), optionally extending ``value``.

    ``crc32c(b"123456789") == 0xE3069283``; ``crc32c(b, crc32c(a)) == crc32c(a + b)``.
    """
    if isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    state = (value ^ 0xFFFFFFFF) & 0xFFFFFFFF
    if len(buf) < _SCALAR_LIMIT:
        state = _crc_raw_scalar(state, memoryview(buf))
    else:
        state = _crc_raw_vectorized(state, buf)
    return state ^ 0xFFFFFFFF


def masked_crc32c(crc: int) -> int:
    """LevelDB/TF's masking of a stored CRC: rotate right by 15 bits and add a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc32c(masked: int) -> int:
    """Inverse of :func:`masked_crc32c`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# Protobuf wire format (just enough to read BundleHeaderProto / BundleEntryProto).
# ---------------------------------------------------------------------------------------------------------------
def _read_varint(buf: bytes, pos: int, what: str = "varint") -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise TFBundleError(f"truncated {what}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise TFBundleError(f"malformed {what} (more than 10 bytes)")


def _iter_proto_fields(buf: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field_number, wire_type, value)``: ints for varint/fixed fields, bytes for length-delimited ones."""
    pos = 0
    n = len(buf)
    while pos < n:
        tag, pos = _read_varint(buf, pos, f"{what} tag")
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, f"{what} field {field}")
        elif wire == 1:
            if pos + 8 > n:
                raise TFBundleError(f"truncated fixed64 field {field} in {what}")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos, f"{what} field {field} length")
            if pos + length > n:
                raise TFBundleError(f"truncated length-delimited field {field} in {what}")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > n:
                raise TFBundleError(f"truncated fixed32 field {field} in {what}")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:  # groups (3, 4) are not used by these messages
            raise TFBundleError(f"unsupported protobuf wire type {wire} (field {field}) in {what}")
        yield field, wire, value


def _int64(value: int) -> int:
    """Reinterpret a varint as a two's-complement int64 (negative int32/int64 are 10-byte varints)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# TF DataType enum (tensorflow/core/framework/types.proto) -> (name, numpy dtype or None if unsupported).
def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


_TF_DTYPES: dict[int, tuple[str, object]] = {
    1: ("float32", np.float32),
    2: ("float64", np.float64),
    3: ("int32", np.int32),
    4: ("uint8", np.uint8),
    5: ("int16", np.int16),
    6: ("int8", np.int8),
    7: ("string", None),
    8: ("complex64", np.complex64),
    9: ("int64", np.int64),
    10: ("bool", np.bool_),
    11: ("qint8", None),
    12: ("quint8", None),
    13: ("qint32", None),
    14: ("bfloat16", _bfloat16),
    15: ("qint16", None),
    16: ("quint16", None),
    17: ("uint16", np.uint16),
    18: ("complex128", np.complex128),
    19: ("float16", np.float16),
    20: ("resource", None),
    21: ("variant", None),
    22: ("uint32", np.uint32),
    23: ("uint64", np.uint64),
}


def _tf_dtype_name(code: int) -> str:
    if code > 100:  # reference types (DT_FLOAT_REF = 101, ...) never appear in bundles, but name them sensibly
        return _TF_DTYPES.get(code - 100, (f"DataType({code - 100})",))[0] + "_ref"
    return _TF_DTYPES.get(code, (f"DataType({code})",))[0]


def _numpy_dtype(code: int) -> np.dtype | None:
    spec = _TF_DTYPES.get(code, (None, None))[1]
    if spec is None:
        return None
    return spec() if callable(spec) and not isinstance(spec, type) else np.dtype(spec)


@dataclasses.dataclass(frozen=True)
class BundleEntry:
    """Where one tensor of a bundle lives and what it is.

    ``dtype`` is the numpy dtype (little-endian, as TF writes on every supported platform), or ``None`` for a TF
    dtype this reader cannot materialise (``tf_dtype`` names it). ``crc32c`` is the *unmasked* CRC32C of the
    tensor's bytes, or ``None`` when the entry has none. ``sliced`` is true for a partitioned variable whose
    data is stored as separate slices (not supported by :func:`read_tensor`).
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int | None
    tf_dtype: str = "float32"
    sliced: bool = False

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _parse_shape(buf: bytes, what: str) -> tuple[int, ...]:
    dims: list[int] = []
    for field, wire, value in _iter_proto_fields(buf, what):
        if field == 2 and wire == 2:
            size = 0
            for dfield, dwire, dvalue in _iter_proto_fields(value, what):
                if dfield == 1 and dwire == 0:
                    size = _int64(dvalue)
            dims.append(size)
        elif field == 3 and wire == 0 and value:
            raise TFBundleError(f"{what} has an unknown rank")
    if any(d < 0 for d in dims):
        raise TFBundleError(f"{what} has an unknown dimension: {dims}")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> BundleEntry:
    what = f"BundleEntryProto of tensor {name!r}"
    dtype_code, shape, shard, offset, size, crc, sliced = 0, (), 0, 0, 0, None, False
    for field, wire, value in _iter_proto_fields(buf, what):
        if field == 1 and wire == 0:
            dtype_code = value
        elif field == 2 and wire == 2:
            shape = _parse_shape(value, f"shape of tensor {name!r}")
        elif field == 3 and wire == 0:
            shard = _int64(value)
        elif field == 4 and wire == 0:
            offset = _int64(value)
        elif field == 5 and wire == 0:
            size = _int64(value)
        elif field == 6 and wire == 5:
            crc = unmask_crc32c(value)
        elif field == 7 and wire == 2:
            sliced = True
    if shard < 0 or offset < 0 or size < 0:
        raise TFBundleError(f"{what} has a negative shard/offset/size ({shard}, {offset}, {size})")
    return BundleEntry(
        name=name,
        dtype=_numpy_dtype(dtype_code),
        shape=shape,
        shard=shard,
        offset=offset,
        size=size,
        crc32c=crc,
        tf_dtype=_tf_dtype_name(dtype_code),
        sliced=sliced,
    )


@dataclasses.dataclass(frozen=True)
class BundleHeader:
    """The bundle-wide header: ``num_shards`` data files, their byte order, the format version (1 today)."""

    num_shards: int
    little_endian: bool
    version: int


def _parse_header(buf: bytes, index_path: str) -> BundleHeader:
    what = f"BundleHeaderProto of {index_path}"
    num_shards, endianness, producer = 0, 0, 0
    for field, wire, value in _iter_proto_fields(buf, what):
        if field == 1 and wire == 0:
            num_shards = _int64(value)
        elif field == 2 and wire == 0:
            endianness = value
        elif field == 3 and wire == 2:
            for vfield, vwire, vvalue in _iter_proto_fields(value, what):
                if vfield == 1 and vwire == 0:
                    producer = _int64(vvalue)
    if num_shards < 1:
        raise TFBundleError(f"{what} declares {num_shards} data shards")
    if endianness not in (0, 1):
        raise TFBundleError(f"{what} has an unknown endianness value {endianness}")
    return BundleHeader(num_shards=num_shards, little_endian=endianness == 0, version=producer)


# ---------------------------------------------------------------------------------------------------------------
# SSTable (LevelDB table format).
# ---------------------------------------------------------------------------------------------------------------
def _read_block_handle(buf: bytes, pos: int, what: str) -> tuple[int, int, int]:
    offset, pos = _read_varint(buf, pos, f"{what} offset")
    size, pos = _read_varint(buf, pos, f"{what} size")
    return offset, size, pos


def _read_block(data: bytes, offset: int, size: int, path: str, what: str, verify: bool) -> bytes:
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(data) - FOOTER_SIZE:
        raise TFBundleError(
            f"{path}: {what} at bytes [{offset}, {end}) lies outside the {len(data)}-byte file "
            "(truncated or corrupt index)"
        )
    contents = data[offset : offset + size]
    ctype = data[offset + size]
    if verify:
        stored = unmask_crc32c(int.from_bytes(data[offset + size + 1 : end], "little"))
        actual = crc32c(data[offset : offset + size + 1])
        if stored != actual:
            raise TFChecksumError(
                f"{path}: {what} at bytes [{offset}, {end}) fails its CRC32C check "
                f"(stored {stored:#010x}, computed {actual:#010x}); the index file is corrupt"
            )
    if ctype != 0:
        name = _COMPRESSION_NAMES.get(ctype, "unknown")
        raise TFBundleError(
            f"{path}: {what} uses compression type {ctype} ({name}); only uncompressed blocks (type 0, which "
            "TensorFlow's BundleWriter always writes) are supported"
        )
    return contents


def _iter_block_entries(block: bytes, path: str, what: str) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise TFBundleError(f"{path}: {what} is too short ({len(block)} bytes)")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * num_restarts
    if num_restarts < 1 or limit < 0:
        raise TFBundleError(f"{path}: {what} has a corrupt restart array ({num_restarts} restarts)")
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = _read_varint(block, pos, f"{what} entry")
        non_shared, pos = _read_varint(block, pos, f"{what} entry")
        value_len, pos = _read_varint(block, pos, f"{what} entry")
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise TFBundleError(f"{path}: {what} has a corrupt entry at byte {pos}")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        value = block[pos : pos + value_len]
        pos += value_len
        yield key, value


def _iter_table(path: str, verify: bool) -> Iterator[tuple[bytes, bytes]]:
    """Yield every ``(key, value)`` of an SSTable file in key order."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < FOOTER_SIZE:
        raise TFBundleError(f"{path}: {len(data)} bytes is too short to be a TensorFlow checkpoint index")
    footer = data[-FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != TABLE_MAGIC:
        raise TFBundleError(
            f"{path}: bad table magic number {magic:#018x} (expected {TABLE_MAGIC:#018x}); not a TensorFlow V2 "
            "checkpoint index, or the file is truncated/corrupt"
        )
    _, _, pos = _read_block_handle(footer, 0, "metaindex handle")
    index_offset, index_size, _ = _read_block_handle(footer, pos, "index handle")
    index_block = _read_block(data, index_offset, index_size, path, "index block", verify)
    for _separator, handle in _iter_block_entries(index_block, path, "index block"):
        offset, size, _ = _read_block_handle(handle, 0, "data block handle")
        block = _read_block(data, offset, size, path, f"data block at offset {offset}", verify)
        yield from _iter_block_entries(block, path, f"data block at offset {offset}")


def _index_path(prefix: str | os.PathLike) -> str:
    prefix = os.fspath(prefix)
    path = prefix + ".index"
    if not os.path.isfile(path):
        hint = ""
        if prefix.endswith(".index"):
            hint = " (pass the prefix without the '.index' suffix)"
        elif os.path.isfile(prefix):
            hint = " (a file exists at the prefix itself: a V1 checkpoint, which is not supported)"
        raise FileNotFoundError(f"TensorFlow checkpoint index {path!r} does not exist{hint}")
    return path


def _read_header_and_entries(prefix, verify: bool) -> tuple[BundleHeader, dict[str, BundleEntry]]:
    index_path = _index_path(prefix)
    header: BundleHeader | None = None
    entries: dict[str, BundleEntry] = {}
    for key, value in _iter_table(index_path, verify):
        if key == b"":
            header = _parse_header(value, index_path)
            continue
        name = key.decode("utf-8", errors="backslashreplace")
        entries[name] = _parse_entry(name, value)
    if header is None:
        raise TFBundleError(f"{index_path}: no bundle header (empty key) in the index; not a tensor bundle")
    for entry in entries.values():
        if entry.shard >= header.num_shards:
            raise TFBundleError(
                f"{index_path}: tensor {entry.name!r} is in shard {entry.shard} but the header declares "
                f"{header.num_shards} shard(s)"
            )
    if not header.little_endian:
        entries = {
            k: dataclasses.replace(e, dtype=e.dtype.newbyteorder(">"))
            if e.dtype is not None and e.dtype.itemsize > 1
            else e
            for k, e in entries.items()
        }
    return header, entries


def read_bundle_header(prefix: str | os.PathLike) -> BundleHeader:
    """The bundle's header: number of data shards, byte order, format version."""
    return _read_header_and_entries(prefix, verify=True)[0]


def read_bundle_index(prefix: str | os.PathLike, *, verify_checksums: bool = True) -> dict[str, BundleEntry]:
    """Map each tensor name of the checkpoint ``prefix`` (e.g. ``".../model.ckpt"``) to its :class:`BundleEntry`.

    Only ``<prefix>.index`` is read. ``verify_checksums`` checks the CRC of every table block (cheap).
    Slice entries of partitioned variables (binary keys) appear under their escaped key.
    """
    return _read_header_and_entries(prefix, verify_checksums)[1]


def data_shard_path(prefix: str | os.PathLike, shard: int, num_shards: int) -> str:
    """``<prefix>.data-<shard:05d>-of-<num_shards:05d>``."""
    return f"{os.fspath(prefix)}.data-{shard:05d}-of-{num_shards:05d}"


def _find_shard_path(prefix: str, shard: int, num_shards: int | None) -> str:
    if num_shards is None:
        num_shards = read_bundle_header(prefix).num_shards
    path = data_shard_path(prefix, shard, num_shards)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TensorFlow checkpoint data shard {path!r} does not exist")
    return path


def read_tensor(
    prefix: str | os.PathLike,
    entry: BundleEntry,
    *,
    verify_checksums: bool = True,
    mmap: bool = False,
    num_shards: int | None = None,
) -> np.ndarray:
    """Read one tensor described by ``entry`` (from :func:`read_bundle_index`) as a numpy array.

    The array is a fresh copy, or with ``mmap=True`` a read-only ``np.memmap`` view into the data file (its
    checksum is still verified unless ``verify_checksums=False``). ``num_shards`` saves re-reading the header.
    Raises :class:`TFBundleError` for an unsupported dtype, a size that disagrees with dtype x shape, a data
    file too short for the tensor, and :class:`TFChecksumError` when the bytes fail their CRC32C.
    """
    prefix = os.fspath(prefix)
    if entry.sliced:
        raise TFBundleError(
            f"tensor {entry.name!r} is a partitioned (sliced) variable; reading sliced tensors is not supported"
        )
    if entry.dtype is None:
        raise TFBundleError(
            f"tensor {entry.name!r} has TensorFlow dtype {entry.tf_dtype}, which this reader does not support"
        )
    expected = entry.num_elements * entry.dtype.itemsize
    if entry.size != expected:
        raise TFBundleError(
            f"tensor {entry.name!r} is stored as {entry.size} bytes but dtype {entry.tf_dtype} x shape "
            f"{list(entry.shape)} needs {expected} bytes"
        )
    path = _find_shard_path(prefix, entry.shard, num_shards)
    file_size = os.path.getsize(path)
    end = entry.offset + entry.size
    if end > file_size:
        raise TFBundleError(
            f"tensor {entry.name!r} needs bytes [{entry.offset}, {end}) of {path} but the file has {file_size} "
            "bytes (truncated data file?)"
        )
    if entry.size == 0:
        array = np.zeros(entry.shape, dtype=entry.dtype)
    elif mmap:
        array = np.memmap(path, dtype=entry.dtype, mode="r", offset=entry.offset, shape=entry.shape)
    else:
        array = np.fromfile(path, dtype=entry.dtype, count=entry.num_elements, offset=entry.offset)
        if array.size != entry.num_elements:  # the file shrank under us
            raise TFBundleError(f"tensor {entry.name!r}: short read from {path}")
        array = array.reshape(entry.shape)
    if verify_checksums and entry.crc32c is not None:
        actual = crc32c(array) if entry.size else crc32c(b"")
        if actual != entry.crc32c:
            raise TFChecksumError(
                f"tensor {entry.name!r} in {path} (bytes [{entry.offset}, {end})) fails its CRC32C check: stored "
                f"{entry.crc32c:#010x}, computed {actual:#010x}; the data file is corrupt"
            )
    if entry.dtype.byteorder == ">" and not mmap:
        array = array.astype(entry.dtype.newbyteorder("="))
    return array


def load_tensor_bundle(
    prefix: str | os.PathLike, *, verify_checksums: bool = True, mmap: bool = False
) -> dict[str, np.ndarray]:
    """Read every tensor of the checkpoint ``prefix``: ``{name: array}``, in key order.

    Raises for any tensor this reader cannot materialise (see :func:`read_tensor`); to skip some, use
    :func:`read_bundle_index` and :func:`read_tensor` directly.
    """
    header, entries = _read_header_and_entries(prefix, verify_checksums)
    return {
        name: read_tensor(prefix, entry, verify_checksums=verify_checksums, mmap=mmap, num_shards=header.num_shards)
        for name, entry in entries.items()
    }
