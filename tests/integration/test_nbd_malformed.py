"""Bad input on the NBD socket, sent byte by byte from a raw socket: every
malformed handshake or request is refused (an NBD error where the protocol
lets the connection go on, a hang-up where it cannot), the daemon keeps
serving other clients, the disk's bytes are untouched, and the log says why."""
import hashlib
import os
import socket
import struct

import pytest

from conftest import MiB

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY = 8
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (
    0x80000001, 0x80000003, 0x80000006, 0x80000009)
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_ZERO, CMD_BS = range(8)
EINVAL, ENOSPC, EOVERFLOW = 22, 28, 75

DISK_SIZE = 8 * MiB


class Raw:
    def __init__(self, d):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(20)
        self.s.connect(str(d.sock))

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            c = self.s.recv(n - len(buf))
            if not c:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += c
        return buf

    def hello(self, flags=3):
        magic, ihaveopt, hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and ihaveopt == IHAVEOPT
        assert hflags & 1, "fixed newstyle offered"
        self.s.sendall(struct.pack(">I", flags))

    def opt(self, code, data=b"", length=None):
        ln = len(data) if length is None else length
        self.s.sendall(struct.pack(">QII", IHAVEOPT, code, ln) + data)

    def reply(self):
        magic, opt, rtype, ln = struct.unpack(">QIII", self.recv(20))
        assert magic == REP_MAGIC
        return opt, rtype, self.recv(ln) if ln else b""

    def go(self, name, structured=False):
        if structured:
            self.opt(OPT_STRUCTURED_REPLY)
            assert self.reply()[1] == REP_ACK
        n = name.encode()
        self.opt(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        while True:
            _, rtype, data = self.reply()
            if rtype == REP_ACK:
                return
            assert rtype == REP_INFO, f"GO answered {rtype:#x} {data!r}"

    def request(self, cmd, off, count, flags=0, cookie=7, payload=b""):
        self.s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, off, count) + payload)

    def simple_reply(self, cookie=7):
        magic, err, ck = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_MAGIC, f"expected a simple reply, magic {magic:#x}"
        assert ck == cookie
        return err

    def closed(self):
        """True if the server hung up (EOF/reset) within the timeout."""
        try:
            while True:
                c = self.s.recv(65536)
                if not c:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.s.close()


def image_hash(d, name):
    return hashlib.sha256(d.image_path(name).read_bytes()).hexdigest()


@pytest.fixture
def served(ferryd):
    ferryd.create("victim", "8M")
    # Known content, written through a real client so it is acknowledged.
    ferryd.qemu_io("victim", "write -P 0x5a 0 1M", "write -P 0xa5 4M 64K")
    return ferryd


def still_serving(d):
    """Another client can still use the disk, and sees the known content."""
    r = Raw(d)
    r.hello()
    r.go("victim")
    r.request(CMD_READ, 0, 4096)
    assert r.simple_reply() == 0
    assert r.recv(4096) == b"\x5a" * 4096
    r.request(CMD_DISC, 0, 0)
    r.close()


