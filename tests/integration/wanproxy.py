"""wanproxy: starts, drives and stops ferry-wan (docs/wan.md) for the
integration tests and benchmarks.

    wan = WanProxy(tmp_path, connect=f"127.0.0.1:{port}", delay="10ms").start()
    s = wan.connect()                 # a client socket through the proxy
    wan.ctl("rate", "16mbit")         # "ok ..." -> the text after "ok "
    wan.stats()["bytes_up"]           # the stats line, parsed
    wan.stop()                        # SIGTERM by pid, exit 0, no sanitizer report

The proxy listens on 127.0.0.1:0 (a free port) and its control channel on a
unix socket in the tmp dir (or 127.0.0.1:0 with control="tcp"); both are
read from the --ready-file.  Each instance logs to its own file.  Commands go
over the control socket directly, one connection per command; ctl_cli()
runs `ferry-wan ctl` instead, to test the CLI itself.

WanFactory tracks every proxy a test starts and stops them at teardown, so a
failing test leaves no process behind:

    @pytest.fixture
    def wan_factory(tmp_path_factory):
        f = WanFactory(tmp_path_factory)
        yield f
        f.teardown()
"""
import json
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BUILD, run, sanitizer_report

FERRY_WAN = BUILD / "ferry-wan"
START_TIMEOUT = 30
STOP_TIMEOUT = 15


class WanError(Exception):
    """The proxy answered "error: ..."."""


class WanProxy:
    def __init__(self, tmp: Path, connect, delay=None, rate=None, control="unix",
                 extra_args=(), log_level="debug", name="wan", max_fds=None):
        self.tmp = Path(tmp)
        self.connect_to = connect
        self.delay = delay
        self.rate = rate
        self.control = control
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self.name = name
        self.max_fds = max_fds           # RLIMIT_NOFILE for the proxy, to test running out
        self.proc = None
        self.info = None
        self.log_path = self.tmp / f"{name}.log"
        self.ready_path = self.tmp / f"{name}.json"
        self.sock_path = self.tmp / f"{name}.sock"

    # --- life cycle -------------------------------------------------------
    def args(self):
        ctl = f"unix:{self.sock_path}" if self.control == "unix" else "127.0.0.1:0"
        a = [str(FERRY_WAN), "--listen", "127.0.0.1:0", "--connect", self.connect_to,
             "--control", ctl, "--ready-file", str(self.ready_path),
             "--log-level", self.log_level]
        if self.delay is not None:
            a += ["--delay", str(self.delay)]
        if self.rate is not None:
            a += ["--rate", str(self.rate)]
        return a + self.extra_args

    def start(self, timeout=START_TIMEOUT):
        assert self.proc is None, "ferry-wan already running"
        if not FERRY_WAN.exists():
            pytest.fail(f"{FERRY_WAN} not built (ninja -C {BUILD})")
        if self.ready_path.exists():
            self.ready_path.unlink()
        preexec = None
        if self.max_fds is not None:
            def preexec():
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.tmp,
                                         preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                pytest.fail(f"ferry-wan exited {rc} before it was ready:\n{self.log()[-4000:]}")
            try:
                info = json.loads(self.ready_path.read_text())
                if info.get("pid") == self.proc.pid:
                    break
            except (OSError, ValueError):
                pass          # not there yet (it is written by rename)
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"ferry-wan not ready after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.02)
        self.info = info
        return self

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT, expect_rc=0):
        """Sends sig to the proxy's pid; checks the exit code, that it exited
        within timeout, and that it printed no sanitizer report."""
        assert self.proc is not None, "ferry-wan not running"
        proc, self.proc = self.proc, None
        proc.send_signal(sig)
        return self._reap(proc, timeout, expect_rc, f"{sig!r}")

    def wait_exit(self, timeout=STOP_TIMEOUT, expect_rc=0):
        """After `quit`: waits for the exit, checks as stop() does."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        return self._reap(proc, timeout, expect_rc, "quit")

    def _reap(self, proc, timeout, expect_rc, why):
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"ferry-wan did not exit within {timeout}s of {why}:\n{self.log()[-4000:]}")
        rep = sanitizer_report(self.log())
        assert rep is None, f"sanitizer report in ferry-wan log:\n{rep}"
        if expect_rc is not None:
            assert rc == expect_rc, f"ferry-wan exited {rc} after {why}:\n{self.log()[-4000:]}"
        return rc

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.stop()

    # --- addresses --------------------------------------------------------
    @property
    def listen(self):
        """"127.0.0.1:PORT" where clients connect."""
        return self.info["listen"]

    @property
    def port(self):
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def control_addr(self):
        return self.info["control"]

    def connect(self, timeout=30):
        """A TCP client socket through the proxy."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    # --- control ----------------------------------------------------------
    def _control_socket(self, timeout):
        addr = self.control_addr
        if addr.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(addr[5:])
        else:
            host, port = addr.rsplit(":", 1)
            s = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        return s

    def command(self, line, timeout=10):
        """Sends one raw line, returns the reply line (without newline)."""
        with self._control_socket(timeout) as s:
            s.sendall(line.encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                c = s.recv(4096)
                if not c:
                    raise EOFError(f"ferry-wan closed the control connection; sent {line!r}, "
                                   f"got {buf!r}")
                buf += c
        return buf.split(b"\n", 1)[0].decode()

    def ctl(self, *words):
        """Runs a command; returns the text after "ok " or raises WanError."""
        reply = self.command(" ".join(str(w) for w in words))
        if reply == "ok" or reply.startswith("ok "):
            return reply[3:]
        raise WanError(reply)

    def stats(self):
        return json.loads(self.ctl("stats"))

    def ctl_cli(self, *words, check=True):
        """`ferry-wan ctl ADDR WORDS...`; returns the CompletedProcess."""
        return run([FERRY_WAN, "ctl", self.control_addr, *words], timeout=30, check=check)

    def wait_stats(self, pred, timeout=10, what="condition"):
        """Polls stats until pred(stats) holds; returns those stats."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                pytest.fail(f"ferry-wan stats: {what} not reached within {timeout}s: {st}")
            time.sleep(0.02)


class WanFactory:
    """Makes WanProxy instances in fresh short tmp dirs (unix socket paths
    are limited to 107 bytes) and stops every one still running at teardown."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.proxies = []

    def __call__(self, connect, start=True, **kw):
        tmp = Path(self.tmp_path_factory.mktemp("wan", numbered=True))
        p = WanProxy(tmp, connect, **kw)
        self.proxies.append(p)
        return p.start() if start else p

    def teardown(self):
        errors = []
        for p in self.proxies:
            if p.proc is not None:
                try:
                    p.stop()
                except BaseException as e:   # pytest.fail raises an OutcomeException
                    p.kill()
                    errors.append(str(e))
        if errors:
            pytest.fail("ferry-wan teardown: " + "\n".join(errors))
