#!/usr/bin/python3
"""Writes seed inputs for fuzz_journal into fuzz/corpus/journal/: write-back
journals (src/cache/journal.c has the byte layout) as the source receives
them, so the fuzzer starts past the checksums: valid ones (every kind,
overlapping entries, an empty journal, one at the disks' ends) and a few
broken ones (truncated, a flipped bit, trailing garbage, a wrong entry
count, a well-hashed bad kind, an entry past its disk).

fuzz_journal checks them against 3 disks of 1 MiB, 64 KiB and 4 KiB
(FUZZ_DISK_SIZES there).  XXH64 comes from the system's libxxhash through
ctypes, so the hashes are exactly what the C code computes.
Run: /usr/bin/python3 fuzz/make_journal_corpus.py"""
import ctypes
import ctypes.util
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "journal")
DATA, ZERO, STATE = 1, 2, 3
DISK_SIZES = [1 << 20, 1 << 16, 4096]

path = ctypes.util.find_library("xxhash")
if not path:
    raise SystemExit("make_journal_corpus: libxxhash not found")
xxh = ctypes.CDLL(path)
xxh.XXH64.restype = ctypes.c_uint64
xxh.XXH64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]


def h64(b, seed=0):
    return xxh.XXH64(b, len(b), seed)


def journal(entries, point=1, ndisks=3, count_delta=0, garbage=b"", kind_override=None):
    """entries: (kind, disk, offset, length, data) with data b"" for ZERO."""
    hdr = b"FERRYWBJ" + struct.pack("<IIIIQQQQ", 1, 64, 32, ndisks, point,
                                    1_700_000_000_000_000_000, 0, 0)
    hcs = h64(hdr)
    out = hdr + struct.pack("<Q", hcs)
    chain = hcs
    nbytes = 0
    for kind, disk, off, length, data in entries:
        e = struct.pack("<IIQQ", kind, disk, off, length)
        cs = h64(e + data, point)
        out += e + struct.pack("<Q", cs) + data
        chain = h64(struct.pack("<QQ", chain, cs))
        nbytes += len(data)
    t = b"FERRYWBT" + struct.pack("<QQQQ", len(entries) + count_delta, nbytes, chain, point)
    return out + t + struct.pack("<Q", h64(t)) + garbage


pattern = bytes((i * 37 + 11) & 0xFF for i in range(4096))
mixed = [
    (DATA, 0, 4096, 512, pattern[:512]),
    (ZERO, 1, 0, 65536, b""),
    (DATA, 2, 100, 9, b"123456789"),
    (STATE, 0, 0, 13, b"vm state blob"),
    (DATA, 0, 4300, 100, pattern[1000:1100]),   # overrides part of the first
]
good = journal(mixed, point=7)

seeds = {
    "valid_mixed": good,
    "valid_empty": journal([], point=1),
    "valid_state_only": journal([(STATE, 0, 0, 64, pattern[:64])], point=2),
    "valid_disk_ends": journal([
        (DATA, 0, (1 << 20) - 4096, 4096, pattern),
        (ZERO, 1, (1 << 16) - 1, 1, b""),
        (DATA, 2, 0, 4096, pattern[::-1]),
    ], point=3),
    "valid_overlaps": journal([(DATA, 1, 0, 256, pattern[:256]),
                               (ZERO, 1, 128, 256, b""),
                               (DATA, 1, 64, 64, pattern[2000:2064])], point=4),
    "bad_truncated": good[:-20],
    "bad_no_trailer": good[:-48],
    "bad_flipped_data": good[:64 + 32 + 5] + bytes([good[64 + 32 + 5] ^ 4]) + good[64 + 32 + 6:],
    "bad_trailing_garbage": journal(mixed, point=7, garbage=b"\0" * 16),
    "bad_entry_count": journal(mixed, point=7, count_delta=1),
    "bad_kind": journal([(9, 0, 0, 8, b"abcdefgh")], point=5),
    "bad_beyond_disk": journal([(DATA, 2, 4090, 8, b"abcdefgh")], point=6),
    "bad_ndisks": journal([(ZERO, 0, 0, 512, b"")], point=8, ndisks=17),
}

os.makedirs(OUT, exist_ok=True)
for name, blob in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(blob)
print(f"make_journal_corpus: {len(seeds)} seeds in {OUT}")
