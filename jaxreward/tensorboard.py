"""TensorBoard scalars without TensorFlow: the tfevents record format written directly (stdlib only).

A tfevents file is a sequence of TFRecords, each `len:uint64 | masked_crc32c(len):uint32 | data |
masked_crc32c(data):uint32`, whose data is a serialized `tensorflow.Event` protobuf. Scalars need only
four protobuf fields, so we encode them by hand instead of pulling in TensorFlow or tensorboardX:
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }

  writer = Writer(workdir)            # events.out.tfevents.<time>.<host> in workdir
  writer.scalars(step, {"loss": 0.5, "val/accuracy": 0.9})
  writer.close()
`read_scalars(path)` parses such a file back (checking every CRC); the tests use it.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected.
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # Negative int64 values are encoded as their 64-bit two's complement.
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, scalars: dict | None = None, file_version: str | None = None) -> bytes:
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(int(step))
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _field_bytes(5, values)
  return out


def frame(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


class Writer:
  """Appends scalar summaries to a new event file in `logdir`; flushed after every call."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = None
    self._file = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      # A resumed run starts a new file; TensorBoard merges every file of a directory by step.
      self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
      self._file = open(self.path, "ab")
      self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    self._file.write(frame(event))
    self._file.flush()

  def scalars(self, step: int, values: dict) -> None:
    """Writes every finite number in `values` (None, strings, dicts and NaN/inf are skipped)."""
    if not self.enabled:
      return
    kept = {}
    for tag, value in values.items():
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        continue
      kept[str(tag)] = float(value)
    if kept:
      self._write(encode_event(time.time(), step, kept))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------------------------
# Reading back (tests, quick checks)
# ---------------------------------------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return result, pos


def _fields(buf: bytes):
  """(field number, wire type, value) of one protobuf message; value is int or bytes."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      size, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield number, wire, value


def read_records(path: str) -> list[bytes]:
  out = []
  with open(path, "rb") as f:
    buf = f.read()
  pos = 0
  while pos < len(buf):
    header = buf[pos:pos + 8]
    (size,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
    data = buf[pos + 12:pos + 12 + size]
    (data_crc,) = struct.unpack("<I", buf[pos + 12 + size:pos + 16 + size])
    if crc != masked_crc(header) or data_crc != masked_crc(data):
      raise ValueError(f"{path}: CRC mismatch in the record at byte {pos}")
    out.append(data)
    pos += 16 + size
  return out


def read_scalars(path: str) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in an event file, in file order."""
  out = []
  for record in read_records(path):
    step, summary = 0, None
    for number, _, value in _fields(record):
      if number == 2:
        step = value - (1 << 64) if value >= 1 << 63 else value
      elif number == 5:
        summary = value
    if summary is None:
      continue
    for number, _, value in _fields(summary):
      if number != 1:
        continue
      tag, scalar = None, None
      for n, _, v in _fields(value):
        if n == 1:
          tag = v.decode()
        elif n == 2:
          (scalar,) = struct.unpack("<f", v)
      out.append((step, tag, scalar))
  return out
