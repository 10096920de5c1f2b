#!/usr/bin/python3
"""check_records.py DISK_OR_NBD_URI: checks a disk written by the test
guest's record writer (tests/guest/writer.c; format in docs/guest.md).

The disk must hold valid records 0..N-1 in place (record i at byte i*4096,
seq i, offset i*4096, checksum and fill right), boot counters starting at 1
and going up by one at a time, the writer's clock going forward within a
boot, then nothing but zeros to the end: no record lost, misplaced, torn or
left beyond the last one.

Prints {"ok", "records", "boots", "first_bad", "error", ...} as JSON and exits
0 when ok, 1 otherwise.  DISK_OR_NBD_URI is a raw image file (or block
device), or an NBD URI (nbd://, nbd+unix://...) read through libnbd
(python3-libnbd).  As a module: check(path_or_uri) -> the same dict.
"""
import json
import os
import struct
import sys
import zlib

REC_SIZE = 4096
MAGIC = b"FERRYREC"
VERSION = 1
HDR = struct.Struct("<8sQQQQII")    # magic seq offset boot ns version rsize
OFF_FILL = HDR.size                 # 48
OFF_CRC = REC_SIZE - 4
CHUNK = 1 << 20                     # bytes per read
MASK = (1 << 64) - 1
ZERO = bytes(CHUNK)


def splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def fill(seq):
    """Bytes [48, 4092) of record seq: splitmix64(seq), little endian, repeated."""
    n = OFF_CRC - OFF_FILL
    return (struct.pack("<Q", splitmix64(seq)) * (n // 8 + 1))[:n]


def make_record(seq, boot, ns):
    """The record the writer writes (for tests of the checker)."""
    body = HDR.pack(MAGIC, seq, seq * REC_SIZE, boot, ns, VERSION, REC_SIZE) + fill(seq)
    return body + struct.pack("<I", zlib.crc32(body))


def record_problem(rec, i):
    """None when rec is a valid record for position i, else what is wrong."""
    magic, seq, off, _boot, _ns, ver, rsize = HDR.unpack_from(rec)
    if magic != MAGIC:
        return f"record {i}: no record here (starts {rec[:16].hex()})"
    if struct.unpack_from("<I", rec, OFF_CRC)[0] != zlib.crc32(rec[:OFF_CRC]):
        return f"record {i}: checksum mismatch (torn or damaged; says seq {seq})"
    if ver != VERSION or rsize != REC_SIZE:
        return f"record {i}: version {ver} size {rsize}, expected {VERSION} {REC_SIZE}"
    if seq != i or off != i * REC_SIZE:
        return f"record {i}: misplaced, holds seq {seq} offset {off} (expected {i}, {i * REC_SIZE})"
    if rec[OFF_FILL:OFF_CRC] != fill(i):
        return f"record {i}: fill does not match seq {i}"
    return None


class _Reader:
    """pread over a file/block device or an NBD export."""

    def __init__(self, target):
        self.h = self.f = None
        if "://" in target and target.startswith("nbd"):
            import nbd
            self.h = nbd.NBD()
            self.h.connect_uri(target)
            self.size = self.h.get_size()
        else:
            self.f = open(target, "rb", buffering=0)
            self.size = os.lseek(self.f.fileno(), 0, os.SEEK_END)

    def pread(self, off, n):
        if self.h is not None:
            return self.h.pread(n, off)
        return os.pread(self.f.fileno(), n, off)

    def close(self):
        if self.h is not None:
            try:
                self.h.shutdown()
            except Exception:
                pass
            self.h = None          # libnbd closes the handle when it is freed
        if self.f is not None:
            self.f.close()


def check(target):
    """Checks the records on target (file path or NBD URI); returns
    {"ok", "records", "boots": [{"boot","first","last","count"}...],
     "first_bad", "error", "size", "capacity"}."""
    res = {"ok": False, "records": 0, "boots": [], "first_bad": None, "error": None,
           "size": None, "capacity": None}
    try:
        rd = _Reader(str(target))
    except Exception as e:
        res["error"] = f"cannot open {target}: {e}"
        return res
    try:
        _scan(rd, res)
    except Exception as e:
        res["error"] = f"read failed: {e}"
    finally:
        rd.close()
    res["ok"] = res["error"] is None
    return res


def _fail(res, i, msg):
    res["first_bad"] = i
    res["error"] = msg


def _scan(rd, res):
    nrec = rd.size // REC_SIZE
    res["size"], res["capacity"] = rd.size, nrec
    boots = res["boots"]
    last_ns = None
    end = None                      # index of the first zero record
    i = 0
    while i < nrec:
        n = min(CHUNK // REC_SIZE, nrec - i)
        buf = rd.pread(i * REC_SIZE, n * REC_SIZE)
        if len(buf) != n * REC_SIZE:
            raise OSError(f"short read at record {i}")
        if end is not None and buf == ZERO[:len(buf)]:
            i += n
            continue
        for k in range(n):
            rec = buf[k * REC_SIZE:(k + 1) * REC_SIZE]
            j = i + k
            if end is not None:
                if rec != ZERO[:REC_SIZE]:
                    what = record_problem(rec, j)
                    what = "a valid-looking record" if what is None else what.split(": ", 1)[1]
                    return _fail(res, j, f"record {j} is beyond the end (records end at {end}) "
                                 f"and not zero: {what}")
                continue
            if rec == ZERO[:REC_SIZE]:
                end = j
                continue
            bad = record_problem(rec, j)
            if bad:
                return _fail(res, j, bad)
            _m, _s, _o, boot, ns, _v, _r = HDR.unpack_from(rec)
            if not boots:
                if boot != 1:
                    return _fail(res, j, f"record {j}: first boot counter is {boot}, expected 1")
            elif boot != boots[-1]["boot"]:
                if boot != boots[-1]["boot"] + 1:
                    return _fail(res, j, f"record {j}: boot {boot} follows boot {boots[-1]['boot']}")
            elif ns <= last_ns:
                return _fail(res, j, f"record {j}: writer clock went back within boot {boot} "
                             f"({ns} <= {last_ns})")
            if not boots or boot != boots[-1]["boot"]:
                boots.append({"boot": boot, "first": j, "last": j, "count": 0})
            boots[-1]["last"] = j
            boots[-1]["count"] += 1
            last_ns = ns
            res["records"] = j + 1
        i += n


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    res = check(argv[1])
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
