"""The handshake a src endpoint publishes so that dst readers can find and read its pages.

A handshake is self-describing and versioned: which state it holds (spec, tp, rank), where
its pages are (a `RegionSet`), the NIXL agent metadata a reader loads to reach it, a spec
fingerprint and a registration generation (bumped whenever the src re-registers memory,
so a reader can tell a stale handshake). It never needs NIXL to encode or decode.

Wire format (UTF-8 JSON, at most `MAX_HANDSHAKE_NBYTES`)::

    {"format": "ssm-split/handshake", "version": 2,
     "sha256": "<hex digest of the canonical JSON of body>",
     "body": {"spec": {"family": "mamba2", "fields": {...}}, "fingerprint": "<hex>",
              "tp": 2, "rank": 0, "agent_name": "...", "mem_type": "DRAM",
              "generation": 1,
              "regions": {"layers": [[base_addr, page_nbytes, page_stride_nbytes,
                                       num_blocks, buffer], ...],
                          "buffers": [[addr, nbytes, device_id], ...]},
              "scratch": [addr, nbytes, device_id],
              "agent_metadata": "<base64>",
              "capabilities": {"host": "<boot id>@<host name>",
                               "pack": [area_addr, area_nbytes, device_id, max_wave_nbytes] | null,
                               "ipc": [["<128 hex digits>", offset, nbytes], ...] | null}}}

A src whose pages are stacked (`StackedSpec`) adds `"stacked_layers": L` next to the base
spec's `family` and `fields`; per-layer handshakes are unchanged.

`capabilities` says which strategies the src serves besides plain READs: `pack` its pack
area (the packed strategy), `ipc` one CUDA IPC handle per registered buffer (the peer
strategy, for a reader on the same `host`).

Canonical JSON: keys sorted, no spaces. Decoding is strict: unknown or missing keys,
wrong types, bools where ints are expected, a digest or fingerprint that does not match,
and anything that does not build a valid spec or `RegionSet` raise `HandshakeError`.
The digest catches corruption, not forgery: it is not a signature.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..errors import HandshakeError, SsmSplitError
from ..layout._regions import Buffer, LayerRegion, RegionSet
from ..specs._spec import SPEC_TYPES, spec_fields
from ..specs._stacked import PageSpec, StackedSpec, check_is_page_spec

__all__ = [
    "HANDSHAKE_FORMAT",
    "HANDSHAKE_VERSION",
    "MAX_HANDSHAKE_NBYTES",
    "MEM_TYPES",
    "Handshake",
    "decode_handshake",
    "spec_fingerprint",
]

HANDSHAKE_FORMAT = "ssm-split/handshake"
HANDSHAKE_VERSION = 2
"""2: spec fields use `num_*` names (`num_groups`); version 1 spoke `n_groups`."""
MAX_HANDSHAKE_NBYTES = 16 << 20
"""Largest encoded handshake accepted (NIXL metadata is a few KiB; regions are small)."""
MEM_TYPES = ("DRAM", "VRAM")
_MAX_ENTRIES = 1 << 16
_MAX_NAME = 256
_U64_MAX = (1 << 64) - 1
_FAMILIES = {cls.family: cls for cls in SPEC_TYPES}
_BODY_KEYS = frozenset({"spec", "fingerprint", "tp", "rank", "agent_name", "mem_type",
                        "generation", "regions", "scratch", "agent_metadata", "capabilities"})
_CAPABILITY_KEYS = frozenset({"host", "pack", "ipc"})
_IPC_HANDLE_HEX = 128


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _spec_json(spec: PageSpec) -> dict:
    """`{"family", "fields"}` of one layer's spec; a stacked page adds `"stacked_layers"`."""
    if isinstance(spec, StackedSpec):
        return {**_spec_json(spec.base), "stacked_layers": spec.num_layers}
    return {"family": spec.family, "fields": spec_fields(spec)}


def spec_fingerprint(spec: PageSpec) -> str:
    """Hex SHA-256 of the spec's canonical JSON: equal for equal specs, whatever process
    or host computes it (a stacked page's differs from its base spec's)."""
    check_is_page_spec(spec)
    return hashlib.sha256(_canonical(_spec_json(spec))).hexdigest()


