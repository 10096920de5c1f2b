"""Integration test harness: starts the real ferryd from $FERRY_BUILD (default
build-asan) with its own data dir, API on 127.0.0.1:0 and NBD on a unix socket
in the test's tmp dir (or 127.0.0.1:0 for the TCP variant), and drives it with
the ferry CLI, raw HTTP and standard NBD clients (qemu-img, qemu-io, nbdinfo,
nbdcopy, fio, python libnbd).

Every daemon a test starts is stopped at teardown with SIGTERM (by pid), must
exit 0, and must have printed no sanitizer report; a test fails otherwise.
"""
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("FERRY_BUILD", ROOT / "build-asan"))
if not BUILD.is_absolute():
    BUILD = ROOT / BUILD
FERRYD = BUILD / "ferryd"
FERRY = BUILD / "ferry"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

START_TIMEOUT = 60      # seconds to wait for ferryd.json (ASan builds start slowly)
STOP_TIMEOUT = 60       # seconds to wait for a clean exit after SIGTERM
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                     "runtime error:", "ERROR: ThreadSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")

# Sanitizer settings for the daemons (test.sh sets the same; this makes a bare
# `pytest` run just as strict).
os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1:abort_on_error=1:print_summary=1")
os.environ.setdefault("UBSAN_OPTIONS", "halt_on_error=1:abort_on_error=1:print_stacktrace=1:print_summary=1")


def need(*tools):
    """Skips the test when a client tool is not installed."""
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed (scripts/setup.sh installs it)")


def have_libnbd():
    import importlib.util
    return importlib.util.find_spec("nbd") is not None


