"""Sparse streams: a disk's content in and out of a host's volume, and in and out of a local file.

Disks move between hosts as sparse streams, source download piped into
destination upload, with a checksum of the logical content (holes count as
zeros) computed on both sides (:class:`Content`). :mod:`lifecycle.drivers.storage`
re-exports what is public here.
"""

from __future__ import annotations

import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from lifecycle.drivers._busy import patiently
from lifecycle.drivers.base import DiskSegments, Progress

try:
    import libvirt
except ImportError:  # pragma: no cover - the driver refuses to start without it
    libvirt = None

__all__ = ["CHUNK", "Content", "file_segments", "quietly", "read_volume", "volume_digest", "write_file", "write_volume"]

CHUNK = 256 * 1024  # libvirt's stream packets carry at most 256 KiB
_ZEROS = bytes(CHUNK)


class Content:
    """A checksum of a disk's logical content, holes counted as zeros, and its data bytes.

    CRC-32 (zlib), not a cryptographic digest: it checks that a copy arrived
    as it was sent (a sparse-handling bug, a short or misplaced write), where
    nobody forges bytes on purpose, at twice sha256's speed, and a move hashes
    every byte twice (sent, read back). With the length it is compared whole.
    """

    def __init__(self) -> None:
        self._crc = 0
        self.data_bytes = 0
        self.length = 0

    def add(self, segment: bytes | int) -> None:
        """Account one segment: bytes of data, or the length of a hole."""
        if isinstance(segment, int):
            self.length += segment
            left = segment
            while left > 0:
                step = min(left, CHUNK)
                self._crc = zlib.crc32(_ZEROS[:step], self._crc)
                left -= step
            return
        self._crc = zlib.crc32(segment, self._crc)
        self.data_bytes += len(segment)
        self.length += len(segment)

    def hexdigest(self) -> str:
        """Return the checksum so far, named: ``crc32:<8 hex digits>``."""
        return f"crc32:{self._crc:08x}"


def write_volume(conn: Any, vol: Any, segments: DiskSegments, progress: Progress | None, total: int = 0) -> Content:
    """Upload ``segments`` into ``vol`` as a sparse stream; return the content sent.

    ``progress(done, total)`` is called after each chunk with the data bytes
    so far (``total`` is the caller's estimate), and once at the end with
    the exact bytes moved as both; an exception it raises (a task taken
    over) aborts the stream.
    """
    stream = conn.newStream(0)
    patiently(vol.upload, stream, 0, 0, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
    content = Content()
    try:
        for segment in segments:
            content.add(segment)
            if isinstance(segment, int):
                stream.sendHole(segment, 0)
                continue
            view = memoryview(segment)
            while view:
                sent = stream.send(bytes(view) if len(view) != len(segment) else segment)
                view = view[sent:]
            if progress is not None:
                progress(content.data_bytes, total)
        stream.finish()
        if progress is not None:  # the total was the source's estimate; at the end, the exact bytes moved
            progress(content.data_bytes, content.data_bytes)
    except BaseException:
        quietly(stream.abort)
        raise
    return content


@contextmanager
def read_volume(conn: Any, vol: Any) -> Iterator[Iterator[bytes | int]]:
    """Yield the volume's content as sparse segments, read ahead on a thread while the caller writes."""
    stream = conn.newStream(0)
    patiently(vol.download, stream, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
    ahead: queue.Queue[bytes | int | BaseException | None] = queue.Queue(maxsize=16)
    stop = threading.Event()

    def pump() -> None:
        try:
            while not stop.is_set():
                got = stream.recvFlags(CHUNK, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
                if got == -3:
                    _put(ahead, stream.recvHole(0), stop)
                    continue
                if not got:
                    stream.finish()
                    _put(ahead, None, stop)
                    return
                _put(ahead, got, stop)
        except BaseException as exc:  # handed to the reader, which raises it on its thread
            quietly(stream.abort)
            _put(ahead, exc, stop)

    worker = threading.Thread(target=pump, name="volume-download", daemon=True)
    worker.start()

    def segments() -> Iterator[bytes | int]:
        while True:
            item = ahead.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    try:
        yield segments()
    finally:
        stop.set()
        if worker.is_alive():
            quietly(stream.abort)  # wakes a blocked receive
        worker.join(timeout=5)


def volume_digest(conn: Any, vol: Any) -> Content:
    """Read a volume back and return its content's digest."""
    content = Content()
    with read_volume(conn, vol) as segments:
        for segment in segments:
            content.add(segment)
    return content


def _put(ahead: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            ahead.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def file_segments(fd: int) -> Iterator[bytes | int]:
    """Yield a local file's content as sparse segments (data, and hole lengths)."""
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            data = size
        if data > pos:
            yield data - pos
            pos = data
            continue
        end = os.lseek(fd, pos, os.SEEK_HOLE)
        while pos < end:
            block = os.pread(fd, min(CHUNK, end - pos), pos)
            if not block:
                return
            yield block
            pos += len(block)


def write_file(path: Path, segments: Iterator[bytes | int]) -> None:
    """Write sparse segments to a new local file ``path``: holes stay holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for segment in segments:
            if isinstance(segment, int):
                os.lseek(fd, segment, os.SEEK_CUR)
                continue
            view = memoryview(segment)
            while view:
                view = view[os.write(fd, view) :]
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))  # a trailing hole still counts in the size
    finally:
        os.close(fd)


def quietly(call: Callable[..., Any], *args: Any) -> None:
    """Run a clean-up step after a failure that is already being raised; its own failure adds nothing."""
    with suppress(Exception):
        call(*args)
