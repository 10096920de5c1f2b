"""simvm: runs and drives ferry-simvm (the simulated VM, docs/simvm.md) from
integration tests.

SimVM wraps one `ferry-simvm run` process: start(), the control commands as
methods (status, pause, resume, save, stop, set_workload, verify) over the
JSON-line control socket, signals by pid, and its log.  Every process a
SimVM starts is stopped by pid; stop() and terminate() insist on the exit
status and on a log without sanitizer reports.

Module helpers run the offline subcommands (verify, fill) and read the sim
block format out of a raw image file (parse_block, scan_image), so a test
can find the blocks the VM wrote and damage them behind ferryd's back.
"""
import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BUILD, run, sanitizer_report

SIMVM = BUILD / "ferry-simvm"
BLOCK = 4096
MAGIC = b"FSIMBLK1"
START_TIMEOUT = 30
STOP_TIMEOUT = 60


def need_simvm():
    if not SIMVM.exists():
        pytest.fail(f"{SIMVM} not built")


def simvm(*args, check=True, timeout=120):
    """Runs `ferry-simvm ARGS` (verify, fill, ctl...); returns CompletedProcess."""
    need_simvm()
    return run([SIMVM, *args], timeout=timeout, check=check)


def disk_args(disks):
    out = []
    for name, uri in disks.items():
        out += ["--disk", f"{name}={uri}"]
    return out


def offline_verify(state, disks, timeout=120):
    """`ferry-simvm verify`: returns (exit status, report dict or None)."""
    p = simvm("verify", "--state", state, *disk_args(disks), check=False, timeout=timeout)
    report = None
    if p.stdout.strip():
        report = json.loads(p.stdout)
    rep = sanitizer_report(p.stderr)
    assert rep is None, f"sanitizer report from ferry-simvm verify:\n{rep}"
    return p.returncode, report, p.stderr


def fill(state, disks, percent=None, create=False, check=True):
    args = ["fill", "--state", state, *disk_args(disks)]
    if create:
        args.append("--create")
    if percent is not None:
        args += ["--percent", percent]
    return simvm(*args, check=check)


def parse_block(buf):
    """The header of a sim block (dict), or None if buf does not start with
    the magic.  The checksum is not checked here (no xxhash in the test's
    python); ferry-simvm's own checks do that."""
    if len(buf) < BLOCK or buf[:8] != MAGIC:
        return None
    vm_id, offset, gen, disk = struct.unpack_from("<QQQI", buf, 8)
    return {"vm_id": vm_id, "offset": offset, "generation": gen, "disk": disk}


def scan_image(path, vm_id=None):
    """[(offset, header)] of every sim block in a raw image (of vm_id, if
    given) that sits where its header says."""
    out = []
    with open(path, "rb") as f:
        off = 0
        while True:
            buf = f.read(1 << 20)
            if not buf:
                break
            for i in range(0, len(buf) - BLOCK + 1, BLOCK):
                h = parse_block(buf[i:i + BLOCK])
                if h and (vm_id is None or h["vm_id"] == vm_id) and h["offset"] == off + i:
                    out.append((off + i, h))
            off += len(buf)
    return out


