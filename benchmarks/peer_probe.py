#!/usr/bin/env python3
"""peer_probe.py: measure the "peer-memory" transfer strategy on one host with two GPUs.

Process A (the src engine stand-in) owns memory on cuda:0; process B (the dst engine
stand-in) owns memory on cuda:1. They exchange CUDA IPC handles as JSON (what a TCP
handshake would carry) and copy with one Triton kernel per batch, driven by a table of
(src_addr, dst_addr, nbytes) rows in absolute device addresses.

Scenarios, each a fresh pair of spawned processes (default order map, cvd, expandable, bench):
  map         how B maps A's memory: ctypes cudaIpc* (runtime and driver API), torch's
              _share_cuda_/_new_shared_cuda, __cuda_array_interface__, opening twice,
              interior pointers, whether cudaIpcMemLazyEnablePeerAccess alone is enough.
  bench       pull (kernel on B reads peer memory) vs push (kernel on A writes peer
              memory), 1 GiB contiguous / Qwen3.5-27B-like batch / tiny pieces only,
              kernel variants, copy-engine batch, torch copy_ reference, table-upload and
              launch overhead, synchronize/event/TCP costs, IPC-event ordering.
  cvd         A with CUDA_VISIBLE_DEVICES=0, B with CUDA_VISIBLE_DEVICES=1.
  expandable  both with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.

Usage:  python3 peer_probe.py [--out PATH] [--budget 200] [--scenarios map,cvd,expandable,bench]
Writes JSON (default $OUT/peer_probe.json, else ./peer_probe.json) after every scenario and
prints a summary. Only stdlib + numpy + torch + triton. Every test is wrapped in try/except.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import glob
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

T0 = time.time()
SALT = 0x1234567  # src words are (virtual word index) ^ SALT: bit 31 clear, never equals the poison -1

# ---- geometry of the Qwen3.5-27B-like batch (dst rank 0 of a 1 -> 2 transfer) ----------
LAYERS = 48
NBLK = 96                 # blocks per layer region (batch uses 64 of them, scattered)
BATCH = 64
SRC_PAGE = 1609728        # full per-layer state: conv Q|K|V (6144, 6144, 24576) + temporal 1572864
DST_PAGE = 804864         # half of it: conv Q|K|V (3072, 3072, 12288) + temporal 786432
SRC_OFFS = (0, 6144, 12288, 36864)
DST_OFFS = (0, 3072, 6144, 18432)
SIZES = (3072, 3072, 12288, 786432)
N_SRC_REGIONS = 2         # src layers live in 2 separate allocations = 2 IPC handles
LAYERS_PER_REGION = LAYERS // N_SRC_REGIONS
REGION_BYTES = LAYERS_PER_REGION * NBLK * SRC_PAGE   # 3.71 GB each
REGION_WORDS = REGION_BYTES // 4
DST_BYTES = LAYERS * NBLK * DST_PAGE                  # 3.71 GB
GIB = 1 << 30
assert N_SRC_REGIONS * REGION_WORDS < 2 ** 31


def log(tag, msg):
    print(f"[{time.time() - T0:7.1f}s {tag}] {msg}", flush=True)


def short_tb(e):
    lines = traceback.format_exception(type(e), e, e.__traceback__)
    text = "".join(lines[-4:])
    return f"{type(e).__name__}: {e}"[:400], text[-1500:]


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bytes, bytearray)):
        return "hex:" + bytes(x).hex()
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


class Reporter:
    """Sends partial results to the parent as they are produced (survives later crashes)."""

    def __init__(self, conn, role, scen):
        self.conn, self.role, self.tag = conn, role, f"{role}/{scen}"
        self.after = None  # called after every attempt (clears the CUDA runtime's last error)

    def put(self, key, value):
        try:
            self.conn.send(("part", self.role, key, jsonable(value)))
        except Exception:
            pass

    def err(self, key, e, quiet=False):
        msg, tb = short_tb(e)
        if not quiet:
            log(self.tag, f"{key}: {msg}")
        self.put(key, {"error": msg, "traceback": tb})

    def log(self, msg):
        log(self.tag, msg)

    def attempt(self, key, fn, *a, **kw):
        """Run fn; report its return value (or its error) under key; return value or None."""
        try:
            v = fn(*a, **kw)
            self.put(key, v)
            return v
        except Exception as e:  # noqa: BLE001
            self.err(key, e)
            return None
        finally:
            if self.after is not None:
                try:
                    self.after()
                except Exception:  # noqa: BLE001
                    pass


def recv(conn, timeout=60.0):
    if not conn.poll(timeout):
        raise TimeoutError(f"no message from peer within {timeout:.0f}s")
    return conn.recv()


def host_identity():
    d = {"nodename": os.uname().nodename, "pid": os.getpid()}
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            d["boot_id"] = f.read().strip()
    except Exception as e:  # noqa: BLE001
        d["boot_id_error"] = repr(e)
    for ns in ("ipc", "pid", "net"):
        try:
            d[f"ns_{ns}"] = os.readlink(f"/proc/self/ns/{ns}")
        except Exception as e:  # noqa: BLE001
            d[f"ns_{ns}"] = f"unavailable: {e!r}"
    return d


# ======================================================================================
# CUDA runtime / driver through ctypes
# ======================================================================================
class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", CUmemLocation),
                ("dstLocHint", CUmemLocation), ("flags", ctypes.c_uint)]


class CudaLibs:
    """libcudart (the copy torch loaded) and libcuda.so.1, with the few calls we need."""

    def __init__(self):
        self.info = {"cudart_loaded": [], "cudart_candidates": []}
        self.rt = None
        self.drv = None
        self.batch_v1 = self.batch_v2 = None
        loaded = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 6 and "libcudart" in parts[-1] and parts[-1] not in loaded:
                        loaded.append(parts[-1])
        except Exception as e:  # noqa: BLE001
            self.info["maps_error"] = repr(e)
        self.info["cudart_loaded"] = loaded
        cands = []
        try:
            import site
            roots = list(site.getsitepackages()) + [site.getusersitepackages()]
        except Exception:  # noqa: BLE001
            roots = []
        try:
            import torch
            roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
        except Exception:  # noqa: BLE001
            pass
        for r in dict.fromkeys(roots):
            cands += glob.glob(os.path.join(r, "nvidia", "**", "libcudart.so*"), recursive=True)
            cands += glob.glob(os.path.join(r, "torch", "lib", "libcudart*.so*"))
        self.info["cudart_candidates"] = sorted(set(cands))
        for p in loaded + sorted(set(cands)) + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]:
            try:
                self.rt = ctypes.CDLL(p)
                self.info["cudart_used"] = p
                break
            except OSError:
                continue
        try:
            self.drv = ctypes.CDLL("libcuda.so.1")
            self.info["libcuda"] = "libcuda.so.1"
        except OSError as e:
            self.info["libcuda_error"] = repr(e)
        self._setup()

    def _setup(self):
        c = ctypes
        if self.rt is not None:
            rt = self.rt
            rt.cudaGetErrorName.restype = c.c_char_p
            rt.cudaGetErrorName.argtypes = [c.c_int]
            rt.cudaSetDevice.argtypes = [c.c_int]
            rt.cudaGetDevice.argtypes = [c.POINTER(c.c_int)]
            rt.cudaIpcGetMemHandle.argtypes = [c.POINTER(IpcHandle), c.c_void_p]
            rt.cudaIpcOpenMemHandle.argtypes = [c.POINTER(c.c_void_p), IpcHandle, c.c_uint]
            rt.cudaIpcCloseMemHandle.argtypes = [c.c_void_p]
            rt.cudaDeviceEnablePeerAccess.argtypes = [c.c_int, c.c_uint]
            rt.cudaDeviceCanAccessPeer.argtypes = [c.POINTER(c.c_int), c.c_int, c.c_int]
            rt.cudaRuntimeGetVersion.argtypes = [c.POINTER(c.c_int)]
            rt.cudaGetLastError.restype = c.c_int
            v = c.c_int(0)
            if rt.cudaRuntimeGetVersion(c.byref(v)) == 0:
                self.info["cudart_version"] = v.value
        if self.drv is not None:
            d = self.drv
            d.cuGetErrorName.argtypes = [c.c_int, c.POINTER(c.c_char_p)]
            d.cuMemGetAddressRange_v2.argtypes = [c.POINTER(c.c_uint64), c.POINTER(c.c_size_t), c.c_uint64]
            d.cuIpcGetMemHandle.argtypes = [c.POINTER(IpcHandle), c.c_uint64]
            d.cuIpcOpenMemHandle_v2.argtypes = [c.POINTER(c.c_uint64), IpcHandle, c.c_uint]
            d.cuIpcCloseMemHandle.argtypes = [c.c_uint64]
            d.cuPointerGetAttribute.argtypes = [c.c_void_p, c.c_int, c.c_uint64]
            d.cuCtxGetDevice.argtypes = [c.POINTER(c.c_int)]
            d.cuMemcpyAsync.argtypes = [c.c_uint64, c.c_uint64, c.c_size_t, c.c_void_p]
            d.cuDriverGetVersion.argtypes = [c.POINTER(c.c_int)]
            v = c.c_int(0)
            if d.cuDriverGetVersion(c.byref(v)) == 0:
                self.info["driver_cuda_version"] = v.value
            self.batch_v2 = getattr(d, "cuMemcpyBatchAsync_v2", None)
            self.batch_v1 = None if self.batch_v2 is not None else getattr(d, "cuMemcpyBatchAsync", None)
            self.info["memcpy_batch_symbol"] = ("cuMemcpyBatchAsync_v2" if self.batch_v2 is not None
                                                else "cuMemcpyBatchAsync" if self.batch_v1 is not None else None)

    # --- error names
    def clear(self):
        """Reset the runtime's sticky-until-read last error (torch's launch checks would raise it)."""
        if self.rt is not None:
            return self.rt.cudaGetLastError()
        return 0

    def rt_err(self, rc):
        if rc != 0:
            self.clear()
        try:
            return f"{rc}:{self.rt.cudaGetErrorName(rc).decode()}"
        except Exception:  # noqa: BLE001
            return str(rc)

    def drv_err(self, rc):
        s = ctypes.c_char_p()
        try:
            self.drv.cuGetErrorName(rc, ctypes.byref(s))
            return f"{rc}:{s.value.decode() if s.value else '?'}"
        except Exception:  # noqa: BLE001
            return str(rc)

    def _rt_check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: {self.rt_err(rc)}")

    def _drv_check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: {self.drv_err(rc)}")

    # --- queries
    def address_range(self, ptr):
        base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
        self._drv_check(self.drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr),
                        "cuMemGetAddressRange")
        return int(base.value), int(size.value)

    def ptr_device_ordinal(self, ptr):
        v = ctypes.c_int(-1)
        rc = self.drv.cuPointerGetAttribute(ctypes.byref(v), 9, ptr)  # CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
        return v.value if rc == 0 else f"error {self.drv_err(rc)}"

    def ctx_device(self):
        v = ctypes.c_int(-1)
        rc = self.drv.cuCtxGetDevice(ctypes.byref(v))
        return v.value if rc == 0 else f"error {self.drv_err(rc)}"

    # --- export / import
    def _api(self, api):
        return "drv" if api == "rt" and self.rt is None else api

    def get_handle(self, ptr, api="rt", device=None):
        api = self._api(api)
        h = IpcHandle()
        if api == "rt":
            if device is not None:
                self._rt_check(self.rt.cudaSetDevice(device), "cudaSetDevice")
            self._rt_check(self.rt.cudaIpcGetMemHandle(ctypes.byref(h), ctypes.c_void_p(ptr)), "cudaIpcGetMemHandle")
        else:
            self._drv_check(self.drv.cuIpcGetMemHandle(ctypes.byref(h), ptr), "cuIpcGetMemHandle")
        return bytes(h)

    def export(self, ptr, nbytes, api="rt", device=None):
        """What must travel: the handle of the allocation containing ptr, and ptr's offset in it."""
        base, size = self.address_range(ptr)
        api = self._api(api)
        return {"api": api, "handle": self.get_handle(base, api, device).hex(), "offset": ptr - base,
                "nbytes": int(nbytes), "alloc_size": size}

    def open(self, handle: bytes, api="rt", lazy=True, device=None):
        api = self._api(api)
        h = IpcHandle.from_buffer_copy(handle)
        flags = 1 if lazy else 0  # cudaIpcMemLazyEnablePeerAccess == CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS == 1
        if api == "rt":
            if device is not None:
                self._rt_check(self.rt.cudaSetDevice(device), "cudaSetDevice")
            p = ctypes.c_void_p(0)
            self._rt_check(self.rt.cudaIpcOpenMemHandle(ctypes.byref(p), h, flags), "cudaIpcOpenMemHandle")
            return int(p.value)
        p = ctypes.c_uint64(0)
        self._drv_check(self.drv.cuIpcOpenMemHandle_v2(ctypes.byref(p), h, flags), "cuIpcOpenMemHandle")
        return int(p.value)

    def open_rc(self, handle: bytes, api="rt", lazy=True):
        """Like open but returns (rc_string, ptr) without raising."""
        h = IpcHandle.from_buffer_copy(handle)
        if api == "rt":
            p = ctypes.c_void_p(0)
            rc = self.rt.cudaIpcOpenMemHandle(ctypes.byref(p), h, 1 if lazy else 0)
            return self.rt_err(rc), int(p.value or 0)
        p = ctypes.c_uint64(0)
        rc = self.drv.cuIpcOpenMemHandle_v2(ctypes.byref(p), h, 1 if lazy else 0)
        return self.drv_err(rc), int(p.value or 0)

    def close(self, ptr, api="rt"):
        if api == "rt":
            return self.rt_err(self.rt.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)))
        return self.drv_err(self.drv.cuIpcCloseMemHandle(ptr))

    def enable_peer(self, peer, device=None):
        if device is not None:
            self._rt_check(self.rt.cudaSetDevice(device), "cudaSetDevice")
        return self.rt_err(self.rt.cudaDeviceEnablePeerAccess(peer, 0))

    def can_access_peer(self, dev, peer):
        v = ctypes.c_int(-1)
        rc = self.rt.cudaDeviceCanAccessPeer(ctypes.byref(v), dev, peer)
        return v.value if rc == 0 else self.rt_err(rc)

    # --- copy engine paths
    def memcpy_batch(self, dsts, srcs, sizes, stream, hints=None):
        n = len(sizes)
        d = np.ascontiguousarray(dsts, dtype=np.uint64)
        s = np.ascontiguousarray(srcs, dtype=np.uint64)
        z = np.ascontiguousarray(sizes, dtype=np.uint64)
        attr = CUmemcpyAttributes()
        attr.srcAccessOrder = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        if hints:
            attr.srcLocHint.type, attr.srcLocHint.id = 1, hints[0]
            attr.dstLocHint.type, attr.dstLocHint.id = 1, hints[1]
        idx = (ctypes.c_size_t * 1)(0)
        P64 = ctypes.POINTER(ctypes.c_uint64)
        PSZ = ctypes.POINTER(ctypes.c_size_t)
        if self.batch_v2 is not None:
            rc = self.batch_v2(d.ctypes.data_as(P64), s.ctypes.data_as(P64), z.ctypes.data_as(PSZ),
                               ctypes.c_size_t(n), ctypes.byref(attr), idx, ctypes.c_size_t(1),
                               ctypes.c_void_p(stream))
        elif self.batch_v1 is not None:
            fail = ctypes.c_size_t(0)
            rc = self.batch_v1(d.ctypes.data_as(P64), s.ctypes.data_as(P64), z.ctypes.data_as(PSZ),
                               ctypes.c_size_t(n), ctypes.byref(attr), idx, ctypes.c_size_t(1),
                               ctypes.byref(fail), ctypes.c_void_p(stream))
        else:
            raise RuntimeError("no cuMemcpyBatchAsync in libcuda")
        if rc != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync failed: {self.drv_err(rc)}")

    def memcpy_loop(self, dsts, srcs, sizes, stream):
        f = self.drv.cuMemcpyAsync
        st = ctypes.c_void_p(stream)
        for a, b, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            rc = f(a, b, n, st)
            if rc != 0:
                raise RuntimeError(f"cuMemcpyAsync failed: {self.drv_err(rc)}")


