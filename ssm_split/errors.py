"""The typed errors of ssm_split.

Every error a user can trigger is a subclass of `SsmSplitError`. Errors about bad
input are also `ValueError`s, so callers that already catch `ValueError` keep working.
Messages say what was rejected, why, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "SsmSplitError",
    "SpecError",
    "ShardingError",
    "SpecMismatchError",
    "PlanError",
    "BlockRangeError",
    "StateError",
    "HandshakeError",
    "TransferError",
    "StaleHandshakeError",
    "IntegrityError",
    "SetupError",
]


class SsmSplitError(Exception):
    """Base class of every error raised by ssm_split."""


class SpecError(SsmSplitError, ValueError):
    """A state spec (or a model config it was built from) has an impossible field."""


class ShardingError(SpecError):
    """A spec cannot be sharded on the requested number of tensor-parallel ranks."""


class SpecMismatchError(SpecError):
    """The src and dst sides describe states that cannot be copied into each other."""


class PlanError(SsmSplitError, ValueError):
    """A plan was asked for, or applied, with arguments that do not fit it."""


class BlockRangeError(PlanError):
    """A block id or layer index lies outside the memory a side registered."""


class StateError(SsmSplitError, ValueError):
    """A state or a list of pages does not fit its spec: wrong part names, shapes or
    dtypes, the wrong number of pages, pages too short, or replicas that disagree."""


class HandshakeError(SsmSplitError, ValueError):
    """A handshake could not be decoded, or does not match the reader's own state."""


class TransferError(SsmSplitError, RuntimeError):
    """A transfer failed, timed out, or its peer went away; the data is not valid.

    Attributes:
        request: the request id the failed transfer belonged to, or None.
        peer: the name of the remote agent involved, or None.
    """

    def __init__(self, message: str, *, request: str | None = None, peer: str | None = None):
        detail = []
        if request is not None:
            detail.append(f"request {request!r}")
        if peer is not None:
            detail.append(f"peer {peer!r}")
        prefix = f"[{', '.join(detail)}] " if detail else ""
        super().__init__(prefix + message)
        self.request = request
        self.peer = peer


class StaleHandshakeError(TransferError):
    """The src deregistered or re-registered its pages after the handshake the reader
    holds, so the bytes read may come from freed or re-used memory: they are not valid.
    Fetch a new handshake (`Reader.connect_to`) and read again."""


class IntegrityError(TransferError):
    """Bytes arrived that differ from the src's digest of them (integrity mode).

    Attributes:
        corruptions: the first corrupted bytes found (`ssm_split.integrity.Corruption`), each with
            its request, layer, segment and offset.
    """

    def __init__(self, message: str, *, request: str | None = None, peer: str | None = None,
                 corruptions: tuple = ()):
        super().__init__(message, request=request, peer=peer)
        self.corruptions = tuple(corruptions)


class SetupError(SsmSplitError, RuntimeError):
    """The machine lacks what a run asked for: NIXL, a CUDA GPU, or torch built with CUDA.
    The message names what is missing and how to install it or avoid needing it."""