def run(cmd, timeout=300, check=True, **kw):
    """Runs a command, returns CompletedProcess (text); on failure the
    assertion shows the command and its output."""
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check:
        assert p.returncode == 0, (f"{' '.join(cmd)} exited {p.returncode}\n"
                                   f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def sanitizer_report(text):
    for m in SANITIZER_MARKERS:
        i = text.find(m)
        if i >= 0:
            return text[max(0, i - 200):i + 3000]
    return None


class Ferryd:
    """One ferryd data dir; the daemon may be started, stopped, killed and
    restarted many times over it.  Every incarnation logs to its own file."""

    def __init__(self, tmp: Path, transport="unix", extra_args=()):
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.transport = transport
        self.sock = tmp / "nbd.sock"
        self.extra_args = list(extra_args)
        self.proc = None
        self.incarnation = 0
        self.log_path = None
        self.info = None
        self.api_url = None
        self.nbd_addr = None
        self.env = None            # extra environment variables for the daemon

    # --- life cycle -------------------------------------------------------
    def start(self, extra_args=None, timeout=START_TIMEOUT):
        assert self.proc is None, "ferryd already running"
        if not FERRYD.exists():
            pytest.fail(f"{FERRYD} not built (scripts/build.sh asan)")
        self.incarnation += 1
        self.log_path = self.tmp / f"ferryd-{self.incarnation}.log"
        nbd = f"unix:{self.sock}" if self.transport == "unix" else "127.0.0.1:0"
        args = [str(FERRYD), "--data-dir", str(self.data_dir), "--api", "127.0.0.1:0",
                "--link", "127.0.0.1:0",
                "--nbd", nbd, "--log-level", "debug"]
        args += self.extra_args if extra_args is None else list(extra_args)
        ready = self.data_dir / "ferryd.json"
        # A stale ready file (after kill -9) must not be taken for this run's.
        if ready.exists():
            ready.unlink()
        log = open(self.log_path, "w")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                pytest.fail(f"ferryd exited {rc} before it was ready:\n{self.log()[-5000:]}")
            if ready.exists():
                try:
                    info = json.loads(ready.read_text())
                    if info.get("pid") == self.proc.pid:
                        break
                except (ValueError, OSError):
                    pass   # written by rename, so a partial file should not happen; retry
            if time.monotonic() > deadline:
                self._kill_hard()
                pytest.fail(f"ferryd not ready after {timeout}s:\n{self.log()[-5000:]}")
            time.sleep(0.05)
        self.info = info
        self.api_url = info["api"].rstrip("/")
        self.nbd_addr = info["nbd"]
        if self.transport == "unix":
            assert self.nbd_addr == f"unix:{self.sock}", info
        return self

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT, expect_rc=0):
        """Sends sig to the daemon's pid, waits, checks exit code and log."""
        assert self.proc is not None, "ferryd not running"
        proc, self.proc = self.proc, None
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"ferryd did not exit within {timeout}s of {sig!r}:\n{self.log()[-5000:]}")
        text = self.log()
        rep = sanitizer_report(text)
        assert rep is None, f"sanitizer report in ferryd log:\n{rep}"
        if expect_rc is not None:
            assert rc == expect_rc, f"ferryd exited {rc} after {sig!r}, expected {expect_rc}:\n{text[-5000:]}"
        if sig in (signal.SIGTERM, signal.SIGINT) and rc == 0:
            assert not (self.data_dir / "ferryd.json").exists(), "ferryd.json left behind after SIGTERM"
        return rc

    def kill9(self):
        """kill -9: no chance to sync anything."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        proc.kill()
        proc.wait(timeout=30)
        rep = sanitizer_report(self.log())
        assert rep is None, f"sanitizer report in ferryd log:\n{rep}"

    def restart(self, **kw):
        self.stop()
        return self.start(**kw)

    def _kill_hard(self):
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=30)
            except Exception:
                pass
            self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def log(self, incarnation=None):
        p = self.log_path if incarnation is None else self.tmp / f"ferryd-{incarnation}.log"
        try:
            return p.read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # --- clients ----------------------------------------------------------
    def cli(self, *args, check=True, timeout=120, json_out=False):
        """Runs `ferry --api URL ARGS`.  With json_out, adds -o json and
        returns the parsed answer (check must hold)."""
        cmd = [str(FERRY), "--api", self.api_url]
        if json_out:
            cmd += ["-o", "json"]
        cmd += [str(a) for a in args]
        p = run(cmd, timeout=timeout, check=check)
        if json_out:
            try:
                return json.loads(p.stdout)
            except ValueError:
                pytest.fail(f"ferry {' '.join(map(str, args))} -o json printed no JSON:\n{p.stdout}\n{p.stderr}")
        return p

    def api(self, method, path, body=None, raw=None, headers=None, timeout=60):
        """HTTP request to the API; returns (status, parsed JSON or None)."""
        data = raw
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.api_url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            pytest.fail(f"{method} {path} -> {status} with a body that is not JSON: {payload[:500]!r}")
        return status, parsed

    def api_ok(self, method, path, body=None, status=200):
        st, js = self.api(method, path, body)
        assert st == status, f"{method} {path} -> {st} {js}, expected {status}"
        return js

    def tcp_port(self):
        assert self.transport == "tcp"
        return int(self.nbd_addr.rsplit(":", 1)[1])

    def uri(self, disk):
        """NBD URI of a disk, as libnbd, qemu and fio take it."""
        if self.transport == "unix":
            return f"nbd+unix:///{disk}?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.tcp_port()}/{disk}"

    def server_uri(self):
        """URI of the server with no export (for nbdinfo --list)."""
        if self.transport == "unix":
            return f"nbd+unix:///?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.tcp_port()}/"

    def create(self, name, size, granularity=None):
        args = ["disk", "create", name, "--size", size]
        if granularity is not None:
            args += ["--cbt-granularity", granularity]
        return self.cli(*args, json_out=True)

    def disk(self, name):
        return self.api_ok("GET", f"/v1/disks/{name}")

    def dirty(self, name):
        return self.api_ok("GET", f"/v1/disks/{name}/dirty")

    def wait_idle(self, name, timeout=15):
        """Waits until ferryd counts no client on the disk: a client process
        that exited has closed its socket, but ferryd notices the disconnect
        a moment later."""
        deadline = time.monotonic() + timeout
        while self.disk(name)["clients"] != 0:
            assert time.monotonic() < deadline, f"disk {name} still has clients after {timeout}s"
            time.sleep(0.02)

    def map_path(self, name):
        return self.data_dir / "cbt" / f"{name}.cbt"

    def image_path(self, name):
        return self.data_dir / "disks" / f"{name}.img"

    def qemu_io(self, disk, *cmds, timeout=300, check=True):
        """One qemu-io process running cmds in order against the disk; a
        command that returned has been acknowledged by ferryd."""
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        args.append(self.uri(disk))
        p = run(args, timeout=timeout, check=check)
        if check:
            out = p.stdout + p.stderr
            for bad in ("Pattern verification failed", "failed:", "error"):
                assert bad not in out, f"qemu-io reported '{bad}':\n{out[-4000:]}"
        return p


class FerrydFactory:
    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.daemons = []

    def __call__(self, transport="unix", start=True, extra_args=()):
        # Short path: unix socket paths are limited to 107 bytes.
        tmp = Path(self.tmp_path_factory.mktemp("fd", numbered=True))
        d = Ferryd(tmp, transport=transport, extra_args=extra_args)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    def teardown(self):
        errors = []
        for d in self.daemons:
            if d.proc is not None:
                try:
                    d.stop()
                except BaseException as e:   # pytest.fail raises an OutcomeException
                    d._kill_hard()
                    errors.append(str(e))
        if errors:
            pytest.fail("ferryd teardown: " + "\n".join(errors))


@pytest.fixture
def ferryd_factory(tmp_path_factory):
    f = FerrydFactory(tmp_path_factory)
    yield f
    f.teardown()


@pytest.fixture
def ferryd(ferryd_factory):
    """A running ferryd with NBD on a unix socket in its tmp dir."""
    return ferryd_factory("unix")


@pytest.fixture
def ferryd_tcp(ferryd_factory):
    """A running ferryd with NBD on 127.0.0.1:<free port>."""
    return ferryd_factory("tcp")


@pytest.fixture(params=["unix", "tcp"])
def ferryd_any(request, ferryd_factory):
    """The test runs twice: NBD over a unix socket, and over TCP loopback."""
    return ferryd_factory(request.param)


# --- helpers for expected dirty maps ---------------------------------------
def granules(ranges, gran, size):
    """Set of region indices touched by [(off, len)...]."""
    out = set()
    for off, ln in ranges:
        if ln == 0:
            continue
        end = min(off + ln, size)
        out.update(range(off // gran, (end - 1) // gran + 1))
    return out


def extents_to_granules(extents, gran):
    """Region indices covered by [{"offset","length"}...] (must be aligned
    except for the last extent, which may be cut at the disk size)."""
    out = set()
    for e in extents:
        off, ln = e["offset"], e["length"]
        assert off % gran == 0, f"extent {e} not aligned to granularity {gran}"
        out.update(range(off // gran, (off + ln + gran - 1) // gran))
    return out


def expected_extents(idx, gran, size):
    """Runs of region indices as API extents (the last cut at size)."""
    out = []
    for i in sorted(idx):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [{"offset": a * gran, "length": min(b * gran, size) - a * gran} for a, b in out]


def nbdinfo_map(uri, context=None):
    """nbdinfo --map[=context] --json; returns the list of extents."""
    need("nbdinfo")
    args = ["nbdinfo", "--json"]
    args.append(f"--map={context}" if context else "--map")
    args.append(uri)
    p = run(args, timeout=120)
    js = json.loads(p.stdout)
    # nbdinfo --map --json prints a list of {"offset","length","type","description"}
    return js if isinstance(js, list) else js.get("map", js)


class RawNbdClient:
    """A minimal NBD client on a plain socket (fixed newstyle, NBD_OPT_GO,
    simple replies) that stays connected until closed: enough to hold a disk
    busy and to see the server end the connection.  No libnbd needed."""

    def __init__(self, d, export):
        import socket
        import struct
        self.struct = struct
        if d.transport == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.sock))
        else:
            s = socket.create_connection(("127.0.0.1", d.tcp_port()))
        s.settimeout(30)
        self.s = s
        magic, ihaveopt, hflags = struct.unpack(">QQH", self._recv(18))
        assert magic == 0x4E42444D41474943 and ihaveopt == 0x49484156454F5054
        s.sendall(struct.pack(">I", 3))            # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(payload)) + payload)
        self.size = None
        while True:
            rmagic, opt, rtype, ln = struct.unpack(">QIII", self._recv(20))
            data = self._recv(ln) if ln else b""
            if rtype == 1:            # NBD_REP_ACK
                break
            if rtype & 0x80000000:
                raise OSError(f"NBD_OPT_GO refused: {rtype:#x} {data!r}")
            if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
                self.size = struct.unpack(">Q", data[2:10])[0]

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            c = self.s.recv(n - len(buf))
            if not c:
                raise EOFError("server closed the connection")
            buf += c
        return buf

    def read(self, off, ln, cookie=1):
        st = self.struct
        self.s.sendall(st.pack(">IHHQQI", 0x25609513, 0, 0, cookie, off, ln))
        magic, err, ck = st.unpack(">IIQ", self._recv(16))
        assert magic == 0x67446698 and ck == cookie
        if err:
            raise OSError(err, "NBD read error")
        return self._recv(ln)

    def closed_by_server(self, timeout=30):
        """True once the server has ended the connection (EOF or reset)."""
        self.s.settimeout(timeout)
        try:
            return self.s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError:
            return False

    def close(self):
        try:
            self.s.sendall(self.struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # DISC
        except OSError:
            pass
        self.s.close()