class SimVM:
    """One ferry-simvm run process (which may be restarted over the same
    state file and control socket)."""

    def __init__(self, tmp, disks, tag="vm", state=None, control=None, workload=None,
                 create=True, paused=False, name=None, log_level="debug"):
        self.tmp = Path(tmp)
        self.disks = dict(disks)
        self.tag = tag
        self.state = Path(state) if state else self.tmp / f"{tag}.state"
        # Short: unix socket paths are limited to 107 bytes.
        self.control = Path(control) if control else self.tmp / f"{tag}.sock"
        self.workload = workload
        self.create = create
        self.paused = paused
        self.name = name
        self.log_level = log_level
        self.proc = None
        self.incarnation = 0
        self.log_path = None

    # --- life cycle -------------------------------------------------------
    def args(self):
        a = [str(SIMVM), "run", "--state", str(self.state), "--control", str(self.control),
             *disk_args(self.disks), "--log-level", self.log_level]
        if self.workload is not None:
            a += ["--workload", self.workload]
        if self.create:
            a.append("--create")
        if self.paused:
            a.append("--paused")
        if self.name:
            a += ["--name", self.name]
        return a

    def spawn(self):
        """Starts the process without waiting for it (for refusal tests)."""
        need_simvm()
        assert self.proc is None, "ferry-simvm already running"
        self.incarnation += 1
        self.log_path = self.tmp / f"{self.tag}-{self.incarnation}.log"
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp)
        log.close()
        return self.proc

    def start(self, timeout=START_TIMEOUT):
        self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                pytest.fail(f"ferry-simvm exited {rc} before it was ready:\n{self.log()[-4000:]}")
            if "ready:" in self.log():
                try:
                    self.ctl("status")
                    return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.kill9()
                pytest.fail(f"ferry-simvm not ready after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def run_expecting_failure(self, timeout=60):
        """Runs to completion (it must refuse to start); returns (rc, log)."""
        self.spawn()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            pytest.fail(f"ferry-simvm did not exit:\n{self.log()[-4000:]}")
        self.proc = None
        text = self.log()
        rep = sanitizer_report(text)
        assert rep is None, f"sanitizer report in ferry-simvm log:\n{rep}"
        return rc, text

    def _wait_exit(self, timeout, expect_rc):
        proc, self.proc = self.proc, None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"ferry-simvm did not exit within {timeout}s:\n{self.log()[-4000:]}")
        text = self.log()
        rep = sanitizer_report(text)
        assert rep is None, f"sanitizer report in ferry-simvm log:\n{rep}"
        if expect_rc is not None:
            assert rc == expect_rc, f"ferry-simvm exited {rc}, expected {expect_rc}:\n{text[-4000:]}"
        return rc

    def stop(self, timeout=STOP_TIMEOUT):
        """The stop command: drain, save, reply, exit 0."""
        assert self.proc is not None
        r = self.ctl("stop", timeout=timeout)
        assert r["state"] == "stopping", r
        self._wait_exit(timeout, 0)
        assert not self.control.exists(), "control socket left behind after stop"
        return r

    def terminate(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT, expect_rc=0):
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self._wait_exit(timeout, expect_rc)

    def kill9(self):
        if self.proc is not None:
            proc, self.proc = self.proc, None
            proc.kill()
            proc.wait(timeout=30)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    # --- control ----------------------------------------------------------
    def connect(self, timeout=60):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.control))   # blocking: a full backlog waits instead of EAGAIN
        s.settimeout(timeout)
        return s

    @staticmethod
    def read_line(s, limit=1 << 24):
        buf = b""
        while b"\n" not in buf:
            c = s.recv(65536)
            if not c:
                break
            buf += c
            assert len(buf) < limit, "reply too long"
        return buf

    def raw(self, data, timeout=30):
        """Sends raw bytes on a new connection and returns every reply line
        until the VM closes the connection or goes quiet for a moment."""
        s = self.connect(timeout)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while True:
                try:
                    c = s.recv(65536)
                except (ConnectionResetError, socket.timeout):
                    break
                if not c:
                    break
                out += c
        finally:
            s.close()
        return [json.loads(line) for line in out.split(b"\n") if line.strip()]

    def ctl(self, cmd, check=True, timeout=120, **args):
        """One request; returns the reply dict.  check: the reply must be ok."""
        req = dict(args)
        req["cmd"] = cmd
        s = self.connect(timeout)
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            line = self.read_line(s)
        finally:
            s.close()
        assert line.endswith(b"\n"), f"{cmd}: no complete reply line: {line[:500]!r}"
        reply = json.loads(line)
        if check:
            assert reply.get("ok") is True, f"{cmd} {args} -> {reply}\n{self.log()[-3000:]}"
        return reply

    def status(self):
        return self.ctl("status")

    def pause(self, **kw):
        return self.ctl("pause", **kw)

    def resume(self):
        return self.ctl("resume")

    def save(self):
        return self.ctl("save")

    def set_workload(self, spec, check=True):
        return self.ctl("set_workload", check=check, workload=spec)

    def verify(self, timeout=300):
        return self.ctl("verify", timeout=timeout)["report"]

    def counters(self):
        return self.status()["counters"]

    def wait_for(self, pred, timeout=30, what="condition"):
        """Polls status until pred(status) holds; returns that status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                pytest.fail(f"ferry-simvm: {what} not reached within {timeout}s: {st}\n"
                            f"{self.log()[-3000:]}")
            time.sleep(0.05)

    def wait_writes(self, n, timeout=30):
        """Waits until the VM counts at least n more acknowledged writes."""
        start = self.counters()["writes"]
        return self.wait_for(lambda st: st["counters"]["writes"] >= start + n, timeout,
                             f"{n} more writes")


class SimVMFactory:
    """Makes SimVMs and at teardown ends any still running (by pid)."""

    def __init__(self):
        self.vms = []

    def __call__(self, tmp, disks, **kw):
        vm = SimVM(tmp, disks, **kw)
        self.vms.append(vm)
        return vm

    def teardown(self):
        errors = []
        for vm in self.vms:
            if vm.proc is not None:
                try:
                    vm.terminate(signal.SIGTERM, timeout=30, expect_rc=None)
                except BaseException as e:   # pytest.fail raises an OutcomeException
                    vm.kill9()
                    errors.append(str(e))
            rep = sanitizer_report(vm.log())
            if rep:
                errors.append(f"sanitizer report in {vm.log_path}:\n{rep}")
        if errors:
            pytest.fail("ferry-simvm teardown: " + "\n".join(errors))
