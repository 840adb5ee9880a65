"""Fuzzing the handshake decoder: hostile bytes never crash it, never hang it, and never
make it accept a handshake other than the one that was sent.

Four sources of input, all bounded in size:

- arbitrary bytes, and arbitrary JSON documents;
- valid handshakes (Hypothesis specs, TP sizes, regions, metadata) with bytes flipped,
  cut off, inserted or deleted: either `HandshakeError`, or the very same handshake
  (inserting JSON whitespace changes nothing);
- valid handshakes in which one JSON value anywhere in the body is replaced by an
  arbitrary JSON value and the digest recomputed (a peer that lies consistently): either
  `HandshakeError` or a handshake that passes every check and re-encodes to itself;
- envelopes with a wrong format, version, digest or key set.

Every decode must finish within `DECODE_LIMIT_S` (a generous bound; it takes
milliseconds), and anything but `HandshakeError` escaping is a failure.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ssm_split import Buffer, Mamba2Spec, RegionSet
from ssm_split.errors import HandshakeError
from ssm_split.nixl_backend import HANDSHAKE_VERSION, Handshake, decode_handshake
from ssm_split.nixl_backend._handshake import MAX_HANDSHAKE_NBYTES, _canonical
from tests.strategies import specs

DECODE_LIMIT_S = 2.0
MAX_INPUT_NBYTES = 1 << 16


def decode(data: bytes) -> Handshake | None:
    """Decode; None for a `HandshakeError`; anything else propagates (a test failure)."""
    started = time.perf_counter()
    try:
        return decode_handshake(data)
    except HandshakeError as error:
        assert str(error), "a HandshakeError must say what was wrong"
        return None
    finally:
        assert time.perf_counter() - started < DECODE_LIMIT_S, "decoding took too long"


def small_handshake(**changes) -> Handshake:
    fields = dict(spec=Mamba2Spec(num_heads=2, head_dim=2, num_groups=1, state_size=2), tp=1, rank=0,
                  agent_name="a", mem_type="DRAM", generation=1, agent_metadata=b"m",
                  regions=RegionSet.packed(4096, num_layers=1, num_blocks=1, page_nbytes=4096),
                  scratch=Buffer(0, 64))
    return Handshake(**{**fields, **changes})


@st.composite
def handshakes(draw) -> Handshake:
    tp = draw(st.integers(1, 4))
    spec = draw(specs(tps=(tp,)))
    num_layers, num_blocks = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    page_nbytes = draw(st.integers(1, 1 << 20))
    base = draw(st.integers(0, 1 << 47))
    regions = RegionSet.packed(base, num_layers=num_layers, num_blocks=num_blocks,
                               page_nbytes=page_nbytes, order=draw(st.sampled_from(("layer", "block"))))
    return Handshake(
        spec=spec, tp=tp, rank=draw(st.integers(0, tp - 1)),
        agent_name=draw(st.text(st.characters(categories=("L", "N", "Pd", "Pc")), min_size=1,
                                max_size=40)),
        mem_type=draw(st.sampled_from(("DRAM", "VRAM"))), regions=regions,
        scratch=Buffer(draw(st.integers(0, 1 << 47)), 64),
        agent_metadata=draw(st.binary(min_size=1, max_size=512)),
        generation=draw(st.integers(1, 1 << 40)),
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=MAX_INPUT_NBYTES))
@example(b"")
@example(b"{}")
@example(b"null")
@example(b'{"format":"ssm-split/handshake","version":2}')
def test_arbitrary_bytes_are_rejected_with_a_handshake_error(data):
    assert decode(data) is None


@given(json_values)
def test_arbitrary_json_is_rejected_with_a_handshake_error(value):
    assert decode(json.dumps(value).encode()) is None


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(("flip", "truncate", "insert", "delete", "duplicate")))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    end = draw(st.integers(at + 1, min(len(data), at + 64)))
    if kind == "delete":
        return data[:at] + data[end:]
    return data[:end] + data[at:end] + data[end:]


@given(handshakes(), st.data())
def test_mutated_handshakes_are_rejected_or_unchanged(hs, data):
    encoded = hs.encode()
    assert decode(encoded) == hs
    mutated = data.draw(byte_mutations(encoded))
    got = decode(mutated)
    assert got is None or got == hs, "a tampered handshake was accepted with other contents"


def _paths(value, prefix=()):
    """Every path to a JSON value inside `value` (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    return [_replace(item, rest, new) if i == head else item for i, item in enumerate(value)]


def resign(envelope: dict) -> bytes:
    envelope = dict(envelope, sha256=hashlib.sha256(_canonical(envelope["body"])).hexdigest())
    return _canonical(envelope)


@given(handshakes(), st.data())
def test_consistently_signed_lies_fail_validation_or_round_trip(hs, data):
    envelope = json.loads(hs.encode())
    path = data.draw(st.sampled_from(list(_paths(envelope["body"]))[1:]))
    body = _replace(envelope["body"], path, data.draw(json_values))
    got = decode(resign({**envelope, "body": body}))
    if got is not None:  # every check passed: it must be a handshake that survives re-encoding
        assert decode(got.encode()) == got


@given(handshakes(), st.one_of(json_values, st.integers()).filter(
    lambda v: type(v) is not int or v != HANDSHAKE_VERSION))
@example(small_handshake(), True)  # True == 1 in Python: never a version
@example(small_handshake(), 2.0)  # 2.0 == 2 in Python: only the int counts
@example(small_handshake(), 1)  # version 1 spoke the old spec field names
def test_any_other_version_is_refused(hs, version):
    envelope = json.loads(hs.encode())
    with pytest.raises(HandshakeError, match="version .* is not supported"):
        decode_handshake(_canonical({**envelope, "version": version}))


@given(handshakes(), st.sampled_from(["format", "sha256", "body"]), json_values)
def test_other_envelope_fields_are_checked(hs, key, value):
    envelope = json.loads(hs.encode())
    if envelope[key] == value:
        return
    assert decode(_canonical({**envelope, key: value})) is None
    assert decode(_canonical({k: v for k, v in envelope.items() if k != key})) is None
    assert decode(_canonical({**envelope, "extra": value})) is None


@pytest.mark.parametrize("text, match", [
    (lambda d: d.replace(b'"tp":', b'"tp":0,"tp":', 1), "repeats the keys \\['tp'\\]"),
    (lambda d: d.replace(b'"version":2', b'"version":2,"version":2'), "repeats the keys"),
    (lambda d: b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),
    (lambda d: d.replace(b'"tp":', b'"tp":' + b"9" * 5000 + b',"x":', 1), "not UTF-8 JSON"),
    (lambda d: b" " * (MAX_HANDSHAKE_NBYTES + 1), "exceeds the limit"),
])
def test_hostile_documents(text, match):
    hs = small_handshake()
    with pytest.raises(HandshakeError, match=match):
        decode_handshake(text(hs.encode()))


@pytest.mark.parametrize("name", ["\ud800", "a\x00b", "tab\there", "x" * 257, ""])
def test_agent_names_that_nixl_could_not_take_are_refused(name):
    hs = small_handshake()
    envelope = json.loads(hs.encode())
    envelope["body"]["agent_name"] = name
    with pytest.raises(HandshakeError, match="agent_name must be"):
        decode_handshake(resign(envelope))