# ======================================================================================
# torch / triton helpers (imported lazily: the parent process never imports torch)
# ======================================================================================
def init_torch(dev):
    import torch
    torch.cuda.set_device(dev)
    torch.empty(1, device=f"cuda:{dev}")  # create the context on this device only
    return torch


def torch_env(torch, libs, dev):
    d = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "device_count": torch.cuda.device_count(), "current_device": torch.cuda.current_device()}
    try:
        import triton
        d["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        d["triton_error"] = repr(e)
    devs = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devs.append({"index": i, "name": p.name, "sms": p.multi_processor_count,
                     "total_gib": round(p.total_memory / GIB, 1), "uuid": str(getattr(p, "uuid", "?"))})
    d["devices"] = devs
    if torch.cuda.device_count() > 1 and libs is not None and libs.rt is not None:
        # ctypes, not torch.cuda.can_device_access_peer: torch's device guard would cudaSetDevice(peer),
        # creating a context on the peer GPU (CUDA >= 12), which the map test wants to avoid.
        d["cudaDeviceCanAccessPeer"] = {f"{a}->{b}": libs.can_access_peer(a, b)
                                        for a in range(2) for b in range(2) if a != b}
    d["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    d["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    d["host"] = host_identity()
    if libs is not None:
        d["libs"] = libs.info
        try:
            d["ctx_device"] = libs.ctx_device()
        except Exception as e:  # noqa: BLE001
            d["ctx_device"] = repr(e)
    return d


class RawPtr:
    """Duck-typed Triton pointer argument: any object with data_ptr() and dtype."""

    def __init__(self, addr, dtype):
        self.addr, self.dtype = int(addr), dtype

    def data_ptr(self):
        return self.addr


_K = {}


def kernels():
    if _K:
        return _K
    import triton
    import triton.language as tl
    globals()["triton"], globals()["tl"] = triton, tl

    @triton.jit(do_not_specialize=["n_rows"])
    def copy_rows(base, tab, n_rows, BLOCK: tl.constexpr, ALIGN: tl.constexpr, STREAM: tl.constexpr):
        # tab: int64 [3, n_rows] = src, dst, len in elements of base's dtype, relative to base.
        # grid == n_rows: one row per program; grid < n_rows: persistent, rows strided.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        for row in tl.range(pid, n_rows, nprog):
            s = tl.multiple_of(tl.load(tab + row), ALIGN)
            d = tl.multiple_of(tl.load(tab + n_rows + row), ALIGN)
            n = tl.multiple_of(tl.load(tab + 2 * n_rows + row), ALIGN)
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < n
                if STREAM:
                    v = tl.load(base + s + offs, mask=m, cache_modifier=".cg")
                    tl.store(base + d + offs, v, mask=m, cache_modifier=".cs")
                else:
                    v = tl.load(base + s + offs, mask=m)
                    tl.store(base + d + offs, v, mask=m)

    @triton.jit(do_not_specialize=["n_rows"])
    def copy_i2p(tab, n_rows, BLOCK: tl.constexpr):
        # tab: int64 [3, n_rows] = absolute byte addresses and byte lengths (all multiples of 16).
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        for row in tl.range(pid, n_rows, nprog):
            sa = tl.multiple_of(tl.load(tab + row), 16)
            da = tl.multiple_of(tl.load(tab + n_rows + row), 16)
            n = tl.multiple_of(tl.load(tab + 2 * n_rows + row) // 4, 4)
            ps = sa.to(tl.pointer_type(tl.int32))
            pd = da.to(tl.pointer_type(tl.int32))
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < n
                tl.store(pd + offs, tl.load(ps + offs, mask=m), mask=m)

    @triton.jit(do_not_specialize=["n_rows"])
    def verify_rows(dst, tab, n_rows, bad, SALT_: tl.constexpr, BLOCK: tl.constexpr):
        # tab rows: virtual src word index, dst word offset (relative to dst), words.
        row = tl.program_id(0)
        sv = tl.load(tab + row)
        d = tl.load(tab + n_rows + row)
        n = tl.load(tab + 2 * n_rows + row)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            got = tl.load(dst + d + offs, mask=m, other=0)
            exp = ((sv + offs) ^ SALT_).to(tl.int32)
            acc += ((got != exp) & m).to(tl.int32)
        tl.atomic_add(bad, tl.sum(acc, axis=0))

    _K.update(copy=copy_rows, i2p=copy_i2p, verify=verify_rows)
    return _K


def fill_pattern(torch, t_u8, start_word):
    v = t_u8.view(torch.int32)
    torch.arange(start_word, start_word + v.numel(), out=v)
    v.bitwise_xor_(SALT)


def expected_words(torch, start_word, nwords, device):
    return torch.arange(start_word, start_word + nwords, dtype=torch.int32, device=device) ^ SALT


def chunk_rows(src, dst, n, chunk):
    """Split rows longer than `chunk` into chunk-sized rows (vectorised)."""
    cnt = np.maximum((n + chunk - 1) // chunk, 1)
    idx = np.repeat(np.arange(n.size), cnt)
    k = np.arange(idx.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    start = k * chunk
    return src[idx] + start, dst[idx] + start, np.minimum(n[idx] - start, chunk)


def build_table(src_abs, dst_abs, nbytes, chunk, scheme="null", word=4, anchor=0):
    s, d, n = chunk_rows(np.asarray(src_abs, np.int64), np.asarray(dst_abs, np.int64),
                         np.asarray(nbytes, np.int64), int(chunk))
    if scheme == "i2p":
        rows = (s, d, n)
    else:
        base = anchor if scheme == "anchor" else 0
        s, d = s - base, d - base
        if ((s % word) | (d % word) | (n % word)).any():
            raise ValueError("addresses/lengths not multiples of the word size")
        rows = (s // word, d // word, n // word)
    return np.ascontiguousarray(np.stack(rows), dtype=np.int64)


def kcopy(torch, src_addr, dst_addr, nbytes, anchor_t, chunk=256 << 10, warps=8):
    """Kernel copy between absolute addresses, offsets relative to a local anchor tensor."""
    K = kernels()
    tab = build_table([src_addr], [dst_addr], [nbytes], chunk, "anchor", 4, anchor_t.data_ptr())
    t = torch.from_numpy(tab).cuda()
    n = tab.shape[1]
    K["copy"][(n,)](anchor_t.view(torch.int32), t, n, BLOCK=4096, ALIGN=4, STREAM=0, num_warps=warps)
    torch.cuda.synchronize()


def check_copy(torch, src_addr, nbytes, start_word):
    """Copy nbytes from (maybe peer) src_addr into a fresh local buffer with the kernel; compare."""
    dev = torch.cuda.current_device()
    out = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=dev)
    kcopy(torch, src_addr, out.data_ptr(), nbytes, out)
    ok = torch.equal(out.view(torch.int32), expected_words(torch, start_word, nbytes // 4, dev))
    return bool(ok)


def time_gpu(torch, fn, warm=2, reps=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def stats(ts, nbytes):
    med = statistics.median(ts)
    return {"ms": round(med * 1e3, 4), "ms_min": round(min(ts) * 1e3, 4),
            "gbps": round(nbytes / med / 1e9, 1), "samples_ms": [round(t * 1e3, 4) for t in ts]}


def med_us(vals):
    return round(statistics.median(vals) * 1e6, 2)


def storage_as_u8(torch, st):
    try:
        t = torch.empty((0,), dtype=torch.uint8, device=st.device)
        t.set_(st, 0, (st.nbytes(),), (1,))
        return t
    except Exception:  # noqa: BLE001
        ts = torch.storage.TypedStorage(wrap_storage=st, dtype=torch.uint8, _internal=True)
        return torch._utils._rebuild_tensor(ts, 0, (st.nbytes(),), (1,))


def share_torch(t):
    """torch's own export: storage._share_cuda_() -> 8-tuple; made JSON-able."""
    tup = t.untyped_storage()._share_cuda_()
    dev, handle, size, off, rc_handle, rc_off, ev_handle, ev_sync = tup
    return {"device": dev, "handle_b64": base64.b64encode(handle).decode(), "size": size, "offset": off,
            "ref_counter_b64": base64.b64encode(rc_handle).decode(), "ref_counter_offset": rc_off,
            "event_b64": base64.b64encode(ev_handle).decode(), "event_sync_required": bool(ev_sync),
            "handle_len": len(handle), "handle_head": list(handle[:2]),
            "tensor_offset_in_storage_bytes": t.storage_offset() * t.element_size()}


def open_torch(torch, d):
    args = (d["device"], base64.b64decode(d["handle_b64"]), d["size"], d["offset"],
            base64.b64decode(d["ref_counter_b64"]), d["ref_counter_offset"],
            base64.b64decode(d["event_b64"]), d["event_sync_required"])
    st = torch.UntypedStorage._new_shared_cuda(*args)
    return storage_as_u8(torch, st)


class CAI:
    def __init__(self, addr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False),
                                         "version": 3, "strides": None}


# ======================================================================================
# Workloads
# ======================================================================================
def make_pieces(workload, nreq=BATCH, seed=1234):
    """Pieces as (src region, src offset in region, dst offset in dst pool, nbytes)."""
    if workload == "contig":
        return {"region": np.array([0]), "src_off": np.array([0]), "dst_off": np.array([0]),
                "nbytes": np.array([GIB]), "total": GIB}
    rng = np.random.default_rng(seed)
    sb = rng.choice(NBLK, BATCH, replace=False)[:nreq]
    db = rng.choice(NBLK, BATCH, replace=False)[:nreq]
    k = 3 if workload == "tiny" else 4
    lay, req, pc = (a.ravel() for a in np.meshgrid(np.arange(LAYERS), np.arange(nreq), np.arange(k),
                                                    indexing="ij"))
    region = lay // LAYERS_PER_REGION
    lr = lay % LAYERS_PER_REGION
    so = np.asarray(SRC_OFFS, np.int64)[pc]
    do = np.asarray(DST_OFFS, np.int64)[pc]
    nb = np.asarray(SIZES, np.int64)[pc]
    src_off = (lr * NBLK + sb[req]).astype(np.int64) * SRC_PAGE + so
    dst_off = (lay * NBLK + db[req]).astype(np.int64) * DST_PAGE + do
    return {"region": region, "src_off": src_off, "dst_off": dst_off, "nbytes": nb, "total": int(nb.sum())}


def verify_table(p):
    sv = p["region"].astype(np.int64) * REGION_WORDS + p["src_off"] // 4
    s, d, n = chunk_rows(sv, p["dst_off"] // 4, p["nbytes"] // 4, 1 << 16)
    return np.ascontiguousarray(np.stack((s, d, n)), dtype=np.int64)


def variants(workload, side):
    base = dict(kind="kernel", scheme="anchor", chunk=64 << 10, warps=16, block=4096, word=4, align=4,
                grid=0, stream=0)
    out = []

    def add(name, **kw):
        v = dict(base)
        v.update(kw)
        v["name"] = name
        out.append(v)

    if workload == "contig":
        add("c64k_w16")
        add("c256k_w16", chunk=256 << 10)
        add("persist132_c256k_w16", chunk=256 << 10, grid=132)
        add("persist32_c256k_w8", chunk=256 << 10, grid=32, warps=8)
        add("persist16_c256k_w8", chunk=256 << 10, grid=16, warps=8)
        add("ce_batch", kind="ce_batch")
    elif workload == "qwen":
        for ch in (64, 16, 256):
            for w in (16, 8, 4):
                add(f"c{ch}k_w{w}", chunk=ch << 10, warps=w)
        for g in (16, 32, 66, 132, 264, 528):
            add(f"persist{g}_c64k_w8", grid=g, warps=8)
        add("persist132_c256k_w16", grid=132, chunk=256 << 10)
        add("null_base_c64k_w16", scheme="null")
        add("inttoptr_c64k_w16", scheme="i2p")
        add("align1_4B_c64k_w16", align=1)
        add("int64words_c64k_w16", word=8, align=2)
        add("stream_cg_cs_c64k_w16", stream=1)
        add("block1024_c64k_w16", block=1024)
        add("ce_batch", kind="ce_batch")
        add("ce_loop", kind="ce_loop")
    elif workload == "tiny":
        for w in (4, 8, 16):
            add(f"c64k_w{w}", warps=w)
        add("block1024_w4", block=1024, warps=4)
        add("persist132_w8", grid=132, warps=8)
        add("persist528_w4", grid=528, warps=4)
        add("ce_batch", kind="ce_batch")
    return out


class Runner:
    """Builds tables and launches one variant in this process (pull: B, push: A)."""

    def __init__(self, torch, libs, src_addrs, dst_addr, anchor_t):
        self.torch, self.libs = torch, libs
        self.src_addrs = np.asarray(src_addrs, np.int64)
        self.dst_addr = int(dst_addr)
        self.anchor_t = anchor_t
        self.K = kernels()

    def abs_rows(self, p):
        return self.src_addrs[p["region"]] + p["src_off"], self.dst_addr + p["dst_off"], p["nbytes"]

    def prepare(self, v, p):
        torch = self.torch
        s, d, n = self.abs_rows(p)
        if v["kind"] == "ce_batch":
            stream = torch.cuda.current_stream().cuda_stream
            return (lambda: self.libs.memcpy_batch(d, s, n, stream)), {"rows": int(n.size)}
        if v["kind"] == "ce_loop":
            stream = torch.cuda.current_stream().cuda_stream
            return (lambda: self.libs.memcpy_loop(d, s, n, stream)), {"rows": int(n.size)}
        dt = torch.int64 if v["word"] == 8 else torch.int32
        t0 = time.perf_counter()
        tab = build_table(s, d, n, v["chunk"], v["scheme"], v["word"], self.anchor_t.data_ptr())
        t1 = time.perf_counter()
        tab_t = torch.from_numpy(tab).cuda()
        rows = tab.shape[1]
        grid = (rows,) if not v["grid"] else (min(v["grid"], rows),)
        info = {"rows": rows, "grid": grid[0], "table_build_ms": round((t1 - t0) * 1e3, 2)}
        if v["scheme"] == "i2p":
            k = self.K["i2p"]
            return (lambda: k[grid](tab_t, rows, BLOCK=v["block"], num_warps=v["warps"])), info
        base = self.anchor_t.view(dt) if v["scheme"] == "anchor" else RawPtr(0, dt)
        k = self.K["copy"]
        return (lambda: k[grid](base, tab_t, rows, BLOCK=v["block"], ALIGN=v["align"], STREAM=v["stream"],
                                num_warps=v["warps"])), info


class Verifier:
    """Owner-side check of the dst pool: every piece word, and that nothing else was written."""

    def __init__(self, torch, dst_u8):
        self.torch, self.dst, self.i32 = torch, dst_u8, dst_u8.view(torch.int32)
        self.tabs = {}

    def poison(self):
        self.dst.fill_(0xFF)
        self.torch.cuda.synchronize()

    def check(self, workload):
        torch = self.torch
        if workload not in self.tabs:
            p = make_pieces(workload)
            vt = verify_table(p)
            self.tabs[workload] = (torch.from_numpy(vt).cuda(), vt.shape[1], p["total"] // 4)
        vt, rows, words = self.tabs[workload]
        bad = torch.zeros(1, dtype=torch.int32, device=self.dst.device)
        kernels()["verify"][(rows,)](self.i32, vt, rows, bad, SALT_=SALT, BLOCK=2048, num_warps=8)
        written = sum(int(torch.count_nonzero(c != -1)) for c in self.i32.split(1 << 28))
        bad = int(bad.item())
        return {"ok": bad == 0 and written == words, "bad_words": bad, "written_words": written,
                "expected_words": words}


def run_variants(rep, key, runner, workloads, until, poison, verify, torch):
    """Time every variant of every workload; poison + verify the first run of each."""
    for wl in workloads:
        p = make_pieces(wl)
        rep.put(f"{key}/{wl}/_total_bytes", p["total"])
        for v in variants(wl, key):
            name = f"{key}/{wl}/{v['name']}"
            if time.time() > until:
                rep.put(name, {"skipped": "time budget"})
                continue
            try:
                fn, info = runner.prepare(v, p)
                poison()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                info["first_run_ms_incl_compile"] = round((time.perf_counter() - t0) * 1e3, 2)
                info["verify"] = verify(wl)
                if v["kind"] == "ce_loop":
                    ts = time_gpu(torch, fn, warm=0, reps=1)
                elif wl == "contig" or wl == "qwen":
                    ts = time_gpu(torch, fn, warm=2, reps=5)
                else:
                    ts = time_gpu(torch, fn, warm=3, reps=10)
                info.update(stats(ts, p["total"]))
                info["config"] = {k: v[k] for k in ("kind", "scheme", "chunk", "warps", "block", "word",
                                                     "align", "grid", "stream")}
                rep.put(name, info)
                rep.log(f"{name}: {info['ms']:.3f} ms {info['gbps']:.0f} GB/s ok={info['verify']['ok']}")
            except Exception as e:  # noqa: BLE001
                rep.err(name, e)


# ======================================================================================
# Scenario "map": how B maps A's memory
# ======================================================================================
def a_map(conn, rep, cfg):
    torch = init_torch(cfg["a_dev"])
    libs = CudaLibs()
    rep.after = libs.clear
    rep.put("env", torch_env(torch, libs, cfg["a_dev"]))
    dev = torch.cuda.current_device()
    pads = [torch.empty(1000, dtype=torch.uint8, device=dev) for _ in range(3)]  # noqa: F841
    t_small = torch.empty(64 << 10, dtype=torch.uint8, device=dev)      # small pool: inside a 2 MiB segment
    filler = torch.empty(3 << 20, dtype=torch.uint8, device=dev)        # noqa: F841
    t_mid = torch.empty(3 << 20, dtype=torch.uint8, device=dev)         # large pool: inside a 20 MiB segment
    t_big = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    starts = {"small": 0, "mid": 1 << 24, "big": 1 << 26}
    tensors = {"small": t_small, "mid": t_mid, "big": t_big}
    for k, t in tensors.items():
        fill_pattern(torch, t, starts[k])
    torch.cuda.synchronize()
    hs = {"host": host_identity(), "uuid": str(torch.cuda.get_device_properties(dev).uuid),
          "starts": starts, "items": {}}
    for k, t in tensors.items():
        item = {"nbytes": t.numel(), "ptr": t.data_ptr()}
        try:
            item["rt"] = libs.export(t.data_ptr(), t.numel(), "rt", dev)
            item["drv_handle_equal_rt"] = (libs.get_handle(t.data_ptr() - item["rt"]["offset"], "drv").hex()
                                           == item["rt"]["handle"])
        except Exception as e:  # noqa: BLE001
            item["rt_error"] = short_tb(e)[0]
        try:
            item["torch"] = share_torch(t)
            h = base64.b64decode(item["torch"]["handle_b64"])
            if "rt" in item:
                item["torch_offset_equals_ctypes_offset"] = item["torch"]["offset"] == item["rt"]["offset"]
                item["torch_handle_is_v2_c_plus_raw"] = (len(h) == 66 and h[0] == 2 and h[1] == ord("c")
                                                         and h[2:].hex() == item["rt"]["handle"])
        except Exception as e:  # noqa: BLE001
            item["torch_error"] = short_tb(e)[0]
        if "rt" in item and item["rt"]["offset"]:
            try:
                hi = libs.get_handle(t.data_ptr(), "rt", dev)
                item["interior_ptr_handle"] = {"rc": "0:cudaSuccess", "equals_base_handle": hi.hex() == item["rt"]["handle"]}
            except Exception as e:  # noqa: BLE001
                item["interior_ptr_handle"] = {"error": short_tb(e)[0]}
        hs["items"][k] = item
    export = {}
    for k, v in hs["items"].items():
        e = {kk: vv for kk, vv in v.items() if kk != "torch"}
        if "torch" in v:
            e["torch_meta"] = {x: v["torch"][x] for x in ("device", "size", "offset", "handle_len", "handle_head",
                                                          "event_sync_required")}
        export[k] = e
    rep.put("export", export)
    t_json = time.perf_counter()
    wire = json.dumps(hs)
    rep.put("handshake_json_bytes", len(wire))
    rep.put("handshake_json_ms", round((time.perf_counter() - t_json) * 1e3, 3))
    conn.send(wire)
    msg = recv(conn, timeout=max(10.0, cfg["soft_deadline"] - time.time() + 5))
    rep.put("b_finished", msg)


def b_map(conn, rep, cfg):
    torch = init_torch(cfg["b_dev"])
    libs = CudaLibs()
    rep.after = libs.clear
    dev = torch.cuda.current_device()
    rep.put("env", torch_env(torch, libs, dev))
    hs = json.loads(recv(conn, 120))
    rep.put("peer_host", hs["host"])
    rep.put("same_boot_id", hs["host"].get("boot_id") == host_identity().get("boot_id"))
    items, starts = hs["items"], hs["starts"]
    big = items["big"]
    state = {}

    # 1. runtime API, lazy peer flag only, no cudaDeviceEnablePeerAccess, no context on the peer GPU.
    def t1():
        h = bytes.fromhex(big["rt"]["handle"])
        t0 = time.perf_counter()
        base = libs.open(h, "rt", lazy=True, device=dev)
        open_ms = (time.perf_counter() - t0) * 1e3
        state["big_base"] = base
        addr = base + big["rt"]["offset"]
        ok = check_copy(torch, addr, big["nbytes"], starts["big"])
        return {"open_ms": round(open_ms, 3), "mapped_base": hex(base), "triton_read_ok": ok,
                "ptr_device_ordinal": libs.ptr_device_ordinal(addr),
                "peer_context_created": torch.cuda.is_initialized() and _has_ctx(libs, torch, 0)}
    r1 = rep.attempt("rt_open_lazy_triton_read", t1)
    rep.put("lazy_flag_sufficient", bool(r1 and r1.get("triton_read_ok")))

    # 2. driver API open of the 'mid' allocation (a different one), read, close.
    def t2():
        mid = items["mid"]
        base = libs.open(bytes.fromhex(mid["rt"]["handle"]), "drv", lazy=True)
        ok = check_copy(torch, base + mid["rt"]["offset"], mid["nbytes"], starts["mid"])
        return {"triton_read_ok": ok, "offset": mid["rt"]["offset"], "close": libs.close(base, "drv")}
    rep.attempt("drv_open_mid_read_close", t2)

    # 3. __cuda_array_interface__ wrap of a ctypes mapping -> torch tensor.
    def t3():
        addr = state["big_base"] + big["rt"]["offset"]
        t = torch.as_tensor(CAI(addr, big["nbytes"]))
        loc = t.to(f"cuda:{dev}")
        ok = torch.equal(loc.view(torch.int32), expected_words(torch, starts["big"], big["nbytes"] // 4, dev))
        return {"tensor_device": str(t.device), "data_ptr_matches": t.data_ptr() == addr, "copy_ok": ok}
    rep.attempt("cai_wrap", t3)

    # 4. torch's own machinery (_new_shared_cuda) for 'small' and 'mid'.
    for k in ("small", "mid"):
        def t4(k=k):
            it = items[k]
            t0 = time.perf_counter()
            t = open_torch(torch, it["torch"])
            open_ms = (time.perf_counter() - t0) * 1e3
            off = it["torch"]["tensor_offset_in_storage_bytes"]
            view = t[off:off + it["nbytes"]]
            loc = view.to(f"cuda:{dev}")
            ok = torch.equal(loc.view(torch.int32), expected_words(torch, starts[k], it["nbytes"] // 4, dev))
            state[f"torch_{k}"] = t
            return {"open_ms": round(open_ms, 3), "tensor_device": str(t.device), "copy_to_local_ok": ok,
                    "ptr_device_ordinal": libs.ptr_device_ordinal(view.data_ptr())}
        rep.attempt(f"torch_new_shared_{k}", t4)

    # 5. Triton on cuda:B reading the torch-mapped (cuda:A-labelled) memory after explicit peer enable.
    def t5():
        peer = items["mid"]["torch"]["device"]
        en = libs.enable_peer(peer, dev) if peer != dev else "same device"
        it = items["mid"]
        t = state["torch_mid"]
        off = it["torch"]["tensor_offset_in_storage_bytes"]
        ok = check_copy(torch, t.data_ptr() + off, it["nbytes"], starts["mid"])
        return {"enable_peer_access": en, "triton_read_ok": ok}
    rep.attempt("torch_mapped_triton_read_after_enable_peer", t5)

    # 6. torch open of an allocation already opened through ctypes in this process.
    def t6():
        t = open_torch(torch, big["torch"])
        loc = t[:1 << 20].to(f"cuda:{dev}")
        ok = torch.equal(loc.view(torch.int32), expected_words(torch, starts["big"], (1 << 20) // 4, dev))
        return {"ok": ok, "same_address_as_ctypes": t.data_ptr() == state["big_base"]}
    rep.attempt("torch_open_after_ctypes_open", t6)

    # 7. open the same handle twice through ctypes, close the second, check the first still works.
    def t7():
        h = bytes.fromhex(big["rt"]["handle"])
        libs.rt.cudaSetDevice(dev)
        rc, p2 = libs.open_rc(h, "rt")
        out = {"second_open": rc, "same_pointer": p2 == state["big_base"] if p2 else None}
        if rc.startswith("0:"):
            out["close_second"] = libs.close(p2, "rt")
            out["first_still_readable"] = check_copy(torch, state["big_base"] + big["rt"]["offset"],
                                                     1 << 20, starts["big"])
        return out
    rep.attempt("open_twice", t7)

    def t8():
        t0 = time.perf_counter()
        rc = libs.close(state["big_base"], "rt")
        return {"rc": rc, "ms": round((time.perf_counter() - t0) * 1e3, 3)}
    rep.attempt("close", t8)
    torch.cuda.synchronize()
    conn.send("done")


def _has_ctx(libs, torch, dev_index):
    """Whether this process holds a primary context on dev_index (cuDevicePrimaryCtxGetState)."""
    try:
        d = libs.drv
        flags, active = ctypes.c_uint(0), ctypes.c_int(0)
        d.cuDevicePrimaryCtxGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                                                 ctypes.POINTER(ctypes.c_int)]
        if d.cuDevicePrimaryCtxGetState(dev_index, ctypes.byref(flags), ctypes.byref(active)) == 0:
            return bool(active.value)
    except Exception:  # noqa: BLE001
        pass
    return None


# ======================================================================================
# Scenario "bench": pull vs push, overheads, synchronisation
# ======================================================================================
def tcp_echo_server():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def run():
        try:
            c, _ = srv.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = c.recv(4096)
                if not data:
                    break
                c.sendall(data)
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1]


def a_bench(conn, rep, cfg):
    torch = init_torch(cfg["a_dev"])
    libs = CudaLibs()
    rep.after = libs.clear
    dev = torch.cuda.current_device()
    rep.put("env", torch_env(torch, libs, dev))
    regions = [torch.empty(REGION_BYTES, dtype=torch.uint8, device=dev) for _ in range(N_SRC_REGIONS)]
    for r, t in enumerate(regions):
        fill_pattern(torch, t, r * REGION_WORDS)
    marker = torch.zeros(1 << 20, dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    port = tcp_echo_server()
    hs = {"host": host_identity(), "uuid": str(torch.cuda.get_device_properties(dev).uuid), "tcp_port": port,
          "regions": [libs.export(t.data_ptr(), t.numel(), cfg["api"], dev) for t in regions],
          "marker": libs.export(marker.data_ptr(), marker.numel() * 4, cfg["api"], dev)}
    conn.send(json.dumps(hs))
    hsb = json.loads(recv(conn, 120))
    dinfo = hsb["dst"]
    dst_map = None
    try:
        t0 = time.perf_counter()
        dst_map = libs.open(bytes.fromhex(dinfo["handle"]), dinfo["api"], lazy=True, device=dev)
        rep.put("open_dst_ms", round((time.perf_counter() - t0) * 1e3, 3))
        if cfg["explicit_peer"]:
            rep.put("enable_peer", libs.enable_peer(cfg["b_dev"], dev))
    except Exception as e:  # noqa: BLE001
        rep.err("open_dst", e)

    # torch copy_ reference GPU A -> GPU B, same byte counts as the workloads.
    def refs():
        out = {}
        sizes = {"contig": GIB, "qwen": make_pieces("qwen")["total"], "tiny": make_pieces("tiny")["total"]}
        n = max(sizes.values())
        a = torch.empty(n, dtype=torch.uint8, device=f"cuda:{cfg['a_dev']}")
        b = torch.empty(n, dtype=torch.uint8, device=f"cuda:{cfg['b_dev']}")
        a.fill_(1)
        b.fill_(2)

        def sync():
            torch.cuda.synchronize(cfg["a_dev"])
            torch.cuda.synchronize(cfg["b_dev"])

        for name, sz in list(sizes.items()) + [("qwen_reverse_B_to_A", sizes["qwen"])]:
            if name.endswith("reverse_B_to_A"):
                def f():
                    a[:sz].copy_(b[:sz])
            else:
                def f():
                    b[:sz].copy_(a[:sz])
            for _ in range(2):
                f()
            sync()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                f()
                sync()
                ts.append(time.perf_counter() - t0)
            out[name] = stats(ts, sz)
        return out
    r = rep.attempt("torch_ref", refs)
    torch.cuda.empty_cache()  # the reference buffers died with refs()
    if r:
        rep.log("torch copy_ A->B: " + ", ".join(f"{k} {v['gbps']} GB/s" for k, v in r.items()))
    conn.send(("ref_done",))
    msg = recv(conn, max(30.0, cfg["pull_until"] - time.time() + 60))
    rep.put("pull_phase_msg", msg[0])

    # ---- push: A's kernel writes into B's pages. B poisons and verifies on command.
    def remote_poison():
        conn.send(("poison",))
        while True:
            m = recv(conn, 60)
            if isinstance(m, tuple):  # (a late verify reply, a dict, is dropped)
                if m[0] != "ok":
                    raise RuntimeError(f"dst could not poison its pool: {m}")
                return

    def remote_verify(wl):
        conn.send(("verify", wl))
        while True:
            m = recv(conn, 60)
            if isinstance(m, dict):
                return m

    if dst_map is not None:
        runner = Runner(torch, libs, [t.data_ptr() for t in regions], dst_map + dinfo["offset"], regions[0])
        run_variants(rep, "push", runner, ("qwen", "contig", "tiny"), cfg["push_until"], remote_poison,
                     remote_verify, torch)
    conn.send(("push_done",))

    # ---- IPC event: GPU-side ordering of B's read after A's write without a host sync on A.
    ev = torch.cuda.Event(interprocess=True)
    ev.record()
    torch.cuda.synchronize()
    try:
        h = ev.ipc_handle()
        conn.send(("ipc_event", base64.b64encode(h).decode(), dev))
    except Exception as e:  # noqa: BLE001
        rep.err("ipc_event_handle", e)
        conn.send(("ipc_event", None, dev))
    ready = recv(conn, 90)
    rounds = []
    if ready[0] == "ev_ready" and ready[1]:
        for k, wait in ((1, True), (2, True), (3, True), (4, False)):
            torch.cuda._sleep(cfg["sleep_cycles"])
            marker.fill_(k)
            ev.record()
            t_send = time.perf_counter()
            conn.send(("go", k, wait))
            ack = recv(conn, 30)
            torch.cuda.synchronize()
            rounds.append({"k": k, "wait": wait, "b": ack[1], "a_send_to_ack_ms": round((time.perf_counter() - t_send) * 1e3, 3)})
        conn.send(("ev_end",))
    rep.put("ipc_event_rounds", rounds)
    closed = recv(conn, 60)
    rep.put("b_close", closed[1] if len(closed) > 1 else closed)
    if dst_map is not None:
        t0 = time.perf_counter()
        rc = libs.close(dst_map, dinfo["api"])
        rep.put("close_dst", {"rc": rc, "ms": round((time.perf_counter() - t0) * 1e3, 3)})
    conn.send(("bye",))


def b_bench(conn, rep, cfg):
    torch = init_torch(cfg["b_dev"])
    libs = CudaLibs()
    rep.after = libs.clear
    dev = torch.cuda.current_device()
    rep.put("env", torch_env(torch, libs, dev))
    dst = torch.empty(DST_BYTES, dtype=torch.uint8, device=dev)
    ver = Verifier(torch, dst)
    ver.poison()
    hs = json.loads(recv(conn, 120))
    rep.put("same_boot_id", hs["host"].get("boot_id") == host_identity().get("boot_id"))
    conn.send(json.dumps({"host": host_identity(), "dst": libs.export(dst.data_ptr(), dst.numel(), cfg["api"], dev)}))
    src_addrs, maps, open_ms = [], [], []
    try:
        if cfg["explicit_peer"]:
            rep.put("enable_peer", libs.enable_peer(cfg["a_dev"], dev))
        for r in hs["regions"]:
            t0 = time.perf_counter()
            base = libs.open(bytes.fromhex(r["handle"]), r["api"], lazy=True, device=dev)
            open_ms.append(round((time.perf_counter() - t0) * 1e3, 3))
            maps.append((base, r["api"]))
            src_addrs.append(base + r["offset"])
        t0 = time.perf_counter()
        mk = hs["marker"]
        mbase = libs.open(bytes.fromhex(mk["handle"]), mk["api"], lazy=True, device=dev)
        maps.append((mbase, mk["api"]))
        marker_addr = mbase + mk["offset"]
        open_ms.append(round((time.perf_counter() - t0) * 1e3, 3))
        rep.put("open_ms", open_ms)
        rep.put("peer_context_on_A_gpu", _has_ctx(libs, torch, cfg["a_dev"]))
    except Exception as e:  # noqa: BLE001
        rep.err("open_src", e)
        marker_addr = None
    sock = None
    try:
        sock = socket.create_connection(("127.0.0.1", hs["tcp_port"]), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except Exception as e:  # noqa: BLE001
        rep.err("tcp_connect", e)
    recv(conn, 120)  # ref_done

    # device-local copy reference on B's GPU (1 GiB inside the dst pool).
    def local_ref():
        a, b = dst[:GIB], dst[2 * GIB:3 * GIB]
        return stats(time_gpu(torch, lambda: b.copy_(a)), GIB)
    rep.attempt("local_copy_1GiB", local_ref)

    runner = None
    if len(src_addrs) == N_SRC_REGIONS:
        runner = Runner(torch, libs, src_addrs, dst.data_ptr(), dst)
        run_variants(rep, "pull", runner, ("qwen", "contig", "tiny"), cfg["pull_until"], ver.poison, ver.check,
                     torch)
    conn.send(("pull_done",))

    # ---- serve push verification
    while True:
        cmd = recv(conn, max(60.0, cfg["push_until"] - time.time() + 60))
        if cmd[0] == "poison":
            try:
                ver.poison()
                conn.send(("ok",))
            except Exception as e:  # noqa: BLE001
                conn.send(("err", short_tb(e)[0]))
        elif cmd[0] == "verify":
            try:
                conn.send(ver.check(cmd[1]))
            except Exception as e:  # noqa: BLE001
                conn.send({"ok": False, "error": short_tb(e)[0]})
        else:
            break

    # ---- overheads (table build, upload, launch) and synchronisation costs, B alone
    if runner is not None:
        rep.attempt("overhead_qwen_c64k", overhead_tests, torch, runner)
        rep.attempt("sync_costs", sync_tests, torch, runner, sock)

    # ---- IPC event ordering test
    msg = recv(conn, 90)
    ev_b, ev_info = None, {}
    if msg[0] == "ipc_event" and msg[1] and marker_addr is not None:
        h = base64.b64decode(msg[1])
        for d in (dev, msg[2]):
            try:
                ev_b = torch.cuda.Event.from_ipc_handle(torch.device("cuda", d), h)
                ev_info["opened_on_device"] = d
                break
            except Exception as e:  # noqa: BLE001
                ev_info[f"open_on_{d}_error"] = short_tb(e)[0]
    rep.put("ipc_event_open", ev_info)
    conn.send(("ev_ready", ev_b is not None))
    if ev_b is not None:
        local = torch.zeros(4, dtype=torch.int32, device=dev)
        mtab = marker_table(torch, marker_addr, local.data_ptr(), 16, local.data_ptr())  # uploaded before any wait
        while True:
            m = recv(conn, 60)
            if m[0] != "go":
                break
            _, k, wait = m
            t_recv = time.perf_counter()
            if wait:
                torch.cuda.current_stream().wait_event(ev_b)
            t_wait = time.perf_counter()
            kernels()["copy"][(1,)](local, mtab, 1, BLOCK=4096, ALIGN=4, STREAM=0, num_warps=4)
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
            t_done = time.perf_counter()
            val = int(local[0].item())
            conn.send(("ack", {"read": val, "expected": k, "fresh": val == k,
                               "wait_event_host_us": round((t_wait - t_recv) * 1e6, 2),
                               "recv_to_done_ms": round((t_done - t_recv) * 1e3, 3)}))
    # ---- teardown
    closes = []
    for base, api in maps:
        t0 = time.perf_counter()
        rc = libs.close(base, api)
        closes.append({"rc": rc, "ms": round((time.perf_counter() - t0) * 1e3, 3)})
    conn.send(("closed", closes))
    try:
        recv(conn, 30)
    except Exception:  # noqa: BLE001
        pass
    if sock is not None:
        sock.close()


def marker_table(torch, src_addr, dst_addr, nbytes, anchor):
    t = torch.tensor([[(src_addr - anchor) // 4], [(dst_addr - anchor) // 4], [nbytes // 4]],
                     dtype=torch.int64).cuda()
    torch.cuda.synchronize()
    return t


def overhead_tests(torch, runner):
    p = make_pieces("qwen")
    s, d, n = runner.abs_rows(p)
    anchor = runner.anchor_t.data_ptr()
    out = {"pieces": int(n.size)}
    tb = []
    for _ in range(5):
        t0 = time.perf_counter()
        tab = build_table(s, d, n, 64 << 10, "anchor", 4, anchor)
        tb.append(time.perf_counter() - t0)
    out["rows"] = tab.shape[1]
    out["table_bytes"] = tab.nbytes
    out["numpy_build_us"] = med_us(tb)
    up = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = torch.from_numpy(tab).cuda()
        torch.cuda.synchronize()
        up.append(time.perf_counter() - t0)
    out["h2d_pageable_us"] = med_us(up)
    pinned = torch.empty(tab.shape, dtype=torch.int64, pin_memory=True)
    dev_t = torch.empty(tab.shape, dtype=torch.int64, device=torch.cuda.current_device())
    up = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pinned.numpy()[...] = tab
        dev_t.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        up.append(time.perf_counter() - t0)
    out["h2d_pinned_incl_host_copy_us"] = med_us(up)
    K = kernels()
    rows = tab.shape[1]
    base = runner.anchor_t.view(torch.int32)

    def launch():
        K["copy"][(rows,)](base, dev_t, rows, BLOCK=4096, ALIGN=4, STREAM=0, num_warps=16)
    launch()
    torch.cuda.synchronize()
    lt = []
    for _ in range(10):
        t0 = time.perf_counter()
        launch()
        lt.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    out["launch_host_us"] = med_us(lt)
    e2e = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tab2 = build_table(s, d, n, 64 << 10, "anchor", 4, anchor)
        pinned.numpy()[...] = tab2
        dev_t.copy_(pinned, non_blocking=True)
        launch()
        torch.cuda.synchronize()
        e2e.append(time.perf_counter() - t0)
    out["e2e_build_upload_launch_sync_ms"] = round(statistics.median(e2e) * 1e3, 3)
    kt = time_gpu(torch, launch, warm=1, reps=5)
    out["kernel_only_ms"] = round(statistics.median(kt) * 1e3, 3)
    del t
    return out


def sync_tests(torch, runner, sock):
    out = {}
    K = kernels()
    dev = torch.cuda.current_device()
    tiny_src = torch.zeros(4096, dtype=torch.int32, device=dev)
    tiny_dst = torch.zeros(4096, dtype=torch.int32, device=dev)
    tab = marker_table(torch, tiny_src.data_ptr(), tiny_dst.data_ptr(), 16, tiny_dst.data_ptr())

    def tiny():
        K["copy"][(1,)](tiny_dst, tab, 1, BLOCK=4096, ALIGN=4, STREAM=0, num_warps=4)
    tiny()
    torch.cuda.synchronize()
    v = []
    for _ in range(200):
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        v.append(time.perf_counter() - t0)
    out["synchronize_idle_us"] = med_us(v)
    v = []
    for _ in range(50):
        t0 = time.perf_counter()
        tiny()
        torch.cuda.synchronize()
        v.append(time.perf_counter() - t0)
    out["tiny_kernel_launch_plus_synchronize_us"] = med_us(v)
    ev = torch.cuda.Event()
    v = []
    for _ in range(50):
        t0 = time.perf_counter()
        tiny()
        ev.record()
        ev.synchronize()
        v.append(time.perf_counter() - t0)
    out["tiny_kernel_event_record_synchronize_us"] = med_us(v)
    v, polls = [], []
    for _ in range(50):
        t0 = time.perf_counter()
        tiny()
        ev.record()
        c = 0
        while not ev.query():
            c += 1
        v.append(time.perf_counter() - t0)
        polls.append(c)
    out["tiny_kernel_event_query_poll_us"] = med_us(v)
    out["event_query_polls_median"] = statistics.median(polls)
    v = []
    for _ in range(200):
        t0 = time.perf_counter()
        ev.record()
        v.append(time.perf_counter() - t0)
    out["event_record_host_us"] = med_us(v)
    if sock is not None:
        buf = b"x" * 64
        v = []
        for _ in range(300):
            t0 = time.perf_counter()
            sock.sendall(buf)
            got = 0
            while got < len(buf):
                got += len(sock.recv(4096))
            v.append(time.perf_counter() - t0)
        out["tcp_rtt_64B_us"] = med_us(v)
    # one request (48 layers x 4 pieces): build table + upload + kernel + event sync + notify over TCP.
    p = make_pieces("qwen", nreq=1)
    s, d, n = runner.abs_rows(p)
    anchor = runner.anchor_t.data_ptr()
    base = runner.anchor_t.view(torch.int32)
    parts = {"build": [], "upload": [], "launch": [], "gpu_wait": [], "notify": [], "total": []}
    for i in range(22):
        t0 = time.perf_counter()
        tabn = build_table(s, d, n, 64 << 10, "anchor", 4, anchor)
        t1 = time.perf_counter()
        tt = torch.from_numpy(tabn).cuda(non_blocking=False)
        t2 = time.perf_counter()
        rows = tabn.shape[1]
        K["copy"][(rows,)](base, tt, rows, BLOCK=4096, ALIGN=4, STREAM=0, num_warps=16)
        ev.record()
        t3 = time.perf_counter()
        ev.synchronize()
        t4 = time.perf_counter()
        if sock is not None:
            sock.sendall(b"d" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(4096))
        t5 = time.perf_counter()
        if i >= 2:
            for k, a, b in (("build", t0, t1), ("upload", t1, t2), ("launch", t2, t3), ("gpu_wait", t3, t4),
                            ("notify", t4, t5), ("total", t0, t5)):
                parts[k].append(b - a)
    out["one_request_e2e_us"] = {k: med_us(v) for k, v in parts.items()}
    out["one_request_bytes"] = p["total"]
    return out


# ======================================================================================
# Scenario "cvd": each process sees only its own GPU
# ======================================================================================
def a_cvd(conn, rep, cfg):
    torch = init_torch(0)
    libs = CudaLibs()
    rep.after = libs.clear
    rep.put("env", torch_env(torch, libs, 0))
    t = torch.empty(GIB, dtype=torch.uint8, device=0)
    fill_pattern(torch, t, 0)
    torch.cuda.synchronize()
    hs = {"host": host_identity(), "uuid": str(torch.cuda.get_device_properties(0).uuid),
          "rt": libs.export(t.data_ptr(), t.numel(), "rt", 0)}
    try:
        hs["torch"] = share_torch(t)
    except Exception as e:  # noqa: BLE001
        rep.err("torch_share", e)
    conn.send(json.dumps(hs))
    rep.put("b_finished", recv(conn, max(10.0, cfg["soft_deadline"] - time.time() + 5)))


def b_cvd(conn, rep, cfg):
    torch = init_torch(0)
    libs = CudaLibs()
    rep.after = libs.clear
    rep.put("env", torch_env(torch, libs, 0))
    hs = json.loads(recv(conn, 120))
    rep.put("peer_uuid_visible_here", hs["uuid"] in [str(torch.cuda.get_device_properties(i).uuid)
                                                      for i in range(torch.cuda.device_count())])
    st = {}

    def t1():
        base = libs.open(bytes.fromhex(hs["rt"]["handle"]), "rt", lazy=True, device=0)
        st["base"] = base
        addr = base + hs["rt"]["offset"]
        return {"triton_read_64MiB_ok": check_copy(torch, addr, 64 << 20, 0),
                "ptr_device_ordinal": libs.ptr_device_ordinal(addr)}
    rep.attempt("rt_open_lazy_triton_read", t1)

    def t2():
        addr = st["base"] + hs["rt"]["offset"]
        dst = torch.empty(GIB, dtype=torch.uint8, device=0)
        tab = build_table([addr], [dst.data_ptr()], [GIB], 256 << 10, "anchor", 4, dst.data_ptr())
        tt = torch.from_numpy(tab).cuda()
        rows = tab.shape[1]
        K = kernels()
        out = {}
        for name, grid, w in (("c256k_w16", rows, 16), ("persist132_c256k_w16", 132, 16)):
            out[name] = stats(time_gpu(torch, lambda: K["copy"][(grid,)](dst.view(torch.int32), tt, rows, BLOCK=4096,
                                                                          ALIGN=4, STREAM=0, num_warps=w)), GIB)
        out["ok"] = torch.equal(dst.view(torch.int32)[:1 << 20], expected_words(torch, 0, 1 << 20, 0))
        return out
    rep.attempt("pull_1GiB", t2)

    def t3():
        t = open_torch(torch, hs["torch"])
        ok = torch.equal(t[:64 << 20].view(torch.int32), expected_words(torch, 0, (64 << 20) // 4, 0))
        return {"tensor_device": str(t.device), "ok": ok}
    if "torch" in hs:
        rep.attempt("torch_new_shared", t3)
    if "base" in st:
        rep.put("close", libs.close(st["base"], "rt"))
    torch.cuda.synchronize()
    conn.send("done")


# ======================================================================================
# Scenario "expandable": PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# ======================================================================================
def a_exp(conn, rep, cfg):
    torch = init_torch(cfg["a_dev"])
    libs = CudaLibs()
    rep.after = libs.clear
    dev = torch.cuda.current_device()
    rep.put("env", torch_env(torch, libs, dev))
    t = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    fill_pattern(torch, t, 0)
    torch.cuda.synchronize()
    hs = {"host": host_identity()}
    rep.attempt("address_range", lambda: dict(zip(("base", "size"), libs.address_range(t.data_ptr()))) | {"ptr": t.data_ptr()})
    try:
        hs["rt"] = libs.export(t.data_ptr(), t.numel(), "rt", dev)
        rep.put("rt_export", "ok")
    except Exception as e:  # noqa: BLE001
        rep.err("rt_export", e)
    try:
        hs["torch"] = share_torch(t)
        rep.put("torch_share", {k: hs["torch"][k] for k in ("handle_len", "handle_head", "offset", "size")})
    except Exception as e:  # noqa: BLE001
        rep.err("torch_share", e)
    conn.send(json.dumps(hs))
    rep.put("b_finished", recv(conn, max(10.0, cfg["soft_deadline"] - time.time() + 5)))


def b_exp(conn, rep, cfg):
    torch = init_torch(cfg["b_dev"])
    libs = CudaLibs()
    rep.after = libs.clear
    dev = torch.cuda.current_device()
    rep.put("env", torch_env(torch, libs, dev))
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            rep.put("yama_ptrace_scope", f.read().strip())
    except Exception as e:  # noqa: BLE001
        rep.put("yama_ptrace_scope", repr(e))
    hs = json.loads(recv(conn, 120))
    if "rt" in hs:
        def t0():
            base = libs.open(bytes.fromhex(hs["rt"]["handle"]), "rt", lazy=True, device=dev)
            ok = check_copy(torch, base + hs["rt"]["offset"], 64 << 20, 0)
            return {"ok": ok, "close": libs.close(base, "rt")}
        rep.attempt("rt_open", t0)
    if "torch" in hs:
        def t1():
            t = open_torch(torch, hs["torch"])
            loc = t[:64 << 20].to(f"cuda:{dev}")
            return {"tensor_device": str(t.device),
                    "ok": torch.equal(loc.view(torch.int32), expected_words(torch, 0, (64 << 20) // 4, dev))}
        rep.attempt("torch_new_shared", t1)
    torch.cuda.synchronize()
    conn.send("done")


# ======================================================================================
# Orchestration (parent process: never imports torch)
# ======================================================================================
SCENARIOS = {  # name: (A function, B function, A env, B env, budget seconds)
    "map": (a_map, b_map, {}, {}, 45),
    "cvd": (a_cvd, b_cvd, {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}, 35),
    "expandable": (a_exp, b_exp, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                   {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, 30),
    "bench": (a_bench, b_bench, {}, {}, 150),
}


def _child(role, scen, env, conn, res, cfg):
    global T0
    T0 = cfg.get("t0", T0)  # log times relative to the parent's start
    os.environ.update(env)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    rep = Reporter(res, role, scen)
    try:
        fn = SCENARIOS[scen][0 if role == "A" else 1]
        fn(conn, rep, cfg)
        rep.put("_status", "finished")
    except BaseException as e:  # noqa: BLE001
        rep.err("_fatal", e)
    finally:
        try:
            res.send(("end", role))
        except Exception:  # noqa: BLE001
            pass


def set_path(d, path, value):
    keys = path.split("/")
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def run_pair(scen, cfg_base, global_deadline):
    import multiprocessing as mp
    from multiprocessing.connection import wait
    a_fn, b_fn, env_a, env_b, budget = SCENARIOS[scen]
    start = time.time()
    deadline = min(start + budget, global_deadline)
    cfg = dict(cfg_base)
    cfg["soft_deadline"] = deadline - 6
    span = cfg["soft_deadline"] - start - 25  # ~25 s for start-up, mapping, sync tests, teardown
    cfg["pull_until"] = start + 25 + 0.45 * span
    cfg["push_until"] = start + 25 + 0.9 * span
    out = {"A": {}, "B": {}, "budget_s": round(deadline - start, 1)}
    ctx = mp.get_context("spawn")
    a_conn, b_conn = ctx.Pipe(duplex=True)
    ra_recv, ra_send = ctx.Pipe(duplex=False)
    rb_recv, rb_send = ctx.Pipe(duplex=False)
    pa = ctx.Process(target=_child, args=("A", scen, env_a, a_conn, ra_send, cfg), daemon=True)
    pb = ctx.Process(target=_child, args=("B", scen, env_b, b_conn, rb_send, cfg), daemon=True)
    pa.start()
    pb.start()
    ra_send.close()
    rb_send.close()
    live = {ra_recv: "A", rb_recv: "B"}
    procs = {"A": pa, "B": pb}
    first_exit = None
    while live:
        now = time.time()
        if now > deadline:
            out["timeout"] = True
            break
        ready = wait(list(live) + [p.sentinel for p in procs.values() if p.is_alive()], timeout=0.5)
        for r in ready:
            if r in live:
                try:
                    msg = r.recv()
                except (EOFError, OSError):
                    del live[r]
                    continue
                if msg[0] == "part":
                    set_path(out[msg[1]], msg[2], msg[3])
                elif msg[0] == "end":
                    pass
        dead = [k for k, p in procs.items() if not p.is_alive()]
        if dead and first_exit is None:
            first_exit = time.time()
        if first_exit is not None and time.time() - first_exit > 15 and any(p.is_alive() for p in procs.values()):
            out["killed_survivor_after_peer_exit"] = True
            break
        if not any(p.is_alive() for p in procs.values()):
            # drain what is left
            for r in list(live):
                try:
                    while r.poll(0.2):
                        msg = r.recv()
                        if msg[0] == "part":
                            set_path(out[msg[1]], msg[2], msg[3])
                except (EOFError, OSError):
                    pass
            break
    for k, p in procs.items():
        p.join(max(0.5, min(10.0, deadline + 4 - time.time())))  # let a finished child tear down
        if p.is_alive():
            out[f"terminated_{k}"] = True
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        out[f"exitcode_{k}"] = p.exitcode
    out["wall_s"] = round(time.time() - start, 1)
    return out


def parent_meta():
    m = {"argv": sys.argv, "python": sys.version.split()[0], "platform": platform.platform(),
         "host": host_identity(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
         "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")}}
    for name, cmd in (("nvidia_smi_topo", ["nvidia-smi", "topo", "-m"]), ("nvidia_smi_L", ["nvidia-smi", "-L"]),
                      ("nvidia_smi_nvlink", ["nvidia-smi", "nvlink", "-s", "-i", "0"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
            m[name] = (r.stdout + r.stderr)[-6000:]
        except Exception as e:  # noqa: BLE001
            m[name] = f"unavailable: {e!r}"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            m["yama_ptrace_scope"] = f.read().strip()
    except Exception as e:  # noqa: BLE001
        m["yama_ptrace_scope"] = repr(e)
    return m


def g(d, *path, default=None):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def bench_rows(res):
    """Flat rows: workload, side, variant, ms, GB/s, % of torch copy_ A->B of the same bytes, verified."""
    bench = g(res, "scenarios", "bench", default={}) or {}
    A, B = bench.get("A", {}), bench.get("B", {})
    refs = A.get("torch_ref", {}) or {}
    rows = []
    for wl in ("contig", "qwen", "tiny"):
        ref = g(refs, wl, "gbps")
        for side, D in (("pull", B), ("push", A)):
            for name, v in (g(D, side, wl, default={}) or {}).items():
                if name.startswith("_") or not isinstance(v, dict):
                    continue
                row = {"workload": wl, "side": side, "variant": name}
                if "gbps" in v:
                    row.update(ms=v["ms"], gbps=v["gbps"], pct_of_torch_copy=round(100 * v["gbps"] / ref, 1) if ref else None,
                               ok=g(v, "verify", "ok"), rows=v.get("rows"))
                else:
                    row["note"] = v.get("error") or v.get("skipped") or str(v)[:200]
                rows.append(row)
    return rows


def summarize(res):
    lines = []
    sc = res.get("scenarios", {})
    mp_ = sc.get("map", {})
    if mp_:
        b = mp_.get("B", {})
        lines.append("== map: how B (cuda:1) maps A's (cuda:0) memory")
        for k in ("rt_open_lazy_triton_read", "drv_open_mid_read_close", "cai_wrap", "torch_new_shared_small",
                  "torch_new_shared_mid", "torch_mapped_triton_read_after_enable_peer",
                  "torch_open_after_ctypes_open", "open_twice", "close"):
            lines.append(f"  {k}: {json.dumps(b.get(k), default=str)[:300]}")
        lines.append(f"  lazy flag sufficient (no cudaDeviceEnablePeerAccess): {b.get('lazy_flag_sufficient')}")
        exp = g(mp_, "A", "export", default={})
        for k, v in (exp or {}).items():
            lines.append(f"  export {k}: offset={g(v, 'rt', 'offset')} alloc={g(v, 'rt', 'alloc_size')} "
                         f"torch_handle=v2+'c'+raw:{v.get('torch_handle_is_v2_c_plus_raw')} "
                         f"torch_off==ctypes_off:{v.get('torch_offset_equals_ctypes_offset')} "
                         f"interior:{v.get('interior_ptr_handle')}")
        lines.append(f"  exit codes A={mp_.get('exitcode_A')} B={mp_.get('exitcode_B')}")
    bench = sc.get("bench", {})
    if bench:
        A, B = bench.get("A", {}), bench.get("B", {})
        refs = A.get("torch_ref", {}) or {}
        lines.append("== bench: GB/s (median of 5; tiny: 10) and % of torch copy_ GPU0->GPU1 of the same bytes")
        lines.append("  torch copy_ refs: " + ", ".join(f"{k}={v.get('gbps')}" for k, v in refs.items()
                                                          if isinstance(v, dict)))
        lines.append(f"  device-local copy 1 GiB on B: {g(B, 'local_copy_1GiB', 'gbps')} GB/s")
        for wl in ("contig", "qwen", "tiny"):
            ref = g(refs, wl, "gbps")
            for side, D in (("pull", B), ("push", A)):
                vs = g(D, side, wl, default={}) or {}
                for name, v in vs.items():
                    if name.startswith("_") or not isinstance(v, dict):
                        continue
                    if "gbps" in v:
                        pct = f"{100 * v['gbps'] / ref:5.1f}%" if ref else "  n/a"
                        okv = g(v, "verify", "ok")
                        lines.append(f"  {wl:6s} {side:4s} {name:26s} {v['ms']:9.3f} ms {v['gbps']:7.1f} GB/s "
                                     f"{pct} rows={v.get('rows')} ok={okv}")
                    else:
                        lines.append(f"  {wl:6s} {side:4s} {name:26s} {json.dumps(v, default=str)[:160]}")
        for k in ("overhead_qwen_c64k", "sync_costs", "open_ms", "peer_context_on_A_gpu", "ipc_event_open"):
            lines.append(f"  B {k}: {json.dumps(B.get(k), default=str)[:700]}")
        for k in ("ipc_event_rounds", "close_dst", "b_close"):
            lines.append(f"  A {k}: {json.dumps(A.get(k), default=str)[:700]}")
        lines.append(f"  exit codes A={bench.get('exitcode_A')} B={bench.get('exitcode_B')} "
                     f"wall={bench.get('wall_s')}s timeout={bench.get('timeout', False)}")
    for name in ("cvd", "expandable"):
        s = sc.get(name, {})
        if s:
            lines.append(f"== {name}")
            for role in ("A", "B"):
                for k, v in s.get(role, {}).items():
                    if k in ("env",):
                        continue
                    lines.append(f"  {role} {k}: {json.dumps(v, default=str)[:400]}")
            lines.append(f"  exit codes A={s.get('exitcode_A')} B={s.get('exitcode_B')}")
    for name, s in sc.items():
        for role in ("A", "B"):
            fat = g(s, role, "_fatal")
            if fat:
                lines.append(f"!! {name}/{role} fatal: {fat.get('error')}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "peer_probe.json") if os.environ.get("OUT") else "peer_probe.json"
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--budget", type=float, default=200.0, help="total seconds for all scenarios")
    ap.add_argument("--scenarios", default="map,cvd,expandable,bench")
    ap.add_argument("--api", choices=("rt", "drv"), default="rt", help="IPC API for the bench")
    ap.add_argument("--sleep-cycles", type=int, default=100_000_000, help="torch.cuda._sleep in the IPC event test")
    args = ap.parse_args()
    global_deadline = T0 + args.budget
    res = {"meta": parent_meta(), "scenarios": {}}
    log("main", "topology:\n" + str(res["meta"].get("nvidia_smi_topo"))[:1500])
    cfg = {"t0": T0, "a_dev": 0, "b_dev": 1, "api": args.api, "explicit_peer": False, "sleep_cycles": args.sleep_cycles}

    def save():
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1, default=str)
        except Exception as e:  # noqa: BLE001
            log("main", f"could not write {args.out}: {e!r}")

    for scen in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        if scen not in SCENARIOS:
            log("main", f"unknown scenario {scen}")
            continue
        left = global_deadline - time.time()
        if left < 20:
            res["scenarios"][scen] = {"skipped": f"time budget ({left:.0f}s left)"}
            log("main", f"skip {scen}: {left:.0f}s left")
            continue
        log("main", f"scenario {scen} (<= {min(SCENARIOS[scen][4], left):.0f}s)")
        try:
            res["scenarios"][scen] = run_pair(scen, cfg, global_deadline)
        except Exception as e:  # noqa: BLE001
            res["scenarios"][scen] = {"error": short_tb(e)}
            log("main", f"{scen}: {short_tb(e)[0]}")
        if scen == "map":
            lazy_ok = g(res["scenarios"]["map"], "B", "lazy_flag_sufficient")
            cfg["explicit_peer"] = lazy_ok is False
            log("main", f"lazy peer flag sufficient: {lazy_ok}; bench explicit peer enable: {cfg['explicit_peer']}")
        res["total_wall_s"] = round(time.time() - T0, 1)
        save()
    summary = summarize(res)
    res["summary_text"] = summary
    try:
        res["bench_table"] = bench_rows(res)
    except Exception as e:  # noqa: BLE001
        res["bench_table"] = {"error": repr(e)}
    res["total_wall_s"] = round(time.time() - T0, 1)
    save()
    print("\n" + "=" * 100 + "\n" + summary + "\n" + "=" * 100, flush=True)
    log("main", f"wrote {args.out} ({res['total_wall_s']}s)")


if __name__ == "__main__":
    main()
