"""Integrity mode, reader side: fetch the src ranks' digests before a batch is posted,
and after it landed, compare and locate corrupted bytes. The src side is
`_integrity_src.py` (which also describes the requests); pure digests are in
`ssm_split.integrity`.

A batch larger than one request may cover (`MAX_PAGES_PER_REQUEST` pages,
`MAX_DIGEST_NBYTES` bytes) is asked for in several requests, up to `WINDOW` of them
outstanding per src rank at once, over the reader's side channel client.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from ..errors import IntegrityError, StaleHandshakeError, TransferError
from ..integrity._digests import (digest_bytes, dst_digests, locate, merge_src_digests, mismatches, plan_pieces,
                                  pieces_from)
from ._handshake import spec_fingerprint
from ._integrity_src import MAX_DIGEST_NBYTES, MAX_PAGES_PER_REQUEST, MAX_PIECES_PER_REQUEST, page_memory

__all__ = ["fetch_expected", "verify", "WINDOW"]

WINDOW = 4
"""Digest requests one reader keeps outstanding per src rank."""


def _common(endpoint: Any, peer: Any) -> dict:
    return {"fingerprint": spec_fingerprint(endpoint.spec), "dst_tp": endpoint.tp,
            "dst_rank": endpoint.rank, "generation": peer.handshake.generation}


def _refused(peer: Any, op: str, reply: Any, label: str) -> TransferError:
    cls = StaleHandshakeError if reply.kind == "stale" else TransferError
    return cls(f"src rank {peer.handshake.rank} refused the integrity {op} request ({reply.kind}): "
               f"{reply.error}", request=label, peer=peer.agent_name)


def _ask_all(client: Any, peer: Any, op: str, bodies: list[dict], deadline: float, label: str) -> list:
    """Send `bodies` as `op` requests, `WINDOW` at a time; retry "busy" answers until the
    deadline. Returns the ok replies in order."""
    replies: list = [None] * len(bodies)
    outstanding: dict[int, int] = {}
    todo = list(range(len(bodies)))
    try:
        while todo or outstanding:
            while todo and len(outstanding) < WINDOW:
                index = todo.pop(0)
                ticket = client.send(op, bodies[index], timeout_s=max(deadline - time.monotonic(), 0.001))
                outstanding[ticket] = index
            ticket, reply = client.recv()
            index = outstanding.pop(ticket)
            if reply.ok:
                replies[index] = reply
            elif reply.kind == "busy" and time.monotonic() < deadline:
                todo.insert(0, index)
                time.sleep(0.005)
            else:
                raise _refused(peer, op, reply, label)
    except TransferError as error:
        if isinstance(error, StaleHandshakeError) or error.request == label:
            raise
        raise TransferError(f"The integrity {op} request to src rank {peer.handshake.rank} at "
                            f"{client.address} failed: {error.args[0]}", request=label,
                            peer=peer.agent_name) from None
    finally:
        for ticket in outstanding:  # abandoned on error: their answers will be dropped
            client.forget(ticket)
    return replies


def fetch_expected(endpoint: Any, plan: Any, peers: Mapping[int, Any], clients: Mapping[int, Any],
                   layers: list[int], src_blocks: list[int], deadline: float, label: str) -> np.ndarray:
    """The digests every src rank of `plan` promises for the batch, in dst piece order:
    shape `(layers, requests, pieces)`."""
    per_rank = {}
    for rank in plan.src_ranks:
        peer, client = peers[rank], clients.get(rank)
        if client is None:
            raise TransferError(f"Integrity mode needs the side channel of src rank {rank}: "
                                f"connect with connect_to(host, port).", request=label, peer=peer.agent_name)
        pieces = [plan_pieces(plan)[i] for i in pieces_from(plan, rank)]
        page_nbytes = max(1, sum(p.nbytes for p in pieces))
        per_request = max(1, min(MAX_PAGES_PER_REQUEST, MAX_DIGEST_NBYTES // page_nbytes) // max(1, len(layers)))
        common = _common(endpoint, peer)
        bodies = [{**common, "layers": layers, "src_blocks": src_blocks[i: i + per_request]}
                  for i in range(0, len(src_blocks), per_request)]
        parts = []
        for body, reply in zip(bodies, _ask_all(client, peer, "digests", bodies, deadline, label)):
            shape = (len(layers), len(body["src_blocks"]), len(pieces))
            if reply.body.get("shape") != list(shape) or len(reply.payload) != 8 * int(np.prod(shape)):
                raise TransferError(f"src rank {rank} answered digests of shape {reply.body.get('shape')}, "
                                    f"expected {list(shape)}.", request=label, peer=peer.agent_name)
            parts.append(np.frombuffer(reply.payload, dtype="<u8").reshape(shape))
        per_rank[rank] = np.concatenate(parts, axis=1)
    return merge_src_digests(plan, per_rank)


def verify(endpoint: Any, plan: Any, expected: np.ndarray, pairs: np.ndarray, row_ids: list,
           layers: list[int], peers: Mapping[int, Any], clients: Mapping[int, Any], label: str,
           deadline: float) -> None:
    """Compare the received pages with `expected`; raise `IntegrityError` naming every
    differing byte of up to `MAX_PIECES_PER_REQUEST` corrupted pieces."""
    dst_memory = page_memory(endpoint)
    bad = mismatches(expected, dst_digests(plan, dst_memory, pairs[:, 1], layers))
    if not bad.size:
        return
    pieces = plan_pieces(plan)
    shown = bad[:MAX_PIECES_PER_REQUEST].tolist()
    truth: dict[tuple[int, int, int], np.ndarray] = {}
    for rank in sorted({pieces[j].src_rank for _, _, j in shown}):
        wanted = [(i, n, j) for i, n, j in shown if pieces[j].src_rank == rank]
        body = {**_common(endpoint, peers[rank]), "items": [[layers[i], int(pairs[n, 0]), j] for i, n, j in wanted]}
        try:
            reply, = _ask_all(clients[rank], peers[rank], "pieces", [body], deadline + 10.0, label)
        except (TransferError, KeyError):
            continue  # report the pieces unlocated
        position = 0
        for i, n, j in wanted:
            truth[(i, n, j)] = np.frombuffer(reply.payload, np.uint8, pieces[j].nbytes, position)
            position += pieces[j].nbytes
    corruptions = []
    for i, n, j in shown:
        piece, want = pieces[j], truth.get((i, n, j))
        got = dst_memory.page(layers[i], int(pairs[n, 1]))[piece.dst_offset: piece.dst_offset + piece.nbytes]
        if want is None or digest_bytes(np.ascontiguousarray(want)) != int(expected[i, n, j]):
            want = None  # the src's bytes changed since it digested them, or could not be fetched
        corruptions.extend(locate(plan, j, request=row_ids[n], layer=layers[i], src_block=int(pairs[n, 0]),
                                  dst_block=int(pairs[n, 1]), expected=want, received=got))
    first = corruptions[0] if corruptions else None
    peer = peers[pieces[shown[0][2]].src_rank].agent_name
    raise IntegrityError(f"{bad.shape[0]} piece(s) of the batch arrived corrupted; first: {first}. The "
                         f"batch is not received and the src was not notified; read it again.",
                         request=label, peer=peer, corruptions=tuple(corruptions))
