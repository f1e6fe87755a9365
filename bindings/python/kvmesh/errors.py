"""Exceptions for kvmesh status codes (see KvmeshStatus in kvmesh.h)."""

from __future__ import annotations


class KvmeshError(Exception):
    """A call into libkvmesh failed. ``status`` is the KvmeshStatus code."""

    status = -16

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(KvmeshError, ValueError):
    status = -1


class NullPointer(KvmeshError, ValueError):
    status = -2


class InvalidHandle(KvmeshError, ValueError):
    status = -3


class AbiMismatch(KvmeshError):
    status = -4


class BufferTooSmall(KvmeshError):
    status = -5


class LayoutError(KvmeshError, ValueError):
    status = -6


class OutOfRange(KvmeshError, IndexError):
    status = -7


class Timeout(KvmeshError, TimeoutError):
    status = -8


class Cancelled(KvmeshError):
    status = -9


class PeerLost(KvmeshError, ConnectionError):
    status = -10


class Unreachable(KvmeshError, ConnectionError):
    status = -11


class Unsupported(KvmeshError, NotImplementedError):
    status = -12


class Busy(KvmeshError):
    status = -13


class IoError(KvmeshError, OSError):
    status = -14


class RemoteError(KvmeshError):
    status = -15


class InternalError(KvmeshError):
    status = -16


class NotFound(KvmeshError, LookupError):
    """Not stored (any more), or a lookup's lease ran out."""

    status = -17


class IntegrityError(KvmeshError):
    """Bytes did not match their checksum; nothing was trusted."""

    status = -18


class NoSpace(KvmeshError):
    """No store peer had room."""

    status = -19


BY_STATUS: dict[int, type[KvmeshError]] = {
    c.status: c
    for c in (
        InvalidArgument,
        NullPointer,
        InvalidHandle,
        AbiMismatch,
        BufferTooSmall,
        LayoutError,
        OutOfRange,
        Timeout,
        Cancelled,
        PeerLost,
        Unreachable,
        Unsupported,
        Busy,
        IoError,
        RemoteError,
        InternalError,
        NotFound,
        IntegrityError,
        NoSpace,
    )
}


def from_status(status: int, message: str) -> KvmeshError:
    cls = BY_STATUS.get(status, KvmeshError)
    return cls(message or f"kvmesh status {status}", status)
