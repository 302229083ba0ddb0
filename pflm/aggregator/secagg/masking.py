"""Key derivation and mask expansion: HKDF-SHA256 keys bound to the session, AES-128-CTR keystreams as b-bit ints.

The mask PRG is AES-128 in counter mode keyed by the first 16 bytes of an HKDF output (AES-NI/VAES: ~9.5 GB/s
per core here, 1.8× ChaCha20); every key is used for exactly one stream. Counter mode can start at any block,
so a vector is cut into contiguous ranges that worker threads expand independently (OpenSSL and NumPy release
the GIL), each range processed in cache-sized chunks.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pflm.runtime import available_cpus

_NONCE16 = bytes(16)  # every PRG key below is used for exactly one stream, so a fixed counter start is safe


def prg(key: bytes, block: int = 0):
    """A keystream encryptor (AES-128-CTR) for a fresh ≥16-byte key, positioned at 16-byte block `block` of the
    key's one stream (counter = block, big-endian): `update_into(zeros, buf)`."""
    return Cipher(algorithms.AES(key[:16]), modes.CTR(block.to_bytes(16, "big") if block else _NONCE16)).encryptor()


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def run_ranges(length: int, workers: int, align: int, work: Callable[[int, int, int], object]) -> list:
    """Call work(worker, lo, hi) on `workers` contiguous ranges covering [0, length), in parallel threads.

    Range starts are multiples of `align` (keystreams can then start on a block boundary); ranges shorter than
    two chunks are not split. Returns the results in range order; the first exception is re-raised.
    """
    global _POOL, _POOL_SIZE
    per = -(-length // max(workers, 1))
    per = -(-per // align) * align
    if workers <= 1 or length <= 2 * align:
        return [work(0, 0, length)]
    bounds = [(i, lo, min(lo + per, length)) for i, lo in enumerate(range(0, length, per))]
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < len(bounds) - 1:
            _POOL_SIZE = max(len(bounds) - 1, available_cpus())
            _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="pflm-secagg")
        pool = _POOL
    futures = [pool.submit(work, *b) for b in bounds[1:]]
    first = work(*bounds[0])  # the calling thread takes the first range
    return [first] + [f.result() for f in futures]


def word_dtype(bits: int) -> type[np.unsignedinteger]:
    """Machine word holding b-bit values; sums wrap mod 2^word, which 2^b divides."""
    return np.uint32 if bits <= 32 else np.uint64


@dataclass(frozen=True)
class Session:
    """Public parameters of one protocol run, known to the server and every device of the cohort."""

    session_id: bytes  # fresh random per round; binds every derived key
    round: int
    bits: int
    threshold: int
    x_of: dict[int, int]  # device id → its public Shamir x-coordinate (i + 1 for the i-th smallest cohort id)
    degree: int = 0  # neighbours per device in the round's graph (0: not announced, n − 1 assumed)
    malicious: bool = False  # signed advertisements + consistency-check round (Bonawitz et al. 2017 §4)

    @property
    def cohort(self) -> list[int]:
        return sorted(self.x_of)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return word_dtype(self.bits)

    @property
    def modmask(self) -> int:
        return (1 << self.bits) - 1

    def reduce(self, y: np.ndarray) -> np.ndarray:
        """Reduce word arithmetic to Z_{2^b} in place."""
        if self.bits not in (32, 64):
            np.bitwise_and(y, self.dtype(self.modmask), out=y)
        return y

    def binding(self, *ids: int) -> bytes:
        """Session id, round and the given ids, unambiguously encoded (for HKDF info, AEAD data, signatures)."""
        return self.session_id + struct.pack(">q", self.round) + b"".join(struct.pack(">q", i) for i in ids)


def hkdf(ikm: bytes, label: bytes, session: Session, *ids: int) -> bytes:
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=session.session_id, info=label + session.binding(*ids))
    return kdf.derive(ikm)


def pairwise_key(own: X25519PrivateKey, peer_public: bytes, session: Session, u: int, v: int) -> bytes:
    """Mask key shared by u and v (symmetric: ids are bound in increasing order)."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return hkdf(shared, b"pflm-secagg-pair", session, min(u, v), max(u, v))


def self_mask_key(seed: bytes, session: Session, u: int) -> bytes:
    return hkdf(seed, b"pflm-secagg-self", session, u)


def channel_key(own: X25519PrivateKey, peer_public: bytes, session: Session, sender: int, receiver: int) -> bytes:
    """AEAD key of the one share message sender → receiver (direction-bound, so each key encrypts once)."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return hkdf(shared, b"pflm-secagg-share", session, sender, receiver)


def pair_sign(u: int, v: int) -> int:
    """u adds the u–v mask when u < v and subtracts it otherwise, so the pair's masks cancel in the sum."""
    return 1 if u < v else -1


class MaskStream:
    """Adds PRG keystreams (as words) into a vector, many keys at once, chunk by chunk, on worker threads.

    Within a range the streams of all keys advance together over cache-sized chunks of the accumulator, so each
    chunk is read and written once while it sits in cache; ranges run on `workers` threads.
    """

    CHUNK = 1 << 16  # words per chunk (a multiple of every block/word ratio); fused encoding uses the same chunks

    def __init__(self, length: int, bits: int, workers: int = 1) -> None:
        self.dtype = word_dtype(bits)
        self.length = length
        self.workers = max(1, workers)
        self._itemsize = np.dtype(self.dtype).itemsize
        self._chunk = min(self.CHUNK, max(length, 1))
        self._zeros = bytes(self._chunk * self._itemsize)
        self._local = threading.local()  # keystream buffer of each thread that expands a range

    def _buffer(self) -> bytearray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(len(self._zeros) + 64)
        return buf

    def add_many(
        self, acc: np.ndarray, keyed_signs: Sequence[tuple[bytes, int]], source: Callable[[int], Callable] | None = None
    ) -> None:
        """acc ← acc + Σ sign·PRG(key) in word arithmetic (acc has `length` words).

        With `source` (e.g. `ChunkEncoder.filler`), each chunk of acc is first overwritten by `source(lo)`'s
        filler while it is in cache, so encoding and masking take one pass over memory.
        """
        if acc.shape != (self.length,) or acc.dtype != self.dtype:
            raise ValueError(f"accumulator must be {self.length} words of {np.dtype(self.dtype)}")
        keyed = list(keyed_signs)
        chunk, size = self._chunk, self._itemsize

        def work(_w: int, lo: int, hi: int) -> None:
            buf = self._buffer()
            fill = source(lo) if source is not None else None
            streams = [(prg(key, lo * size // 16), sign) for key, sign in keyed]
            for start in range(lo, hi, chunk):
                m = min(chunk, hi - start)
                part = acc[start : start + m]
                if fill is not None:
                    fill(part)
                zeros = self._zeros if m == chunk else self._zeros[: m * size]
                for enc, sign in streams:
                    enc.update_into(zeros, buf)
                    words = np.frombuffer(buf, dtype=self.dtype, count=m)
                    if sign > 0:
                        np.add(part, words, out=part)
                    else:
                        np.subtract(part, words, out=part)

        run_ranges(self.length, self.workers if (keyed or source) else 1, chunk, work)

    def add_into(self, acc: np.ndarray, key: bytes, sign: int) -> None:
        """acc ← acc ± PRG(key)."""
        self.add_many(acc, [(key, sign)])

    def expand(self, key: bytes) -> np.ndarray:
        """PRG(key) as a fresh array of words."""
        out = np.zeros(self.length, dtype=self.dtype)
        self.add_many(out, [(key, 1)])
        return out
