"""ferry-wan (docs/wan.md): the WAN emulator the site-link tests and the
benchmarks put between two ferryd sites.

Every test starts its own peer, a threaded TCP server on 127.0.0.1:0 (class
Peer) whose first byte from a client picks what it does with the connection:
  b"e"  echo every byte back, then shut down after the client's EOF
  b"s"  sink: keep every byte until EOF, time-stamped
  b"d"  download: read N and SEED (8 bytes each), send N bytes of
        random.Random(SEED), shut down, wait for EOF
  b"p"  ping: answer each byte with one byte, time-stamping each arrival
and one or more ferry-wan processes between the test and the peer.  Timing
assertions bound below strictly (the proxy never releases a byte early) and
above loosely (CI machines are noisy).
"""
import hashlib
import os
import random
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import run
from wanproxy import FERRY_WAN, WanError, WanFactory, WanProxy

KiB = 1024
MiB = 1024 * KiB


# --- the peer -----------------------------------------------------------------
class Record:
    """What the peer saw on one connection."""

    def __init__(self):
        self.mode = None
        self.data = bytearray()
        self.t_first = None       # first byte after the mode byte
        self.t_eof = None
        self.arrivals = []        # ping mode: arrival time of each byte
        self.error = None         # exception that ended the connection
        self.done = threading.Event()


class Peer:
    def __init__(self):
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.port = self.ls.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.records = []
        self.lock = threading.Lock()
        self.threads = []
        self.closing = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            if self.closing:
                c.close()
                return
            rec = Record()
            with self.lock:
                self.records.append(rec)
            t = threading.Thread(target=self._serve, args=(c, rec), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c, rec):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            mode = c.recv(1)
            rec.mode = mode
            if mode == b"e":
                while True:
                    d = c.recv(1 << 20)
                    if not d:
                        break
                    c.sendall(d)
                c.shutdown(socket.SHUT_WR)
            elif mode == b"s":
                while True:
                    d = c.recv(1 << 20)
                    if not d:
                        break
                    if rec.t_first is None:
                        rec.t_first = time.monotonic()
                    rec.data += d
                rec.t_eof = time.monotonic()
            elif mode == b"d":
                hdr = b""
                while len(hdr) < 16:
                    d = c.recv(16 - len(hdr))
                    if not d:
                        raise EOFError("short download header")
                    hdr += d
                n, seed = struct.unpack(">QQ", hdr)
                c.sendall(random.Random(seed).randbytes(n))
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536):
                    pass
            elif mode == b"p":
                while True:
                    d = c.recv(1)
                    if not d:
                        break
                    rec.arrivals.append(time.monotonic())
                    c.sendall(d)
        except OSError as e:
            rec.error = e
        except EOFError as e:
            rec.error = e
        finally:
            rec.t_eof = rec.t_eof or time.monotonic()
            c.close()
            rec.done.set()

    def wait_records(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.records) >= n and all(r.mode is not None or r.done.is_set()
                                                  for r in self.records[:n]):
                    return list(self.records)
            assert time.monotonic() < deadline, f"peer saw {len(self.records)} connections, wanted {n}"
            time.sleep(0.005)

    def close(self):
        self.closing = True
        try:
            # Unblock accept(): shutdown wakes it on Linux.
            self.ls.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ls.close()
        self.acceptor.join(timeout=5)
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def wan_factory(tmp_path_factory):
    f = WanFactory(tmp_path_factory)
    yield f
    f.teardown()


# --- client helpers -------------------------------------------------------------
def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(min(n - len(buf), 1 << 20))
        if not d:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += d
    return bytes(buf)


def recv_all(s):
    buf = bytearray()
    while True:
        d = s.recv(1 << 20)
        if not d:
            return bytes(buf)
        buf += d


def echo_roundtrip(wan, payload, result, i):
    """Sends payload through the proxy to the echo peer while reading the echo."""
    try:
        s = wan.connect()
        s.sendall(b"e")

        def send():
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        got = recv_all(s)
        t.join()
        s.close()
        result[i] = got
    except Exception as e:   # reported by the caller
        result[i] = e


def ping(wan_or_sock, n=1):
    s = wan_or_sock
    s.sendall(b"x" * n)
    return recv_exact(s, n)


def bit_diff(a, b):
    assert len(a) == len(b), f"lengths differ: {len(a)} != {len(b)}"
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return bin(x).count("1")