def test_bad_handshakes_hang_up_and_daemon_survives(served):
    d = served
    before = image_hash(d, "victim")

    # Unknown client flags.
    r = Raw(d)
    r.hello(flags=0xFFFF0003)
    assert r.closed()

    # Bad option magic.
    r = Raw(d)
    r.hello()
    r.s.sendall(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
    assert r.closed()

    # Option length beyond the limit: refused (TOO_BIG) and hung up, without
    # the server trying to read 4 GiB.
    r = Raw(d)
    r.hello()
    r.opt(OPT_GO, b"", length=0xFFFFFFF0)
    opt, rtype, _ = r.reply()
    assert rtype == REP_ERR_TOO_BIG
    assert r.closed()

    # EXPORT_NAME of an unknown disk: the protocol's only answer is to hang up.
    r = Raw(d)
    r.hello()
    r.opt(OPT_EXPORT_NAME, b"no-such-disk")
    assert r.closed()

    # Pure garbage.
    r = Raw(d)
    r.recv(18)
    r.s.sendall(os.urandom(4096))
    assert r.closed()

    # Truncated handshake: the client vanishes mid-option.
    r = Raw(d)
    r.hello()
    r.s.sendall(struct.pack(">QI", IHAVEOPT, OPT_GO))
    r.close()

    still_serving(d)
    assert image_hash(d, "victim") == before
    log = d.log()
    assert "unknown handshake flags" in log
    assert "bad option magic" in log
    assert "too large" in log


def test_bad_options_get_errors_and_the_handshake_goes_on(served):
    d = served
    r = Raw(d)
    r.hello()
    # GO whose declared name length runs past the option.
    r.opt(OPT_GO, struct.pack(">I", 1000) + b"victim" + struct.pack(">H", 0))
    assert r.reply()[1] == REP_ERR_INVALID
    # GO with an information count that does not match the length.
    r.opt(OPT_GO, struct.pack(">I", 6) + b"victim" + struct.pack(">H", 5))
    assert r.reply()[1] == REP_ERR_INVALID
    # Unknown export.
    r.opt(OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert r.reply()[1] == REP_ERR_UNKNOWN
    # LIST with data, STRUCTURED_REPLY with data, an unknown option, STARTTLS.
    r.opt(OPT_LIST, b"x")
    assert r.reply()[1] == REP_ERR_INVALID
    r.opt(OPT_STRUCTURED_REPLY, b"xx")
    assert r.reply()[1] == REP_ERR_INVALID
    r.opt(200, b"whatever")
    assert r.reply()[1] == REP_ERR_UNSUP
    r.opt(OPT_STARTTLS)
    assert r.reply()[1] == REP_ERR_UNSUP
    # SET_META_CONTEXT before structured replies.
    q = b"base:allocation"
    r.opt(10, struct.pack(">I", 6) + b"victim" + struct.pack(">II", 1, len(q)) + q)
    assert r.reply()[1] == REP_ERR_INVALID
    # After all that, a correct GO works.
    r.go("victim")
    r.request(CMD_READ, 0, 16)
    assert r.simple_reply() == 0
    assert r.recv(16) == b"\x5a" * 16
    r.close()


def test_bad_requests_get_nbd_errors_and_touch_nothing(served):
    d = served
    before = image_hash(d, "victim")
    r = Raw(d)
    r.hello()
    r.go("victim")

    cases = [
        # (cmd, offset, count, flags, payload, expected errno)
        (CMD_READ, DISK_SIZE - 100, 4096, 0, b"", EINVAL),            # past the end
        (CMD_READ, 2**64 - 512, 1024, 0, b"", EINVAL),                 # offset wraps
        (CMD_WRITE, DISK_SIZE, 512, 0, b"\xff" * 512, ENOSPC),         # write past end
        (CMD_WRITE, DISK_SIZE - 256, 512, 0, b"\xff" * 512, ENOSPC),   # straddles the end
        (CMD_WRITE, 0, 512, 0x80, b"\xff" * 512, EINVAL),              # unknown flag
        (CMD_WRITE, 0, 33 * MiB, 0, b"\xff" * (33 * MiB), EINVAL),     # over max block size
        (CMD_READ, 0, 33 * MiB, 0, b"", EINVAL),
        (CMD_TRIM, DISK_SIZE - 4096, 8192, 0, b"", ENOSPC),
        (CMD_ZERO, 0, 4096, 0x10, b"", EINVAL),                        # FAST_ZERO not offered
        (CMD_FLUSH, 0, 4096, 0, b"", EINVAL),                          # flush with a length
        (CMD_BS, 0, 4096, 0, b"", EINVAL),                             # no structured replies
        (CMD_READ, 0, 512, 4, b"", EINVAL),                            # DF without structured
        (42, 0, 0, 0, b"", EINVAL),                                    # unknown command
    ]
    for i, (cmd, off, count, flags, payload, want) in enumerate(cases):
        r.request(cmd, off, count, flags=flags, cookie=1000 + i, payload=payload)
        err = r.simple_reply(cookie=1000 + i)
        assert err == want, f"case {i}: cmd {cmd} off {off} count {count}: errno {err}, want {want}"

    # The connection is still good, and nothing was written.
    r.request(CMD_READ, 4 * MiB, 4096, cookie=99)
    assert r.simple_reply(cookie=99) == 0
    assert r.recv(4096) == b"\xa5" * 4096
    r.request(CMD_FLUSH, 0, 0, cookie=98)
    assert r.simple_reply(cookie=98) == 0

    # A bad request magic cannot be skipped: the server hangs up.
    r.s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_WRITE, 5, 0, 4096) + b"\xff" * 4096)
    assert r.closed()

    assert image_hash(d, "victim") == before
    dirty = d.dirty("victim")
    # Only the two qemu-io writes are in the map: 1 MiB at 0 and 64 KiB at 4 MiB.
    assert dirty["dirty_bytes"] == 1 * MiB + 64 * 1024, dirty
    still_serving(d)
    assert "refused command" in d.log()
    assert "bad request magic" in d.log()


def test_structured_error_replies(served):
    d = served
    r = Raw(d)
    r.hello()
    r.go("victim", structured=True)
    r.request(CMD_READ, DISK_SIZE, 512, cookie=3)
    magic, flags, rtype, ck, ln = struct.unpack(">IHHQI", r.recv(20))
    assert magic == STRUCT_MAGIC and ck == 3
    assert rtype == 32769 and flags & 1, "an ERROR chunk with the DONE flag"
    body = r.recv(ln)
    err, mlen = struct.unpack(">IH", body[:6])
    assert err == EINVAL
    assert body[6:6 + mlen], "the error carries a message"
    # BLOCK_STATUS without a selected meta context is refused too.
    r.request(CMD_BS, 0, 4096, cookie=4)
    magic, flags, rtype, ck, ln = struct.unpack(">IHHQI", r.recv(20))
    assert rtype == 32769 and ck == 4
    assert struct.unpack(">I", r.recv(ln)[:4])[0] == EINVAL
    r.close()


def test_stalled_handshakes_do_not_block_others(served):
    d = served
    stalled = [Raw(d) for _ in range(20)]   # connect and say nothing
    still_serving(d)
    for s in stalled:
        s.close()
    still_serving(d)
