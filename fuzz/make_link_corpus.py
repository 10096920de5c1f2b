#!/usr/bin/python3
"""Writes seed inputs for fuzz_link_frame into fuzz/corpus/link_frame/: valid
site link frames (docs/link.md, src/link/frame.h) as a receiver reads them,
so the fuzzer starts past the checksums: raw, zstd, empty, the largest raw
size (zstd of 4 MiB of zeros), a stream of several, and a few broken ones.

Each input starts with the harness's mode byte (see fuzz/fuzz_link_frame.c):
bit 0 / bit 1 make the harness recompute header checks / payload hashes,
bits 2-3 pick the re-encode level.  The hashes and zstd come from the
system's libxxhash and libzstd through ctypes, so the seeds are exactly what
the C code computes.  Run: /usr/bin/python3 fuzz/make_link_corpus.py"""
import ctypes
import ctypes.util
import os
import random
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "link_frame")
MAGIC = 0x31595246
F_ZSTD = 1
MAX_RAW = 4 * 1024 * 1024


def load(name):
    path = ctypes.util.find_library(name)
    if not path:
        raise SystemExit(f"make_link_corpus: lib{name} not found")
    return ctypes.CDLL(path)


xxh = load("xxhash")
xxh.XXH32.restype = ctypes.c_uint32
xxh.XXH32.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32]
xxh.XXH3_64bits.restype = ctypes.c_uint64
xxh.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
zstd = load("zstd")
zstd.ZSTD_compressBound.restype = ctypes.c_size_t
zstd.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
zstd.ZSTD_compress.restype = ctypes.c_size_t
zstd.ZSTD_compress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                               ctypes.c_size_t, ctypes.c_int]
zstd.ZSTD_isError.restype = ctypes.c_uint
zstd.ZSTD_isError.argtypes = [ctypes.c_size_t]


def compress(data, level=3):
    cap = zstd.ZSTD_compressBound(len(data))
    buf = ctypes.create_string_buffer(cap)
    n = zstd.ZSTD_compress(buf, cap, data, len(data), level)
    if zstd.ZSTD_isError(n):
        raise SystemExit("make_link_corpus: zstd failed")
    return buf.raw[:n]


def header(ftype, flags, seq, wire_len, raw_len, payload_hash, magic=MAGIC):
    first = struct.pack("<IBBHQIIQ", magic, ftype, flags, 0, seq, wire_len, raw_len, payload_hash)
    return first + struct.pack("<II", xxh.XXH32(first, 32, 0), 0)


def frame(ftype, seq, raw, zstd_level=0):
    """A frame as the encoder makes it (compressed only when that shrinks)."""
    if zstd_level and raw:
        z = compress(raw, zstd_level)
        if len(z) < len(raw):
            return header(ftype, F_ZSTD, seq, len(z), len(raw), xxh.XXH3_64bits(z, len(z))) + z
    return header(ftype, 0, seq, len(raw), len(raw), xxh.XXH3_64bits(raw, len(raw))) + raw


def text(n, seed):
    rnd = random.Random(seed)
    words = [b"replicate", b"block", b"dirty", b"cutover", b"site", b"link", b"frame", b"disk"]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def main():
    os.makedirs(OUT, exist_ok=True)
    rnd = random.Random(1)
    seeds = {}
    seeds["raw_small"] = b"\x03" + frame(1, 1, b"hello, site link")
    seeds["raw_empty"] = b"\x03" + frame(2, 2, b"")
    seeds["raw_random_60k"] = b"\x03" + frame(3, 3, bytes(rnd.getrandbits(8) for _ in range(60000)))
    seeds["zstd_text"] = b"\x07" + frame(4, 4, text(8192, 2), 3)
    seeds["zstd_max_raw"] = b"\x0b" + frame(5, 5, bytes(MAX_RAW), 3)   # 4 MiB of zeros
    seeds["zstd_level1_pattern"] = b"\x07" + frame(6, 6, bytes(i % 251 for i in range(65536)), 1)
    seeds["stream_mixed"] = b"\x0f" + b"".join([
        frame(10, 100, b"ack"), frame(11, 101, b""), frame(12, 102, text(20000, 3), 3),
        frame(13, 103, bytes(rnd.getrandbits(8) for _ in range(3000)), 3),
        frame(14, 104, bytes(4096), 1)])
    # As sent, with the real hashes checked (mode 0): one sound, one damaged
    # payload followed by a sound frame (the stream stays in step).
    good = frame(20, 200, text(3000, 4), 3)
    seeds["checked_stream"] = b"\x00" + good + frame(21, 201, b"next")
    damaged = bytearray(good)
    damaged[40 + len(damaged[40:]) // 2] ^= 0x10
    seeds["checked_damaged_payload"] = b"\x00" + bytes(damaged) + frame(22, 202, b"still in step")
    # Headers the decoder must refuse.
    seeds["bad_magic"] = b"\x00" + header(1, 0, 1, 0, 0, 0, magic=0x31595247)
    seeds["bad_lengths"] = b"\x01" + header(1, 0, 1, 10, 11, 0) + bytes(10)
    # A zstd payload whose frame says 4 MiB but the header says less.
    bomb = compress(bytes(MAX_RAW), 19)
    seeds["zstd_lying_raw_len"] = b"\x03" + header(7, F_ZSTD, 7, len(bomb), 1000, 0) + bomb
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"make_link_corpus: {len(seeds)} seeds in {OUT}")


if __name__ == "__main__":
    main()