def refused(wan):
    """A new connection is reset (or ended) by the proxy without reaching the peer."""
    try:
        c = wan.connect()
    except ConnectionResetError:
        return True            # the reset beat connect(2) back to us
    with c:
        try:
            c.sendall(b"p")
        except OSError:
            return True
        return expect_reset(c) in ("reset", "eof")


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def expect_reset(s, timeout=5):
    """The proxy reset (or at least ended) the connection: recv gives ECONNRESET or EOF."""
    s.settimeout(timeout)
    try:
        d = s.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    assert d == b"", f"expected the connection to be refused, got {d!r}"
    return "eof"


# --- tests ----------------------------------------------------------------------
def test_usage_errors(tmp_path):
    exe = FERRY_WAN
    p = run([exe, "--help"])
    assert "--rate" in p.stdout and "BITS per second" in p.stdout and "BYTES per second" in p.stdout
    bad = [
        ([], "--listen"),
        (["--listen", "127.0.0.1:0"], "--connect"),
        (["--listen", "nowhere", "--connect", "127.0.0.1:9"], "--listen"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:0"], "--connect"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--rate", "fast"], "--rate"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--rate", "1mbps"], "--rate"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--delay", "5"], "--delay"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--delay", "-1ms"], "--delay"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--delay", "2min"], "60s"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--control", "0.0.0.0:0"],
         "loopback"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--control", "unix:"], "--control"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--log-level", "loud"],
         "--log-level"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "--bogus"], "--bogus"),
        (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9", "extra"], "extra"),
        (["--listen"], "needs an argument"),
    ]
    for args, word in bad:
        p = run([exe, *args], check=False, timeout=30)
        assert p.returncode == 2, f"{args}: exit {p.returncode}\n{p.stderr}"
        assert word in p.stderr and "Try 'ferry-wan --help'" in p.stderr, f"{args}: {p.stderr}"
    # ctl: no command is a usage error; nobody listening is exit 1.
    assert run([exe, "ctl", "unix:/nonexistent"], check=False).returncode == 2
    p = run([exe, "ctl", f"unix:{tmp_path}/none.sock", "stats"], check=False)
    assert p.returncode == 1 and "cannot connect" in p.stderr
    # A port that is taken: cannot start, exit 1.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = run([exe, "--listen", f"127.0.0.1:{port}", "--connect", "127.0.0.1:9"], check=False)
        assert p.returncode == 1 and "cannot listen" in p.stderr, p.stderr


def test_forwards_byte_identical_both_ways_concurrently(peer, wan_factory):
    wan = wan_factory(peer.addr)
    n = 4
    payloads = [random.randbytes(12 * MiB + i * 4099) for i in range(n)]
    result = [None] * n
    threads = [threading.Thread(target=echo_roundtrip, args=(wan, payloads[i], result, i))
               for i in range(n)]
    for t in threads:
        t.start()
    # Meanwhile a download: bytes that only flow down.
    s = wan.connect()
    s.sendall(b"d" + struct.pack(">QQ", 9 * MiB + 7, 42))
    down = recv_all(s)
    s.close()
    for t in threads:
        t.join(timeout=120)
    for i in range(n):
        assert not isinstance(result[i], Exception), f"connection {i}: {result[i]!r}"
        assert len(result[i]) == len(payloads[i]), f"connection {i}: {len(result[i])} bytes back"
        assert result[i] == payloads[i], f"connection {i}: echo differs"
    assert down == random.Random(42).randbytes(9 * MiB + 7)
    total = sum(len(p) for p in payloads)
    st = wan.wait_stats(lambda st: st["active"] == 0, what="all connections closed")
    assert st["bytes_up"] == total + n + 1 + 16
    assert st["bytes_down"] == total + len(down)
    assert st["accepted"] == n + 1 and st["closed"] == n + 1 and st["reset"] == 0
    assert st["flipped_up"] == st["flipped_down"] == 0


