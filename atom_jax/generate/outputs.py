"""The output JSONL: what a previous run already finished (for resume), repairing a torn last
line, and appending one flushed line per finished request."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import time


class OutputError(RuntimeError):
    """The output cannot be written (missing directory, a directory, no permission) or another
    run holds it: one line for the user, found before the model loads."""


class OutputLock:
    """An exclusive lock (flock) on the output file for the whole run, so two runs on one output
    cannot both append (each would write every id). Taken before anything is read or loaded; the
    file is created if missing and removed again if the run ends without writing to it. The
    operating system drops the lock when the process exits, however it exits."""

    def __init__(self, path: str):
        self.path = path
        self._created = not os.path.lexists(path)
        self._f = self._open_locked()

    def _open_locked(self):
        try:
            f = open(self.path, "ab")
        except IsADirectoryError:
            raise OutputError(f"--output {self.path} is a directory") from None
        except OSError as e:
            raise OutputError(f"cannot write --output {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputError(f"--output {self.path} is being written by another run (it holds "
                                  "the file's lock); wait for it to finish, or choose another output") from None
            raise OutputError(f"cannot lock --output {self.path}: {e.strerror}") from None
        return f

    def relock(self) -> None:
        """After the file was replaced (an atomic rewrite): lock the new file, then let the old go."""
        old, self._f = self._f, self._open_locked()
        old.close()

    def release(self) -> None:
        if self._f.closed:
            return
        try:
            if self._created and os.fstat(self._f.fileno()).st_size == 0:
                os.unlink(self.path)  # nothing was written: leave no empty file behind
        except OSError:
            pass
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


@dataclasses.dataclass
class ExistingOutput:
    done_keys: set[str]  # json.dumps(id) of every complete result line
    keep_bytes: int  # file length up to the last good line; anything after it is torn
    torn_tail: bool  # the last line has no newline: a write cut short by a crash
    error_keys: set[str]  # ids whose result is finish_reason "error" (for --retry-errors)
    corrupt_lines: list[int]  # complete lines that are not result objects (left alone)


def scan_output(path: str) -> ExistingOutput:
    """Read-only: nothing is changed until `prepare_output` (so --strict can still refuse)."""
    state = ExistingOutput(set(), 0, False, set(), [])
    if not os.path.exists(path):
        return state
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            offset += len(raw)
            if not raw.endswith(b"\n"):
                # Every line is written with its newline in one write, so a line without one
                # was cut short; its request is run again.
                state.torn_tail = True
                break
            state.keep_bytes = offset
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = json.dumps(rec["id"])
            except (ValueError, KeyError, TypeError):
                state.corrupt_lines.append(line_no)
                continue
            state.done_keys.add(key)
            if rec.get("finish_reason") == "error":
                state.error_keys.add(key)
    return state


def prepare_output(path: str, existing: ExistingOutput, retry_errors: bool, lock: OutputLock | None = None) -> None:
    """Cut a torn last line off; with retry_errors, drop the error results so they rerun and
    the file still holds one line per id. Atomic rewrite (temp file + rename) for the latter;
    `lock` then moves to the new file."""
    if retry_errors and existing.error_keys:
        tmp = path + ".tmp"
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            remaining = existing.keep_bytes
            for raw in src:
                if remaining <= 0:
                    break
                remaining -= len(raw)
                if not _is_error_result(raw):
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
        if lock is not None:
            lock.relock()
    elif existing.torn_tail:
        os.truncate(path, existing.keep_bytes)


def _is_error_result(raw: bytes) -> bool:
    try:
        return json.loads(raw).get("finish_reason") == "error"
    except (ValueError, AttributeError):
        return False


class ResultWriter:
    """Appends one JSON line per result and flushes it at once, so a killed process loses
    only the requests still in flight. fsync (which survives a power cut, not just a process
    kill) costs a disk round trip, so it runs every `fsync_interval_s` and on close."""

    def __init__(self, path: str, fsync_interval_s: float = 5.0):
        self._f = open(path, "a", encoding="utf-8")
        self._fsync_interval_s = fsync_interval_s
        self._last_fsync = time.monotonic()

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a decoder: fall back to \u escapes
            line = json.dumps(record)
        self._f.write(line + "\n")
        self._f.flush()
        if time.monotonic() - self._last_fsync >= self._fsync_interval_s:
            self._fsync()

    def _fsync(self) -> None:
        os.fsync(self._f.fileno())
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._fsync()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def result_record(req, output, has_tokenizer: bool) -> dict:
    """One output line from a finished RequestOutput."""
    prompt_tokens = len(req.prompt_token_ids)
    completion = len(output.token_ids)
    rec = {"id": req.id}
    if has_tokenizer:
        rec["text"] = output.text
    if getattr(output, "message", None) is not None:  # messages: content, reasoning, tool calls
        rec["message"] = output.message
    rec.update(token_ids=list(output.token_ids), finish_reason=output.finish_reason)
    if output.finish_reason == "error":
        rec["error"] = getattr(output, "error", None) or "the request failed inside the engine"
    rec["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}
    return rec


def error_record(req, message: str, has_tokenizer: bool, token_ids=()) -> dict:
    """An output line for a request the engine failed outside its own error handling."""
    prompt_tokens = len(req.prompt_token_ids) if req.prompt_token_ids is not None else 0
    rec = {"id": req.id}
    if has_tokenizer:
        rec["text"] = ""
    rec.update(token_ids=list(token_ids), finish_reason="error", error=message,
               usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                      "total_tokens": prompt_tokens + len(token_ids)})
    return rec
