#!/usr/bin/python3
"""Writes seed inputs for fuzz_nbd into fuzz/corpus/nbd/: byte streams a real
client would send (handshake, options, requests), so the fuzzer starts past
the magic numbers.  Run: /usr/bin/python3 fuzz/make_corpus.py"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "nbd")
IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go(name=b"mem", infos=()):
    return opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) +
               b"".join(struct.pack(">H", i) for i in infos))


def meta(code, name=b"mem", queries=(b"base:allocation", b"ferry:dirty")):
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q
    return opt(code, body)


def req(cmd, off, count, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ, flags, cmd, cookie, off, count) + payload


FLAGS = struct.pack(">I", 3)
seeds = {
    "go_simple": FLAGS + go() + req(1, 0, 16, payload=b"x" * 16) + req(0, 0, 16) + req(3, 0, 0) + req(2, 0, 0),
    "go_structured": FLAGS + opt(8) + meta(10) + go(infos=(1, 2, 3)) +
        req(1, 100, 8, payload=b"y" * 8) + req(7, 0, 1 << 20) + req(7, 0, 4096, flags=8) +
        req(6, 4096, 8192, flags=2) + req(4, 0, 4096) + req(5, 0, 65536) + req(0, 4194300, 8) + req(2, 0, 0),
    "list_info_abort": FLAGS + opt(3) + meta(9, queries=()) + meta(9, queries=(b"base:",)) +
        opt(6, struct.pack(">I", 3) + b"mem" + struct.pack(">H", 0)) + opt(2),
    "export_name": FLAGS + opt(1, b"mem") + req(1, 1, 5, flags=1, payload=b"abcde") + req(0, 1, 5),
    "bad_request": FLAGS + opt(8) + go() + req(0, 1 << 40, 512) + req(1, 0, 40 << 20) + req(9, 0, 0),
    "starttls_unknown": FLAGS + opt(5) + opt(99, b"zz") + opt(11) + go(),
}
os.makedirs(OUT, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} seeds to {OUT}")