def test_forwards_intact_with_delay_and_rate(peer, wan_factory):
    """Queues, release times and the shared token bucket keep every byte in order."""
    wan = wan_factory(peer.addr, delay="3ms", rate="400mbit")
    payloads = [random.randbytes(6 * MiB + i) for i in range(3)]
    result = [None] * 3
    threads = [threading.Thread(target=echo_roundtrip, args=(wan, payloads[i], result, i))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(3):
        assert not isinstance(result[i], Exception), f"connection {i}: {result[i]!r}"
        assert result[i] == payloads[i], f"connection {i}: echo differs"


def test_delay_adds_to_each_direction(peer, wan_factory):
    delay = 0.030
    wan = wan_factory(peer.addr, delay="30ms")
    s = wan.connect()
    s.sendall(b"p")
    peer.wait_records(1)
    rec = peer.records[0]
    ups, downs, rtts = [], [], []
    for i in range(8):
        t0 = time.monotonic()
        ping(s)
        t2 = time.monotonic()
        t1 = rec.arrivals[i]
        ups.append(t1 - t0)
        downs.append(t2 - t1)
        rtts.append(t2 - t0)
    assert min(ups) >= delay, f"up one-way {min(ups):.4f}s < {delay}s"
    assert min(downs) >= delay, f"down one-way {min(downs):.4f}s < {delay}s"
    assert min(rtts) >= 2 * delay
    assert sorted(rtts)[len(rtts) // 2] < 2 * delay + 0.25, rtts

    # Changed at run time: applies to the next bytes.
    assert wan.ctl("delay", "5ms") == "delay 5ms"
    assert wan.stats()["delay_ns"] == 5_000_000
    rtts = []
    for _ in range(8):
        t0 = time.monotonic()
        ping(s)
        rtts.append(time.monotonic() - t0)
    assert min(rtts) >= 0.010
    assert sorted(rtts)[len(rtts) // 2] < 0.010 + 0.2, rtts
    assert wan.ctl("delay", "0") == "delay 0"
    t0 = time.monotonic()
    ping(s)
    assert time.monotonic() - t0 < 0.2
    s.close()

    # The end of the stream is delayed like data: the FIN arrives no earlier.
    assert wan.ctl("delay", "50ms") == "delay 50ms"
    s = wan.connect()
    s.sendall(b"s")
    rec = peer.wait_records(2)[1]
    t0 = time.monotonic()
    s.sendall(b"last")
    s.shutdown(socket.SHUT_WR)
    assert rec.done.wait(10)
    assert rec.t_first - t0 >= 0.050 and rec.t_eof - t0 >= 0.050
    assert bytes(rec.data) == b"last"
    s.close()


def timed_upload(wan, peer, payloads):
    """Uploads each payload on its own connection at once (to the sink);
    returns the time from the first send to the last EOF at the sink."""
    base = len(peer.records)
    socks = []
    for _ in payloads:
        s = wan.connect()
        s.sendall(b"s")
        socks.append(s)
    recs = peer.wait_records(base + len(payloads))[base:]
    t0 = time.monotonic()

    def send(s, p):
        s.sendall(p)
        s.shutdown(socket.SHUT_WR)

    ts = [threading.Thread(target=send, args=(s, p)) for s, p in zip(socks, payloads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    for r in recs:
        assert r.done.wait(60), "sink did not see EOF"
    for s in socks:
        s.close()
    got = {bytes(r.data) for r in recs}
    assert got == set(payloads), "sink got different bytes"
    return max(r.t_eof for r in recs) - t0


def test_rate_limits_throughput(peer, wan_factory):
    wan = wan_factory(peer.addr, rate="16mbit")
    assert wan.stats()["rate_bps"] == 16_000_000
    size = 4_000_000
    ideal = size * 8 / 16e6              # 2.0 s
    elapsed = timed_upload(wan, peer, [random.randbytes(size)])
    assert elapsed >= 0.85 * ideal, f"{size} bytes at 16 Mbit/s took {elapsed:.3f}s (ideal {ideal}s)"
    assert elapsed <= 3 * ideal, f"took {elapsed:.3f}s, ideal {ideal}s"

    # The cap is shared by all connections of the proxy, like one pipe.
    elapsed = timed_upload(wan, peer, [random.randbytes(size // 2) + bytes([i]) for i in range(2)])
    assert elapsed >= 0.85 * ideal, f"two connections together took {elapsed:.3f}s (ideal {ideal}s)"
    assert elapsed <= 3 * ideal

    # Down, changed at run time, in a byte form: 1M = 1 MiB/s.
    assert wan.ctl("rate", "1M") == "rate 8388608bit"
    s = wan.connect()
    n = 1_500_000
    t0 = time.monotonic()
    s.sendall(b"d" + struct.pack(">QQ", n, 7))
    got = recv_all(s)
    elapsed = time.monotonic() - t0
    s.close()
    assert got == random.Random(7).randbytes(n)
    ideal = n / MiB
    assert 0.85 * ideal <= elapsed <= 3 * ideal, f"{n} bytes at 1 MiB/s took {elapsed:.3f}s"

    # Lifted: the same 4 MB goes well under the limited time.
    assert wan.ctl("rate", "0") == "rate unlimited"
    elapsed = timed_upload(wan, peer, [random.randbytes(size)])
    assert elapsed < 1.5, f"unlimited upload of 4 MB took {elapsed:.3f}s"


def test_rate_forms(peer, wan_factory):
    wan = wan_factory(peer.addr)
    forms = {
        "100mbit": 100_000_000, "1gbit": 1_000_000_000, "1.5Gbit": 1_500_000_000,
        "512kbit": 512_000, "2000bit": 2000, "1000000": 1_000_000, "64kbit/s": 64_000,
        "12.5M": int(12.5 * MiB * 8), "64K": 64 * KiB * 8, "1GiB/s": 8 << 30, "100B": 800,
        "0": 0,
    }
    for form, bps in forms.items():
        assert wan.ctl("rate", form).startswith("rate "), form
        assert wan.stats()["rate_bps"] == bps, form
    # The queue bound: max(4 MiB, 2 x rate x delay).
    assert wan.stats()["queue_limit"] == 4 * MiB
    wan.ctl("rate", "1gbit")
    wan.ctl("delay", "50ms")
    assert wan.stats()["queue_limit"] == 2 * 125_000_000 * 50 // 1000
    wan.ctl("delay", "1ms")
    assert wan.stats()["queue_limit"] == 4 * MiB


def test_stall_queues_then_unstall_delivers_everything(peer, wan_factory):
    wan = wan_factory(peer.addr)
    s = wan.connect()
    s.sendall(b"s")
    rec = peer.wait_records(1)[0]
    head = random.randbytes(100 * KiB)
    s.sendall(head)
    deadline = time.monotonic() + 10
    while len(rec.data) < len(head):
        assert time.monotonic() < deadline, "data did not flow before the stall"
        time.sleep(0.01)

    # A ping on a second connection: stalled too.
    p = wan.connect()
    p.sendall(b"p")
    peer.wait_records(2)
    assert ping(p) == b"x"

    assert wan.ctl("stall") == "stalled"
    assert wan.stats()["state"] == "stalled"
    before = wan.stats()
    body = random.randbytes(64 * MiB)
    sent = threading.Event()

    def send():
        s.sendall(body)
        s.shutdown(socket.SHUT_WR)
        sent.set()

    t = threading.Thread(target=send)
    t.start()
    p.sendall(b"y")
    time.sleep(1.0)
    st = wan.stats()
    assert len(rec.data) == len(head), "bytes reached the sink during the stall"
    assert st["bytes_up"] == before["bytes_up"] and st["bytes_down"] == before["bytes_down"]
    assert st["queued_up"] > 0
    # The queue is bounded, so the sender is held back by TCP.
    assert st["queued_up"] <= st["queue_limit"] + 1 * MiB, st
    assert not sent.is_set(), "64 MiB went into a stalled proxy without backpressure"
    p.settimeout(0.2)
    with pytest.raises(socket.timeout):
        p.recv(1)

    assert wan.ctl("unstall") == "unstalled"
    p.settimeout(10)
    assert p.recv(1) == b"y"
    t.join(timeout=60)
    assert sent.is_set()
    assert rec.done.wait(30), (len(rec.data), wan.stats())
    assert len(rec.data) == len(head) + len(body)
    assert hashlib.sha256(rec.data).digest() == hashlib.sha256(head + body).digest()
    s.close()
    p.close()


def test_cut_resets_and_refuses_until_restore(peer, wan_factory):
    wan = wan_factory(peer.addr)
    s = wan.connect()
    s.sendall(b"p")
    peer.wait_records(1)
    assert ping(s) == b"x"

    assert wan.ctl("cut") == "cut 1 connections"
    assert expect_reset(s) == "reset"
    s.close()
    rec = peer.records[0]
    assert rec.done.wait(5) and isinstance(rec.error, ConnectionResetError), rec.error
    st = wan.stats()
    assert st["state"] == "cut" and st["active"] == 0 and st["cut_resets"] == 1

    # New connections are accepted and reset at once, and never reach the peer.
    for _ in range(3):
        assert refused(wan)
    st = wan.wait_stats(lambda st: st["refused"] >= 3, what="3 refused")
    assert len(peer.records) == 1

    assert wan.ctl("restore") == "restored"
    c = wan.connect()
    c.sendall(b"p")
    assert ping(c) == b"x"
    assert wan.stats()["state"] == "forwarding"

    # cut DURATION: restores by itself.
    t_cut = time.monotonic()
    assert wan.ctl("cut", "1s") == "cut 1 connections, restoring in 1s"
    assert expect_reset(c) == "reset"
    c.close()
    st = wan.stats()
    assert st["state"] == "cut" and 0 < st["cut_remaining_ms"] <= 1000
    assert refused(wan)
    deadline = t_cut + 5
    while True:
        try:
            with wan.connect() as c:
                c.sendall(b"p")
                if ping(c) == b"x":
                    break
        except (OSError, EOFError):
            pass
        assert time.monotonic() < deadline, "cut 1s did not restore by itself"
        time.sleep(0.05)
    assert time.monotonic() - t_cut >= 1.0
    assert wan.stats()["state"] == "forwarding"


def test_flip_corrupts_chunks_and_is_counted(peer, wan_factory):
    wan = wan_factory(peer.addr)
    s = wan.connect()
    s.sendall(b"s")
    rec = peer.wait_records(1)[0]
    assert wan.ctl("flip", "3") == "flip 3 up"
    assert wan.stats()["flip_pending_up"] == 3
    msgs = [random.randbytes(32 * KiB) for _ in range(6)]
    sent = b""
    for m in msgs:
        s.sendall(m)
        sent += m
        # One message, one chunk: wait until it has gone through.
        deadline = time.monotonic() + 10
        while len(rec.data) < len(sent):
            assert time.monotonic() < deadline
            time.sleep(0.005)
    s.shutdown(socket.SHUT_WR)
    assert rec.done.wait(10)
    s.close()
    assert bit_diff(bytes(rec.data), sent) == 3
    # Only the first chunks were touched: the first three messages (one
    # chunk each, unless the kernel split one), never the later ones.
    got = bytes(rec.data)
    diffs = [bit_diff(got[i * len(m):(i + 1) * len(m)], m) for i, m in enumerate(msgs)]
    assert sum(diffs[:3]) == 3 and diffs[3:] == [0, 0, 0], diffs
    st = wan.stats()
    assert st["flipped_up"] == 3 and st["flip_pending_up"] == 0 and st["flipped_down"] == 0

    # Down: a download comes back with exactly 2 bits inverted.
    assert wan.ctl("flip", "2", "down") == "flip 2 down"
    s = wan.connect()
    n = 2 * MiB
    s.sendall(b"d" + struct.pack(">QQ", n, 99))
    got = recv_all(s)
    s.close()
    assert bit_diff(got, random.Random(99).randbytes(n)) == 2
    st = wan.stats()
    assert st["flipped_down"] == 2 and st["flip_pending_down"] == 0 and st["flipped_up"] == 3


def test_bad_commands_change_nothing(peer, wan_factory):
    wan = wan_factory(peer.addr, delay="1ms", rate="1gbit")
    s = wan.connect()
    s.sendall(b"p")
    peer.wait_records(1)
    before = wan.stats()
    bad = ["", "   ", "bogus", "DELAY 5ms", "delay", "delay abc", "delay -5ms", "delay 5",
           "delay 61s", "delay 1e3ms", "delay 0x10ms", "delay 5ms 6ms", "rate", "rate fast",
           "rate -1mbit", "rate 1mbps", "rate 0.001bit", "rate 100tbit", "stall now",
           "unstall 1", "cut 0", "cut -1s", "cut forever", "cut 25h", "restore all",
           "flip", "flip 0", "flip -1", "flip x", "flip 3 sideways", "flip 3 up extra",
           "flip 99999999999", "stats json", "quit now", "a b c d e f"]
    for line in bad:
        reply = wan.command(line)
        assert reply.startswith("error: "), f"{line!r} -> {reply!r}"
    after = wan.stats()
    for k in ("delay_ns", "rate_bps", "state", "stalled", "flip_pending_up", "flip_pending_down",
              "refused", "cut_resets"):
        assert after[k] == before[k], f"{k} changed: {before[k]} -> {after[k]}"
    assert after["delay_ns"] == 1_000_000 and after["rate_bps"] == 1_000_000_000

    ctl = wan.control_addr[5:]
    # A line over 1 KiB: one error, then disconnected.
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(ctl)
        c.sendall(b"a" * 2000)
        reply = recv_all(c)
        assert reply.startswith(b"error: line too long") and reply.count(b"\n") == 1, reply
    # Binary garbage: the same.
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(ctl)
        c.sendall(b"\x00\x01\xff\xfestats\n")
        reply = recv_all(c)
        assert reply.startswith(b"error: ") and reply.count(b"\n") == 1, reply
    # Gone mid-line: nothing happens.
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(ctl)
        c.sendall(b"sta")
    # Several commands on one connection, CRLF too: one reply each, in order.
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(ctl)
        c.sendall(b"help\r\nbogus\nstats\n")
        c.shutdown(socket.SHUT_WR)
        lines = recv_all(c).decode().splitlines()
        assert len(lines) == 3 and lines[0].startswith("ok commands:")
        assert lines[1].startswith("error: unknown command") and lines[2].startswith("ok {")

    # The CLI: exit 0 on ok, 1 on error.
    p = wan.ctl_cli("stats")
    assert p.stdout.startswith("ok {")
    p = wan.ctl_cli("delay", "soon", check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: bad delay"), p
    with pytest.raises(WanError):
        wan.ctl("flip", "nope")

    # And the proxy still forwards.
    assert ping(s) == b"x"
    s.close()
    assert wan.stats()["delay_ns"] == 1_000_000


def test_tcp_control_and_quit(peer, wan_factory):
    wan = wan_factory(peer.addr, control="tcp")
    host, port = wan.control_addr.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert wan.ctl_cli("delay", "2ms").stdout.strip() == "ok delay 2ms"
    assert wan.stats()["delay_ns"] == 2_000_000
    s = wan.connect()
    s.sendall(b"e")
    assert ping(s) == b"x"
    assert wan.ctl("quit") == "bye"
    wan.wait_exit(timeout=10)
    assert not wan.ready_path.exists(), "ready file left behind"
    assert expect_reset(s) in ("reset", "eof")
    s.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_promptly(peer, wan_factory, sig):
    wan = wan_factory(peer.addr, delay="50ms", rate="10mbit")
    socks = []
    for _ in range(3):
        s = wan.connect()
        s.sendall(b"s" + random.randbytes(256 * KiB))
        socks.append(s)
    wan.wait_stats(lambda st: st["active"] == 3, what="3 active")
    t0 = time.monotonic()
    wan.stop(sig=sig, timeout=10)
    assert time.monotonic() - t0 < 5
    assert not wan.ready_path.exists() and not wan.sock_path.exists()
    for s in socks:
        s.close()


def test_unreachable_target_resets_client(wan_factory):
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        port = gone.getsockname()[1]        # bound, never listening: connect is refused
        wan = wan_factory(f"127.0.0.1:{port}", log_level="info")
        assert refused(wan)
        st = wan.wait_stats(lambda st: st["connect_failed"] == 1, what="connect_failed")
        assert st["active"] == 0
    assert "cannot connect to" in wan.log()


def test_out_of_fds_clients_wait_and_control_works(peer, wan_factory):
    """With too few file descriptors, new clients wait in the backlog (they
    are not accepted just to be dropped), the proxy does not spin, and the
    control channel still answers."""
    wan = wan_factory(peer.addr, max_fds=40, log_level="info")
    socks = []
    for _ in range(30):
        s = wan.connect()
        s.sendall(b"e")
        socks.append(s)
    st = wan.wait_stats(lambda st: st["active"] >= 10, what="some connections active")
    cpu0 = cpu_seconds(wan.pid)
    time.sleep(0.5)
    assert cpu_seconds(wan.pid) - cpu0 < 0.2, "ferry-wan spins while out of fds"
    st = wan.stats()
    assert st["active"] < 30 and st["reset"] == 0 and st["connect_failed"] == 0, st
    # In order: each one ending frees fds, so the ones waiting come through.
    for s in socks:
        s.settimeout(10)
        assert ping(s) == b"x"
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
        s.close()
    st = wan.wait_stats(lambda st: st["active"] == 0, what="all closed")
    assert st["accepted"] == 30 and st["reset"] == 0
