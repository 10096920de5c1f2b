"""guest: boots ferry's tiny test guest (tests/guest/, docs/guest.md) in QEMU
from integration tests.

- guest_artifacts(): builds the guest once per pytest session with
  tests/guest/build.sh into build-guest/ (cached there across sessions: a
  few ms when up to date) and returns its guest.json (paths of kernel,
  initrd, writer; kernel release, boot method, modules).  A failed build
  fails the test with the build's output; nothing is skipped.
- qemu_cmdline(): the QEMU command line that boots it: TCG (this test
  machine's /dev/kvm cannot run guests), PVH boot of the uncompressed
  vmlinux, serial console to a file, the disk as virtio-blk over NBD with
  cache=none.  The reference for the QEMU hypervisor driver.
- QemuGuest: one QEMU process: start, wait for console lines, boot time
  (start to the writer's first line), stop by pid.
- check_records(): tests/guest/check_records.check (the record checker).

Independent of the ferry build: only the disk server (ferryd or anything
else speaking NBD) comes from $FERRY_BUILD.
"""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST_SRC = ROOT / "tests" / "guest"
GUEST_OUT = Path(os.environ.get("FERRY_GUEST_BUILD", ROOT / "build-guest"))
QEMU = "qemu-system-x86_64"
BUILD_TIMEOUT = 900        # uncached: download and unpack a kernel .deb (~10 s here)
BOOT_TIMEOUT = 60          # QEMU start to the writer's first line (~3-4 s under TCG)
STOP_TIMEOUT = 30

WRITER_START = re.compile(r"^ferry-writer: start boot (\d+) at seq (\d+)", re.M)
WRITER_PROGRESS = re.compile(r"^ferry-writer: boot (\d+) seq (\d+)$", re.M)
FATAL = re.compile(r"^(ferry-guest: ERROR.*|.*Kernel panic.*)$", re.M)

_artifacts = None


def guest_artifacts():
    """Builds the guest (once per session) and returns guest.json as a dict:
    kernel (the file to give -kernel), vmlinux, vmlinuz, initrd, writer,
    boot ("pvh" or "bzimage"), kernel_release, kernel_package, modules."""
    global _artifacts
    if _artifacts is None:
        t0 = time.monotonic()
        try:
            p = subprocess.run([str(GUEST_SRC / "build.sh"), str(GUEST_OUT)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"tests/guest/build.sh took over {BUILD_TIMEOUT}s:\n{e.output}")
        if p.returncode != 0:
            pytest.fail(f"tests/guest/build.sh {GUEST_OUT} exited {p.returncode}:\n{p.stdout[-8000:]}")
        info = json.loads((GUEST_OUT / "guest.json").read_text())
        info["build_seconds"] = round(time.monotonic() - t0, 2)
        info["build_log"] = p.stdout
        _artifacts = info
    return _artifacts


def _drive_value(s):
    """A value inside -drive's comma-separated options: ',' is written ',,'."""
    return str(s).replace(",", ",,")


def qemu_cmdline(kernel, initrd, disk, console_log, qmp_socket=None, extra_append="",
                 rate=50, memory_mb=256):
    """argv for booting the test guest.

    disk: an NBD URI (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT)
    or a raw image path.  cache=none: QEMU opens the disk with O_DIRECT and
    the guest sees a volatile write cache, so the writer's fdatasync reaches
    the NBD server as NBD_CMD_FLUSH.  For a file, that needs a filesystem
    that supports O_DIRECT (not tmpfs).
    qmp_socket: path of a QMP unix socket (server, no wait) or None.
    extra_append: more kernel command line (ferry.rate= comes from rate).
    """
    append = f"console=ttyS0 panic=-1 ferry.rate={int(rate)}"
    if extra_append:
        append += " " + extra_append
    argv = [QEMU, "-accel", "tcg", "-cpu", "qemu64", "-m", str(memory_mb),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-serial", f"file:{console_log}",
            "-drive", f"file={_drive_value(disk)},format=raw,if=virtio,cache=none"]
    if qmp_socket is not None:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    return argv


_records = None


def records_module():
    """tests/guest/check_records.py as a module (check, make_record, ...)."""
    global _records
    if _records is None:
        spec = importlib.util.spec_from_file_location("check_records",
                                                      GUEST_SRC / "check_records.py")
        _records = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_records)
    return _records


def check_records(target):
    """tests/guest/check_records.check(target): the checker's report dict."""
    return records_module().check(str(target))


