"""Posting a batch's READs: one `make_prepped_xfer("READ", ...)` and `transfer` per src
rank, over lists prepared once per peer or for this READ alone.

A READ counts as possibly writing from the moment `transfer` accepted it: from then on
its handles are kept until it settles (`_transfer.py`), and the batch is tracked by the
dst endpoint (`_inflight.py`) whatever happens next, also when a later rank's post
fails. A READ whose post failed was never accepted and is released at once.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from ..errors import TransferError
from ._lists import LOCAL_AGENT, PeerLists
from ._pending import PendingRead, label
from ._transfer import Transfer, nixl_error

__all__ = ["start_reads", "post_one"]


def _post(endpoint: Any, peer: Any, transfer: Transfer, post: tuple, notif: bytes) -> str:
    """Make and post one READ: `post` is `(dst_descs, src_descs)` arrays, prepared for
    this READ alone, or `(PeerLists, dst_indices, src_indices)`."""
    agent = endpoint.agent
    if isinstance(post[0], PeerLists):
        lists, dst_index, src_index = post
        transfer.shared = lists.acquire()
        local, remote = lists.local, lists.remote
    else:
        dst_descs, src_descs = post
        local = agent.prep_xfer_dlist(LOCAL_AGENT, np.ascontiguousarray(dst_descs), endpoint.mem_type)
        transfer.handles.append(local)
        remote = agent.prep_xfer_dlist(peer.agent_name, np.ascontiguousarray(src_descs),
                                       peer.handshake.mem_type)
        transfer.handles.append(remote)
        dst_index = src_index = np.arange(len(dst_descs), dtype=np.int32)
    transfer.xfer = agent.make_prepped_xfer("READ", local, dst_index, remote, src_index, notif_msg=notif)
    transfer.load_id = endpoint.remotes.load_id(transfer.peer)
    state = agent.transfer(transfer.xfer)
    transfer.state = "active"  # accepted: from here on it may write until settled
    return state


def start_reads(endpoint: Any, peers: Mapping[int, Any], posts: Mapping[int, tuple], ids: tuple[str, ...],
                timeout_s: float, notes: Mapping[int, bytes], counts: tuple[int, int, int], *,
                blocks=(), layers=(), token: object = None) -> PendingRead:
    """Post one READ per src rank of `posts` (`{src_rank: post}`, see `_post`) with the
    notification `notes[src_rank]` riding on it (if any); the endpoint tracks the batch
    (fencing dst `blocks` x `layers`, or the landing buffer `token`) until it is received
    or settled.

    Raises:
        TransferError: NIXL refused to prepare or post a READ (READs posted before it
            stay tracked until they settle).
    """
    transfers: list[Transfer] = []
    pending = PendingRead(endpoint, transfers, ids, time.monotonic() + timeout_s, counts, time.perf_counter())
    for src_rank, post in sorted(posts.items()):
        peer = peers[src_rank]
        transfer = Transfer(src_rank, peer.agent_name)
        transfers.append(transfer)
        try:
            post_one(endpoint, peer, transfer, post, notes.get(src_rank, b""), label(ids))
        except TransferError:
            pending.cancel()  # READs posted before it stay tracked until they settle
            endpoint.inflight.add(pending, blocks=blocks, layers=layers, token=token)
            raise
    endpoint.inflight.add(pending, blocks=blocks, layers=layers, token=token)
    return pending


def post_one(endpoint: Any, peer: Any, transfer: Transfer, post: tuple, notif: bytes, request: str) -> None:
    """Post one READ (`_post`). A READ that NIXL did not accept is released at once.

    Raises:
        TransferError: NIXL refused to prepare or post it (naming `request` and the peer).
    """
    try:
        if _post(endpoint, peer, transfer, post, notif) == "ERR":
            raise TransferError(f"Posting the READ from src rank {transfer.src_rank} failed.",
                                request=request, peer=peer.agent_name)
    except Exception as error:
        if transfer.state != "active":
            transfer.finish("ended")  # never accepted: nothing can write
        if isinstance(error, TransferError):
            raise
        raise nixl_error(f"Could not post the READ from src rank {transfer.src_rank}", error,
                         request=request, peer=peer.agent_name) from error
