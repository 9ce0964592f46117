"""The spool's record format: what a segment file holds, byte for byte.

A segment is :data:`FILE_MAGIC` followed by records. Each record is :data:`REC_MAGIC` (``b"CTXR"``),
u32 payload length, u32 span count, u64 creation time (ns since the epoch), u32 CRC-32 of those three
fields and the payload, then the payload (an OTLP ``ExportTraceServiceRequest``), all little-endian.

A damaged stretch is skipped and counted once: the reader looks for the next record magic whose checksum
holds, so the rest of the segment is still read.

>>> data = segment(b"payload", 3, 1)
>>> parse_records(data)
([Record(payload=b'payload', spans=3, created_ns=1)], 0)
>>> parse_records(data[:-1] + b"?")
([], 1)
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["FILE_MAGIC", "REC_HEAD", "REC_MAGIC", "Record", "encode_record", "parse_records", "segment"]

FILE_MAGIC = b"CTXSPL1\n"
REC_MAGIC = b"CTXR"
REC_HEAD = struct.Struct("<4sIIQI")
_REC_FIELDS = struct.Struct("<IIQ")


class Record(NamedTuple):
    """One spooled OTLP request: its bytes, how many spans it holds, and when it was first spooled."""

    payload: bytes
    spans: int
    created_ns: int


def encode_record(payload: bytes, span_count: int, created_ns: int) -> bytes:
    """One record's bytes (header with checksum, then ``payload``)."""
    fields = _REC_FIELDS.pack(len(payload), span_count, created_ns)
    crc = zlib.crc32(payload, zlib.crc32(fields))
    return REC_HEAD.pack(REC_MAGIC, len(payload), span_count, created_ns, crc) + payload


def segment(payload: bytes, span_count: int, created_ns: int) -> bytes:
    """A whole segment file holding one record."""
    return FILE_MAGIC + encode_record(payload, span_count, created_ns)


def segment_of(records: Iterable[Record]) -> bytes:
    """A whole segment file holding ``records``, in order."""
    return FILE_MAGIC + b"".join(encode_record(*r) for r in records)


def parse_records(data: bytes) -> tuple[list[Record], int]:
    """The valid records of segment ``data`` and how many damaged stretches were skipped."""
    records: list[Record] = []
    corrupt = 0
    in_damage = False
    pos = len(FILE_MAGIC)
    size = len(data)
    while pos < size:
        end = pos + REC_HEAD.size
        if end <= size:
            magic, length, spans, created, crc = REC_HEAD.unpack_from(data, pos)
            if magic == REC_MAGIC and end + length <= size:
                payload = data[end : end + length]
                fields = _REC_FIELDS.pack(length, spans, created)
                if zlib.crc32(payload, zlib.crc32(fields)) == crc:
                    records.append(Record(payload, spans, created))
                    pos = end + length
                    in_damage = False
                    continue
        if not in_damage:
            corrupt += 1
            in_damage = True
        nxt = data.find(REC_MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return records, corrupt