class QemuGuest:
    """One QEMU running the test guest; its console goes to console_log.
    Stopped by pid (SIGTERM, then SIGKILL); QEMU's own stderr goes to
    tmp/qemu-N.log."""

    def __init__(self, tmp, disk, name="guest", rate=50, extra_append="", qmp=False):
        self.tmp = Path(tmp)
        self.disk = disk
        self.name = name
        self.rate = rate
        self.extra_append = extra_append
        self.qmp = qmp
        self.proc = None
        self.runs = 0
        self.console_log = None
        self.qemu_log = None
        self.qmp_socket = None
        self.started_at = None
        self.boot_seconds = None

    def start(self):
        assert self.proc is None, "QEMU already running"
        art = guest_artifacts()
        self.runs += 1
        self.console_log = self.tmp / f"{self.name}-console-{self.runs}.log"
        self.qemu_log = self.tmp / f"{self.name}-qemu-{self.runs}.log"
        self.qmp_socket = self.tmp / f"{self.name}-qmp.sock" if self.qmp else None
        self.console_log.write_text("")
        argv = qemu_cmdline(art["kernel"], art["initrd"], self.disk, self.console_log,
                            qmp_socket=self.qmp_socket, extra_append=self.extra_append,
                            rate=self.rate)
        self.argv = argv
        self.boot_seconds = None
        log = open(self.qemu_log, "w")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp)
        log.close()
        return self

    def console(self):
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def _diag(self):
        try:
            q = self.qemu_log.read_text(errors="replace")
        except OSError:
            q = ""
        return (f"\nQEMU: {' '.join(self.argv)}\nQEMU output:\n{q[-3000:]}"
                f"\nconsole ({self.console_log}), last lines:\n{self.console()[-6000:]}")

    def wait_for(self, regex, timeout=BOOT_TIMEOUT, pred=None, what=None):
        """Waits until the console has a line matching regex (a compiled
        pattern, re.M) for which pred(match) holds; returns the last such
        match.  Fails on timeout, on QEMU exiting, and on a fatal line
        (ferry-guest: ERROR, kernel panic)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            hits = [m for m in regex.finditer(text) if pred is None or pred(m)]
            if hits:
                return hits[-1]
            bad = FATAL.search(text)
            if bad:
                pytest.fail(f"{self.name}: fatal console line: {bad.group(0)}{self._diag()}")
            if self.proc is None or self.proc.poll() is not None:
                rc = None if self.proc is None else self.proc.returncode
                pytest.fail(f"{self.name}: QEMU exited ({rc}) before "
                            f"{what or regex.pattern}{self._diag()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {what or regex.pattern} after {timeout}s{self._diag()}")
            time.sleep(0.05)

    def wait_writer_start(self, timeout=BOOT_TIMEOUT):
        """Waits for `ferry-writer: start boot B at seq N`; returns (B, N)
        and sets boot_seconds (QEMU start to that line)."""
        m = self.wait_for(WRITER_START, timeout, what="writer start line")
        if self.boot_seconds is None:
            self.boot_seconds = round(time.monotonic() - self.started_at, 2)
        return int(m.group(1)), int(m.group(2))

    def wait_progress(self, min_seq, timeout=30):
        """Waits for `ferry-writer: boot B seq N` with N >= min_seq; returns (B, N)."""
        m = self.wait_for(WRITER_PROGRESS, timeout, pred=lambda m: int(m.group(2)) >= min_seq,
                          what=f"writer progress to seq {min_seq}")
        return int(m.group(1)), int(m.group(2))

    def qmp_command(self, name, timeout=10, **arguments):
        """One QMP command on a fresh connection (start with qmp=True);
        returns its "return" value, fails the test on an "error"."""
        assert self.qmp_socket is not None, "QemuGuest started without qmp=True"
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.qmp_socket))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                    pytest.fail(f"{self.name}: no QMP socket {self.qmp_socket}{self._diag()}")
                time.sleep(0.05)
        s.settimeout(timeout)
        f = s.makefile("rwb")
        try:
            json.loads(f.readline())                     # greeting
            answers = []
            for cmd in ({"execute": "qmp_capabilities"},
                        {"execute": name, "arguments": arguments}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    msg = json.loads(f.readline())
                    if "return" in msg or "error" in msg:  # events are skipped
                        break
                if "error" in msg:
                    pytest.fail(f"{self.name}: QMP {cmd} -> {msg['error']}")
                answers.append(msg["return"])
            return answers[-1]
        finally:
            f.close()
            s.close()

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM to QEMU's pid (SIGKILL if it lingers), wait.  Like pulling
        the plug: the guest gets no shutdown; only what the disk acknowledged
        stays."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        return proc.returncode


class QemuGuestFactory:
    def __init__(self):
        self.guests = []

    def __call__(self, tmp, disk, **kw):
        g = QemuGuest(tmp, disk, **kw)
        self.guests.append(g)
        return g

    def teardown(self):
        for g in self.guests:
            g.stop()
