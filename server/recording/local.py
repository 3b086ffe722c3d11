"""Recordings as files in a local directory: `<directory>/<tenant>/<recording_id>.jsonl`, one
folder per tenant so that one tenant's recordings can be found, handed over or erased together.
Retention is the file's age (its last write)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import IO, Final

from streamgate_protocol.recording import Header

log = logging.getLogger("streamgate.recording")

SUFFIX: Final = ".jsonl"
# Writes are buffered: a 20 ms audio frame is about 900 bytes of JSON, so one write(2) carries
# about a second of a session's audio, and the event loop never waits on a disk per frame.
WRITE_BUFFER_BYTES: Final = 64 * 1024
FILE_MODE: Final = 0o600
FOLDER_MODE: Final = 0o700
_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def tenant_folder(tenant_id: str) -> str:
    """The tenant id when it is a safe file name, else a digest of it (ids come from the
    database or the config, but a path must never be built from an unchecked string)."""
    if _SAFE.fullmatch(tenant_id) and tenant_id not in (".", ".."):
        return tenant_id
    return "t-" + hashlib.sha256(tenant_id.encode()).hexdigest()[:32]


class LocalSink:
    __slots__ = ("_file", "name")

    def __init__(self, path: Path) -> None:
        # O_EXCL: a recording is never appended to or overwritten (ids are random); 0600: a
        # voice is personal data, readable by the server's user only whatever the umask.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._file: IO[bytes] = os.fdopen(fd, "wb", buffering=WRITE_BUFFER_BYTES)
        self.name = str(path)

    def write(self, line: bytes) -> None:
        self._file.write(line)

    def close(self) -> None:
        self._file.close()


class LocalRecordingStore:
    def __init__(self, directory: Path, retention_days: float) -> None:
        self.directory = directory
        self.retention_s = retention_days * 86400.0

    def open(self, header: Header) -> LocalSink:
        folder = self.directory / tenant_folder(header.tenant_id)
        folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        return LocalSink(folder / f"{header.recording_id}{SUFFIX}")

    def sweep(self, now: float) -> int:
        """Delete every recording whose last write is older than the retention period (several
        workers may sweep the same directory at once: a file another one deleted is skipped).
        Tenant folders stay (removing one could race a recording being opened in it)."""
        cutoff = now - self.retention_s
        deleted = 0
        if not self.directory.is_dir():
            return 0
        for folder in self.directory.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.glob(f"*{SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        deleted += 1
        if deleted:
            log.info("recordings deleted after retention", extra={"deleted": deleted})
        return deleted
