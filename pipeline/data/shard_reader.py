"""Where a shard is read from and how a failed read is survived: a file in the dataset folder, a URL in
the folder on a server, or the output of the user's own command (`data.shard_url_command`, e.g.
`pipe:aws s3 cp s3://bucket/prefix/{shard} -`; only from the user's config or command line, never from
a card, which can come from anyone).

`ShardReader.records` yields records [first, end) of one shard with their position in it. A read that
fails (an HTTP error, a dropped connection, a stalled server, a command that exits non-zero, a shard
that ends before the card's count) re-opens the shard after a back-off and carries on from the first
record not yet given, `retries` times at most (for a server or a command; a file on disk is not
retried: its damage is not transient). Then the rest of the shard's records are given up: logged and
counted (`lost`), so the epoch goes on with fewer records and `PadForever` keeps every rank's steps
equal. A read never waits more than `timeout` seconds for a byte: never a hang.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import select
import subprocess
import tarfile
import time
import urllib.request
from typing import Callable, Iterator

from data_prep import DataError, DatasetCard, describe_error, is_url, safe_name, split_key
from pipeline.config import PIPE, template_problem

log = logging.getLogger(__name__)

READ_ERRORS = (OSError, EOFError, tarfile.TarError, http.client.HTTPException, subprocess.SubprocessError)
META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members: not part of any record


class ShortShard(OSError):
    """The shard ended before the record count its card gives."""


class ShardReader:
    """Opens shards (see the module docstring) and reads their records with bounded retries."""

    def __init__(self, command: str | None = None, retries: int = 3, wait: float = 1.0, timeout: float = 60.0):
        if command is not None and template_problem(command):
            raise DataError(f"data.shard_url_command {template_problem(command)}")
        self.command, self.retries, self.wait, self.timeout = command, retries, wait, timeout

    @classmethod
    def from_config(cls, cfg_data) -> "ShardReader":
        return cls(cfg_data.shard_url_command, cfg_data.shard_retries, cfg_data.shard_retry_wait,
                   cfg_data.shard_timeout)

    def locations(self, card: DatasetCard, split: str) -> list[str]:
        """Where each shard of the split is read: the user's command or URL template with the shard's name
        in it, else the card's own folder (on disk or on the server)."""
        if self.command is None:
            return card.shards(split)
        names = card.shard_names(split)
        unsafe = [n for n in names if not safe_name(n)]
        if unsafe:
            raise DataError(f"{card.where(card.root)} names shard {unsafe[0]!r}, which cannot be put into "
                            f"data.shard_url_command (letters, digits, '_.=+-' and '/' between parts only)")
        return [self.command.replace("{shard}", n) for n in names]

    def open(self, location: str):
        """A readable binary stream of the shard."""
        if location.startswith(PIPE):
            return CommandStream(location[len(PIPE):], self.timeout)
        if is_url(location):
            return WholeBody(urllib.request.urlopen(urllib.request.Request(
                location, headers={"User-Agent": "fico-pipeline"}), timeout=self.timeout))
        return open(location, "rb")

    def records(self, location: str, first: int, end: int, lost: Callable[[str, int, str], None]) -> Iterator[dict]:
        """Records [first, end) of the shard, each with `__position__`; `lost(location, count, why)` is
        told of records given up after the last try."""
        tries = 1 + (self.retries if location.startswith(PIPE) or is_url(location) else 0)
        position, why = first, ""  # the next record to give
        for attempt in range(tries):
            if attempt:
                time.sleep(self.wait * 2 ** (attempt - 1))
            try:
                for sample in self._samples(location, position, end):
                    position = sample["__position__"] + 1
                    yield sample
                return
            except READ_ERRORS as e:
                why = describe_error(e)
                log.warning("%s: read failed at record %d (%s), try %d of %d", location, position, why, attempt + 1,
                            tries)
        log.warning("%s: unreadable after %d tries (%s): %d records skipped", location, tries, why, end - position)
        lost(location, end - position, why)

    def _samples(self, location: str, start: int, end: int) -> Iterator[dict]:
        stream = self.open(location)
        try:
            position = -1
            for position, sample in enumerate(tar_records(stream, location)):
                if position >= end:
                    return
                if position >= start:
                    sample["__position__"] = position
                    yield sample
            if position + 1 < end:
                raise ShortShard(f"the shard ended after {position + 1} records; its card gives {end}")
        finally:
            stream.close()


def tar_records(stream, location: str) -> Iterator[dict]:
    """The records of a tar stream as webdataset groups them: consecutive members that share a key (the
    name up to the first dot after the last slash), {"__key__", "__url__", extension: bytes}."""
    sample: dict | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg() or META.match(member.name):
                continue
            key, ext = split_key(member.name)
            data = tar.extractfile(member).read()
            if sample is not None and key != sample["__key__"]:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": location}
            sample.setdefault(ext, data)
            tar.members = []  # a stream read: keep no index of what went by
    if sample is not None:
        yield sample


class WholeBody:
    """An HTTP response whose early end is an error: http.client's read(n) ends quietly where a server
    closed the connection before its Content-Length, which tar reading would take for the archive's end."""

    def __init__(self, response):
        self.response, self.got = response, 0
        length = response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read(self, size: int = -1) -> bytes:
        data = self.response.read(size)
        self.got += len(data)
        if not data and size != 0 and self.length is not None and self.got < self.length:
            raise http.client.IncompleteRead(b"", self.length - self.got)
        return data

    def close(self) -> None:
        self.response.close()


class CommandStream:
    """The stdout of a shell command (the user's own `data.shard_url_command`) as a binary stream: a read
    that waits more than `timeout` seconds, and a command that exits non-zero, raise OSError; closing
    before the end stops the command."""

    def __init__(self, command: str, timeout: float):
        self.command, self.timeout = command, timeout
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.fd = self.proc.stdout.fileno()

    def read(self, size: int = -1) -> bytes:
        chunks, want = [], size if size >= 0 else 1 << 62
        while want > 0:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"no data from `{self.command}` for {self.timeout:g} s")
            chunk = os.read(self.fd, min(want, 1 << 20))
            if not chunk:
                self._check_exit()
                break
            chunks.append(chunk)
            want -= len(chunk)
        return b"".join(chunks)

    def _check_exit(self) -> None:
        code = self.proc.wait(timeout=self.timeout)
        if code != 0:
            raise OSError(f"`{self.command}` exited with status {code}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