@dataclass(frozen=True, slots=True)
class Handshake:
    """What a src endpoint publishes about itself (see the module docstring).

    Attributes:
        spec, tp, rank: the state this endpoint holds and its place among its engine's ranks.
        agent_name: its NIXL agent's name.
        mem_type: "DRAM" or "VRAM", the NIXL memory type of its pages.
        regions: where its pages are.
        scratch: a small registered buffer whose first 16 bytes are
            `b"SSMSPLIT" + generation` (little-endian uint64); readers read it to warm a
            connection up and to check that their handshake is not stale.
        agent_metadata: NIXL agent metadata (`get_agent_metadata()`), taken after the
            pages were registered.
        generation: registration generation, >= 1; bumped on every (de)registration.
        host_id: the src's machine (`_ipc.host_id()`), "" when unknown.
        pack_area: the src's registered pack area, or None when it does not pack.
        pack_wave_nbytes: the most bytes it packs for one wave (0 without a pack area).
        ipc_exports: per buffer of `regions`, its CUDA IPC export `(handle, offset,
            nbytes)`; empty when the src's pages cannot be mapped by peers.
    """

    spec: PageSpec
    tp: int
    rank: int
    agent_name: str
    mem_type: str
    regions: RegionSet
    scratch: Buffer
    agent_metadata: bytes
    generation: int
    host_id: str = ""
    pack_area: Buffer | None = None
    pack_wave_nbytes: int = 0
    ipc_exports: tuple[tuple[bytes, int, int], ...] = ()

    def __post_init__(self) -> None:
        try:
            check_is_page_spec(self.spec)
        except SsmSplitError as error:
            raise HandshakeError(str(error)) from None
        _check_int("tp", self.tp, 1)
        _check_int("rank", self.rank, 0)
        _check_int("generation", self.generation, 1)
        if self.rank >= self.tp:
            raise HandshakeError(f"Handshake rank {self.rank} is not below its tp {self.tp}.")
        if (not isinstance(self.agent_name, str) or not 0 < len(self.agent_name) <= _MAX_NAME
                or not self.agent_name.isprintable() or not _utf8(self.agent_name)):
            raise HandshakeError(f"Handshake agent_name must be a str of 1..{_MAX_NAME} "
                                 f"printable UTF-8 characters, got {self.agent_name!r}.")
        if self.mem_type not in MEM_TYPES:
            raise HandshakeError(f"Handshake mem_type must be one of {MEM_TYPES}, got "
                                 f"{self.mem_type!r}.")
        if not isinstance(self.regions, RegionSet) or not isinstance(self.scratch, Buffer):
            raise HandshakeError("Handshake regions must be a RegionSet and scratch a Buffer.")
        if not isinstance(self.agent_metadata, bytes) or not self.agent_metadata:
            raise HandshakeError("Handshake agent_metadata must be non-empty bytes.")
        if not isinstance(self.host_id, str) or len(self.host_id) > _MAX_NAME or not _utf8(self.host_id):
            raise HandshakeError(f"Handshake host_id must be a str of at most {_MAX_NAME} characters.")
        if self.pack_area is not None and not isinstance(self.pack_area, Buffer):
            raise HandshakeError("Handshake pack_area must be a Buffer or None.")
        _check_int("pack_wave_nbytes", self.pack_wave_nbytes, 0)
        if (self.pack_area is None) != (self.pack_wave_nbytes == 0) or (
                self.pack_area is not None and self.pack_wave_nbytes > self.pack_area.nbytes):
            raise HandshakeError("Handshake pack_wave_nbytes must be > 0 and at most the pack area's "
                                 "size exactly when there is a pack area.")
        if self.ipc_exports and (self.mem_type != "VRAM" or len(self.ipc_exports) != len(self.regions.buffers)):
            raise HandshakeError("Handshake ipc_exports must hold one export per buffer of VRAM regions.")
        for export in self.ipc_exports:
            if (not isinstance(export, tuple) or len(export) != 3 or not isinstance(export[0], bytes)
                    or len(export[0]) != _IPC_HANDLE_HEX // 2):
                raise HandshakeError("Handshake ipc_exports rows must be (64-byte handle, offset, nbytes).")
            _check_int("ipc offset", export[1], 0)
            _check_int("ipc nbytes", export[2], 1)

    @property
    def fingerprint(self) -> str:
        return spec_fingerprint(self.spec)

    def encode(self) -> bytes:
        """The wire form (module docstring)."""
        regions = self.regions
        body = {
            "spec": _spec_json(self.spec),
            "fingerprint": self.fingerprint,
            "tp": self.tp,
            "rank": self.rank,
            "agent_name": self.agent_name,
            "mem_type": self.mem_type,
            "generation": self.generation,
            "regions": {
                "layers": [[r.base_addr, r.page_nbytes, r.page_stride_nbytes, r.num_blocks, r.buffer]
                           for r in regions.layers],
                "buffers": [[b.addr, b.nbytes, b.device_id] for b in regions.buffers],
            },
            "scratch": [self.scratch.addr, self.scratch.nbytes, self.scratch.device_id],
            "agent_metadata": base64.b64encode(self.agent_metadata).decode("ascii"),
            "capabilities": {
                "host": self.host_id,
                "pack": None if self.pack_area is None else [
                    self.pack_area.addr, self.pack_area.nbytes, self.pack_area.device_id, self.pack_wave_nbytes],
                "ipc": [[h.hex(), offset, nbytes] for h, offset, nbytes in self.ipc_exports] or None,
            },
        }
        envelope = {"format": HANDSHAKE_FORMAT, "version": HANDSHAKE_VERSION,
                    "sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}
        return _canonical(envelope)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\\ud800" escapes
        return False
    return True


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise HandshakeError(f"Handshake JSON repeats the keys {repeated}: parsers disagree on "
                             f"which value wins, so it is refused.")
    return dict(pairs)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _U64_MAX:
        raise HandshakeError(f"Handshake field `{name}` must be an int in [{minimum}, 2**64), "
                             f"got {value!r}.")
    return value


def _dict(value: object, name: str, keys: frozenset[str]) -> dict:
    if not isinstance(value, dict):
        raise HandshakeError(f"Handshake field `{name}` must be an object, got {type(value).__name__}.")
    if set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise HandshakeError(f"Handshake field `{name}` has missing keys {missing} and "
                             f"unexpected keys {extra}.")
    return value


def _int_rows(value: object, name: str, width: int) -> list[list[int]]:
    if not isinstance(value, list) or not 0 < len(value) <= _MAX_ENTRIES:
        raise HandshakeError(f"Handshake field `{name}` must be a list of 1..{_MAX_ENTRIES} rows.")
    for row in value:
        if not isinstance(row, list) or len(row) != width:
            raise HandshakeError(f"Handshake field `{name}` must hold rows of {width} ints, got {row!r}.")
        for item in row:
            _check_int(name, item, 0)
    return value


def _decode_spec(value: object) -> PageSpec:
    stacked = isinstance(value, dict) and "stacked_layers" in value
    spec = _dict(value, "spec", frozenset({"family", "fields", *(("stacked_layers",) if stacked else ())}))
    cls = _FAMILIES.get(spec["family"]) if isinstance(spec["family"], str) else None
    if cls is None:
        raise HandshakeError(f"Handshake spec family {spec['family']!r} is unknown; this "
                             f"ssm_split knows {sorted(_FAMILIES)}.")
    names = frozenset(f.name for f in dataclasses.fields(cls))
    fields = _dict(spec["fields"], "spec.fields", names)
    for key, item in fields.items():
        if isinstance(item, (bool, float)) or not isinstance(item, (int, str)):
            raise HandshakeError(f"Handshake spec field `{key}` must be an int or str, got {item!r}.")
    try:
        base = cls(**fields)
        return StackedSpec(base, spec["stacked_layers"]) if stacked else base
    except SsmSplitError as error:
        raise HandshakeError(f"Handshake spec is invalid: {error}") from None


def _decode_body(body: dict) -> Handshake:
    spec = _decode_spec(body["spec"])
    if body["fingerprint"] != spec_fingerprint(spec):
        raise HandshakeError("Handshake fingerprint does not match its spec: the handshake was "
                             "altered, or written by an incompatible ssm_split.")
    regions = _dict(body["regions"], "regions", frozenset({"layers", "buffers"}))
    layers = _int_rows(regions["layers"], "regions.layers", 5)
    buffers = _int_rows(regions["buffers"], "regions.buffers", 3)
    scratch = _int_rows([body["scratch"]], "scratch", 3)[0]
    metadata = body["agent_metadata"]
    if not isinstance(metadata, str):
        raise HandshakeError("Handshake field `agent_metadata` must be a base64 string.")
    try:
        region_set = RegionSet(tuple(LayerRegion(*row) for row in layers),
                               tuple(Buffer(*row) for row in buffers))
        scratch_buffer = Buffer(*scratch)
        raw = base64.b64decode(metadata.encode("ascii"), validate=True)
    except (SsmSplitError, binascii.Error, UnicodeEncodeError) as error:
        raise HandshakeError(f"Handshake regions or metadata are invalid: {error}") from None
    host, pack_area, pack_wave, exports = _decode_capabilities(body["capabilities"])
    return Handshake(spec=spec, tp=body["tp"], rank=body["rank"], agent_name=body["agent_name"],
                     mem_type=body["mem_type"], regions=region_set, scratch=scratch_buffer,
                     agent_metadata=raw, generation=body["generation"], host_id=host,
                     pack_area=pack_area, pack_wave_nbytes=pack_wave, ipc_exports=exports)


def _decode_capabilities(value: object) -> tuple[str, Buffer | None, int, tuple]:
    caps = _dict(value, "capabilities", _CAPABILITY_KEYS)
    if not isinstance(caps["host"], str):
        raise HandshakeError("Handshake field `capabilities.host` must be a str.")
    pack_area, pack_wave = None, 0
    if caps["pack"] is not None:
        addr, nbytes, device, pack_wave = _int_rows([caps["pack"]], "capabilities.pack", 4)[0]
        try:
            pack_area = Buffer(addr, nbytes, device)
        except SsmSplitError as error:
            raise HandshakeError(f"Handshake pack area is invalid: {error}") from None
    exports = []
    if caps["ipc"] is not None:
        if not isinstance(caps["ipc"], list) or not 0 < len(caps["ipc"]) <= _MAX_ENTRIES:
            raise HandshakeError("Handshake field `capabilities.ipc` must be null or a non-empty list.")
        for row in caps["ipc"]:
            if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str)
                    or len(row[0]) != _IPC_HANDLE_HEX):
                raise HandshakeError("Handshake `capabilities.ipc` rows must be [128 hex digits, offset, nbytes].")
            try:
                handle = bytes.fromhex(row[0])
            except ValueError:
                raise HandshakeError("Handshake `capabilities.ipc` handles must be hex.") from None
            exports.append((handle, _check_int("ipc offset", row[1], 0), _check_int("ipc nbytes", row[2], 1)))
    return caps["host"], pack_area, pack_wave, tuple(exports)


