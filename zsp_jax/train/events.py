"""TensorBoard event files of scalars, written without TensorFlow, tensorboardX or torch.

Why our own writer: the trainer's only TensorBoard need is scalars, TensorFlow is not a
dependency, and tensorboardX (not a dependency either) imports torch into the training process
(seconds of start-up, hundreds of MB). The format is small and stable: a file
``events.out.tfevents.<time>.<host>`` holding TFRecords (``uint64 length``, masked CRC-32C of the
length, the payload, masked CRC-32C of the payload), each an ``Event`` protocol buffer
(tensorboard/compat/proto/event.proto): ``wall_time`` (1, double), ``step`` (2, int64),
``file_version`` (3, string), ``summary`` (5: repeated ``Summary.Value`` (1) = ``tag`` (1, string),
``simple_value`` (2, float)), ``session_log`` (7: ``status`` (1), START = 1).

Each writer starts a new file. A resumed run writes a ``SessionLog.START`` at its first step: TensorBoard then drops the killed
run's events from that step on, so a curve shows each step once.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE: list[int] = []


def _crc32c_table() -> list[int]:
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    return _CRC_TABLE


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    table = _crc32c_table()
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord frame around ``payload``."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc(length)) + payload + struct.pack("<I", masked_crc(payload))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields: negative values as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def event(*, wall_time: float, step: int = 0, file_version: str | None = None,
          scalars: dict[str, float] | None = None, session_start: bool = False) -> bytes:
    """An ``Event`` message (serialised)."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step:
        out += _varint(2 << 3) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5)
                                       + struct.pack("<f", float(v))) for tag, v in scalars.items())
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(7, _varint(1 << 3) + _varint(1))
    return out


class EventWriter:
    """Appends scalar events to a new event file in ``logdir`` (created if needed).

    Args:
      logdir: the folder TensorBoard is pointed at.
      purge_step: a resumed run's first step: TensorBoard hides older events from that step on.
    """

    def __init__(self, logdir: str, *, purge_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        # TensorBoard reads a folder's files in name order: a zero-padded creation time in ns keeps them in order.
        self.path = os.path.join(logdir, f"events.out.tfevents.{time.time_ns():020d}.{socket.gethostname()}")
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(event(wall_time=now, file_version="brain.Event:2")))
        if purge_step:
            self._file.write(tfrecord(event(wall_time=now, step=purge_step, session_start=True)))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One event holding every ``tag -> value`` at ``step``."""
        self._file.write(tfrecord(event(wall_time=time.time(), step=step, scalars=values)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_events(path: str) -> list[dict]:
    """The events of a file written by ``EventWriter`` (CRCs checked): ``{"step", "wall_time", "scalars",
    "file_version", "session_start"}`` each (for tests and for people without TensorBoard)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        if struct.unpack_from("<I", data, pos + 8)[0] != masked_crc(data[pos:pos + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + length]
        if struct.unpack_from("<I", data, pos + 12 + length)[0] != masked_crc(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {pos}")
        out.append(_parse_event(payload))
        pos += 16 + length
    return out


def _fields(buf: bytes):
    """(field number, wire type, value) of a serialised message (value: int, or bytes for wire types 1, 2, 5)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _parse_event(payload: bytes) -> dict:
    ev: dict = {"step": 0, "scalars": {}, "file_version": None, "session_start": False}
    for number, _, value in _fields(payload):
        if number == 1:
            ev["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            ev["step"] = value
        elif number == 3:
            ev["file_version"] = value.decode()
        elif number == 5:
            for _, _, v in _fields(value):
                tag, simple = None, None
                for n, _, x in _fields(v):
                    if n == 1:
                        tag = x.decode()
                    elif n == 2:
                        simple = struct.unpack("<f", x)[0]
                ev["scalars"][tag] = simple
        elif number == 7:
            ev["session_start"] = any(n == 1 and x == 1 for n, _, x in _fields(value))
    return ev
