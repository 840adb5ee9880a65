"""Handshake encoding, strict decoding and the handshake over the side channel (no NIXL
needed; the side channel itself is tested in test_side_channel.py)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import threading

import pytest

from ssm_split import Buffer, GDNSpec, Mamba2Spec, RegionSet, TransferError
from ssm_split.errors import HandshakeError
from ssm_split.specs import stack_layers
from ssm_split.nixl_backend import HANDSHAKE_VERSION, Handshake, decode_handshake, spec_fingerprint
from ssm_split.nixl_backend._handshake import MAX_HANDSHAKE_NBYTES, _canonical
from ssm_split.nixl_backend._sidechannel import SideChannelServer
from ssm_split.nixl_backend._sideclient import SideChannelClient, fetch_handshake, fetch_handshake_bytes

SPEC = Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=4, ssm_dtype="float32")


def make_handshake(**changes) -> Handshake:
    fields = dict(spec=SPEC, tp=2, rank=1, agent_name="prefill-1", mem_type="DRAM",
                  regions=RegionSet.packed(0x7F0000001000, num_layers=3, num_blocks=5, page_nbytes=640),
                  scratch=Buffer(0x7F0000100000, 64), agent_metadata=b"\x00nixl-metadata\xff" * 7,
                  generation=3)
    fields.update(changes)
    return Handshake(**fields)


def reencode(data: bytes, edit) -> bytes:
    """Decode the JSON, apply `edit(envelope)`, and re-sign the body so only the edit
    differs (a peer that lies consistently, not a corrupted message)."""
    envelope = json.loads(data)
    edit(envelope)
    envelope["sha256"] = hashlib.sha256(_canonical(envelope["body"])).hexdigest()
    return _canonical(envelope)


def test_round_trip_keeps_every_field():
    hs = make_handshake(spec=GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=4,
                                     conv_layout="SD", spec_tokens=2))
    back = decode_handshake(hs.encode())
    assert back == hs and back.fingerprint == spec_fingerprint(hs.spec)
    assert json.loads(hs.encode())["version"] == HANDSHAKE_VERSION


def test_a_stacked_page_spec_round_trips_and_has_its_own_fingerprint():
    stacked = stack_layers(SPEC, 6)
    hs = make_handshake(spec=stacked, regions=RegionSet.packed(0x7F0000001000, num_layers=1, num_blocks=5,
                                                               page_nbytes=6 * 640))
    body = json.loads(hs.encode())["body"]
    assert body["spec"]["stacked_layers"] == 6 and body["spec"]["family"] == "mamba2"
    back = decode_handshake(hs.encode())
    assert back == hs and back.spec == stacked
    assert len({spec_fingerprint(stacked), spec_fingerprint(SPEC), spec_fingerprint(stack_layers(SPEC, 5))}) == 3
    assert "stacked_layers" not in json.loads(make_handshake().encode())["body"]["spec"]  # per layer: unchanged
    for bad, match in ((0, "num_layers must be an int >= 1"), (True, "num_layers must be an int"),
                       ("6", "num_layers must be an int")):
        with pytest.raises(HandshakeError, match=match):
            decode_handshake(reencode(hs.encode(), _set(["body", "spec", "stacked_layers"], bad)))


def test_fingerprint_changes_with_any_spec_field():
    base = spec_fingerprint(SPEC)
    assert spec_fingerprint(Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=4,
                                       ssm_dtype="float32")) == base
    for change in ({"num_groups": 2}, {"ssm_dtype": "bfloat16"}, {"conv_layout": "SD"}, {"spec_tokens": 1}):
        assert spec_fingerprint(dataclasses.replace(SPEC, **change)) != base


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d[: len(d) // 2], "not UTF-8 JSON"),
    (lambda d: b"", "not UTF-8 JSON"),
    (lambda d: b"\xff\xfe" + d, "not UTF-8 JSON"),
    (lambda d: b"[" * 100000 + b"]" * 100000, "not UTF-8 JSON|Not an ssm_split handshake"),
    (lambda d: d.replace(b'"tp":2', b'"tp":3'), "digest does not match"),
    (lambda d: b'{"format":"other"}', "Not an ssm_split handshake"),
])
def test_corrupted_bytes_are_rejected(mutate, match):
    with pytest.raises(HandshakeError, match=match):
        decode_handshake(mutate(make_handshake().encode()))


def test_oversized_and_non_bytes_input():
    with pytest.raises(HandshakeError, match="exceeds the limit"):
        decode_handshake(b" " * (MAX_HANDSHAKE_NBYTES + 1))
    with pytest.raises(HandshakeError, match="must be bytes"):
        decode_handshake("{}")


def _set(path, value):
    def edit(envelope):
        target = envelope
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set(["version"], HANDSHAKE_VERSION + 1), "version 3 is not supported"),
    (_set(["body", "tp"], True), "`tp` must be an int"),
    (_set(["body", "rank"], 2), "rank 2 is not below its tp 2"),
    (_set(["body", "generation"], 0), "`generation` must be an int in \\[1"),
    (_set(["body", "mem_type"], "GPU"), "mem_type must be one of"),
    (_set(["body", "agent_name"], ""), "agent_name must be a str"),
    (_set(["body", "extra"], 1), "unexpected keys \\['extra'\\]"),
    (_set(["body", "spec", "family"], "rwkv"), "family 'rwkv' is unknown"),
    (_set(["body", "spec", "fields", "num_groups"], 3), "spec is invalid"),
    (_set(["body", "spec", "fields", "num_groups"], 2.0), "must be an int or str"),
    (_set(["body", "fingerprint"], "0" * 64), "fingerprint does not match"),
    (_set(["body", "regions", "layers"], [[0, 640, 320, 5, 0]]), "regions or metadata are invalid"),
    (_set(["body", "regions", "buffers"], [[1, 2]]), "rows of 3 ints"),
    (_set(["body", "regions", "layers"], []), "list of 1..65536 rows"),
    (_set(["body", "scratch"], [0, 0, 0]), "regions or metadata are invalid"),
    (_set(["body", "agent_metadata"], "not base64!"), "regions or metadata are invalid"),
    (_set(["body", "agent_metadata"], ""), "agent_metadata must be non-empty"),
])
def test_consistently_wrong_fields_are_rejected(edit, match):
    with pytest.raises(HandshakeError, match=match):
        decode_handshake(reencode(make_handshake().encode(), edit))


def test_metadata_survives_base64():
    raw = bytes(range(256)) * 3
    hs = make_handshake(agent_metadata=raw)
    body = json.loads(hs.encode())["body"]
    assert base64.b64decode(body["agent_metadata"]) == raw
    assert decode_handshake(hs.encode()).agent_metadata == raw


# --- the handshake over the side channel ----------------------------------------------


def handshake_server(provider, **options) -> SideChannelServer:
    """A side channel serving `provider()` as its handshake (as an Endpoint's does)."""
    server = SideChannelServer("127.0.0.1", 0, **options)
    server.add_handler("handshake", lambda request, payload, context: ({}, provider()), inline=True)
    return server


def test_side_channel_serves_the_current_handshake():
    current = [make_handshake(generation=1).encode()]
    server = handshake_server(lambda: current[0])
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        assert decode_handshake(fetch_handshake_bytes(host, port)).generation == 1
        current[0] = make_handshake(generation=2).encode()  # re-registered: a new snapshot
        assert decode_handshake(fetch_handshake_bytes(host, port)).generation == 2
    finally:
        server.close()


def test_side_channel_drops_other_traffic_and_keeps_serving():
    server = handshake_server(lambda: b"the handshake")
    try:
        with socket.create_connection(server.address, timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not ZeroMQ: never answered
        assert fetch_handshake_bytes(*server.address) == b"the handshake"
    finally:
        server.close()


def test_nobody_listening_is_a_transfer_error_naming_the_address():
    server = handshake_server(lambda: b"x")
    host, port = server.address
    server.close()
    with pytest.raises(TransferError, match=f"Could not fetch a handshake from 127.0.0.1:{port}") as info:
        fetch_handshake_bytes(host, port, timeout_s=1)
    assert info.value.peer == f"127.0.0.1:{port}"


def test_an_oversized_handshake_is_a_handshake_error():
    server = handshake_server(lambda: b" " * (MAX_HANDSHAKE_NBYTES + 1))
    try:
        with pytest.raises(HandshakeError, match="above the limit"):
            fetch_handshake_bytes(*server.address, timeout_s=10)
    finally:
        server.close()


def test_a_malformed_session_id_is_a_handshake_error():
    server = SideChannelServer("127.0.0.1", 0)
    server.add_handler("handshake", lambda r, p, c: ({"session": "not hex"}, b"x"), inline=True)
    try:
        with SideChannelClient(*server.address) as client, pytest.raises(HandshakeError, match="session id"):
            fetch_handshake(client, "reader")
    finally:
        server.close()


def test_a_peer_that_speaks_no_zeromq_is_a_timeout_not_a_hang():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"\x00\x00" * 64)  # junk instead of a ZeroMQ greeting

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(TransferError, match="Could not fetch a handshake"):
            fetch_handshake_bytes(*listener.getsockname()[:2], timeout_s=1)
    finally:
        listener.close()