def decode_handshake(data: object) -> Handshake:
    """Decode and validate a handshake from its wire form.

    Raises:
        HandshakeError: not bytes, too large, not JSON, wrong format or version, a digest
            or fingerprint mismatch, or any field that fails validation.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HandshakeError(f"A handshake must be bytes, got {type(data).__name__}.")
    if len(data) > MAX_HANDSHAKE_NBYTES:
        raise HandshakeError(f"Handshake of {len(data)} bytes exceeds the limit of "
                             f"{MAX_HANDSHAKE_NBYTES} bytes.")
    try:
        envelope = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except HandshakeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise HandshakeError(f"Handshake is not UTF-8 JSON ({type(error).__name__}); was it "
                             f"truncated, or is the peer not an ssm_split endpoint?") from None
    if not isinstance(envelope, dict) or envelope.get("format") != HANDSHAKE_FORMAT:
        raise HandshakeError(f"Not an ssm_split handshake: `format` must be {HANDSHAKE_FORMAT!r}.")
    version = envelope.get("version")
    if type(version) is not int or version != HANDSHAKE_VERSION:  # not True, not 1.0
        raise HandshakeError(f"Handshake version {version!r} is not supported: this ssm_split "
                             f"reads version {HANDSHAKE_VERSION}. Run the same ssm_split "
                             f"version on both engines.")
    _dict(envelope, "envelope", frozenset({"format", "version", "sha256", "body"}))
    body = _dict(envelope["body"], "body", _BODY_KEYS)
    if envelope["sha256"] != hashlib.sha256(_canonical(body)).hexdigest():
        raise HandshakeError("Handshake digest does not match its body: it was corrupted or "
                             "altered on the way.")
    return _decode_body(body)
