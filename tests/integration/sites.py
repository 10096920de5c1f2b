"""sites: two (or more) ferryd sites for migration tests.

    env = SiteEnv(ferryd_factory, wan_factory)
    a, b = env.site("onprem"), env.site("cloud")
    env.pair(a, b, wan=True)          # b's link reached through a ferry-wan proxy
    a.create("vda", "64M"); a.vm_create("vm1", ["vda"], "write=80,iops=300")
    mid = a.migrate("vm1", b)          # returns the migration id
    m = a.wait_migration(mid)          # until it ends; returns the document

Every site is a conftest Ferryd with its own data dir, API on 127.0.0.1:0, the
site link on 127.0.0.1:0 and NBD on a unix socket in its tmp dir.  VM
processes (ferry-simvm) outlive the ferryd that started them, as guests do;
SiteEnv.teardown() ends every one a site of this test started, by its pid
(found through the API, and in /proc by the control socket under the test's
own directories, for a VM whose ferryd is gone).
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import BUILD, run

FERRY_SIMVM = BUILD / "ferry-simvm"
TERMINAL = ("completed", "cancelled", "failed", "committed", "returned", "recovered")


class Site:
    def __init__(self, env, ferryd, name):
        self.env = env
        self.d = ferryd
        self.name = name

    # passthroughs
    def cli(self, *args, **kw):
        return self.d.cli(*args, **kw)

    def api(self, *args, **kw):
        return self.d.api(*args, **kw)

    def api_ok(self, *args, **kw):
        return self.d.api_ok(*args, **kw)

    @property
    def url(self):
        return self.d.api_url

    def link(self):
        return self.api_ok("GET", "/v1/site")["link"]

    def create(self, disk, size):
        return self.d.create(disk, size)

    def image(self, disk):
        return self.d.image_path(disk)

    def vm_create(self, name, disks, workload=None):
        args = ["vm", "create", name]
        for d in disks:
            args += ["--disk", d]
        if workload:
            args += ["--workload", workload]
        return self.cli(*args, json_out=True)

    def state_file(self, vm):
        return self.d.data_dir / "vms" / vm / "state.sim"

    def fill(self, vm, disks, percent):
        """Writes percent of each disk through the sim VM's own fill (gen 1), so
        the VM later starts from that state: a sparse-but-filled disk."""
        args = [FERRY_SIMVM, "fill", "--state", self.state_file(vm), "--create",
                "--percent", str(percent)]
        for d in disks:
            args += ["--disk", f"{d}={self.d.uri(d)}"]
        run(args, timeout=600)

    def vm(self, name):
        return self.api_ok("GET", f"/v1/vms/{name}")

    def vm_start(self, name):
        return self.cli("vm", "start", name, json_out=True)

    def verify(self, name):
        st, js = self.api("POST", f"/v1/vms/{name}/verify", timeout=600)
        assert st == 200, f"verify {name} at {self.name}: {st} {js}"
        return js

    def vm_writes(self, name):
        """Writes the running VM has had acknowledged (its own counter)."""
        rt = self.vm(name).get("runtime") or {}
        return rt.get("counters", {}).get("writes", 0)

    def wait_vm_io(self, name, writes=50, timeout=60):
        """Until the running VM has written at least `writes` times."""
        deadline = time.monotonic() + timeout
        while True:
            rt = self.vm(name).get("runtime") or {}
            if rt.get("counters", {}).get("writes", 0) >= writes:
                return rt
            assert time.monotonic() < deadline, f"VM {name} did not write: {rt}"
            time.sleep(0.1)

    def migrate(self, vm, dest, **opts):
        body = {"vm": vm, "to": dest.name}
        body.update(opts)
        st, js = self.api("POST", "/v1/migrations", body)
        assert st == 201, f"migrate: {st} {js}"
        return js["id"]

    def migration(self, mid):
        return self.api_ok("GET", f"/v1/migrations/{mid}")

    def wait_migration(self, mid, timeout=300, until=TERMINAL):
        deadline = time.monotonic() + timeout
        while True:
            st, m = self.api("GET", f"/v1/migrations/{mid}")
            if st == 200 and (m["state"] in until or (until is TERMINAL and m["state"] in TERMINAL)):
                return m
            assert time.monotonic() < deadline, (
                f"migration {mid} at {self.name} not {until} after {timeout}s: {m}\n"
                f"log tail:\n{self.d.log()[-3000:]}")
            time.sleep(0.2)

    def wait_progress(self, mid, pred, what, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            m = self.migration(mid)
            if pred(m):
                return m
            assert m["state"] not in TERMINAL, f"migration ended before {what}: {m}"
            assert time.monotonic() < deadline, f"no {what} after {timeout}s: {m['progress']}"
            time.sleep(0.1)

    def vm_pids(self):
        try:
            st, js = self.api("GET", "/v1/vms")
        except OSError:          # ferryd is gone (crashed): teardown finds its VMs in /proc
            return []
        if st != 200:
            return []
        return [v["pid"] for v in js["vms"] if v.get("pid")]


class SiteEnv:
    def __init__(self, ferryd_factory, wan_factory=None):
        self.ff = ferryd_factory
        self.wf = wan_factory
        self.sites = []
        self.wans = {}

    def site(self, name, extra_args=(), env=None):
        d = self.ff("unix", start=False, extra_args=extra_args)
        if env:
            d.env = env
        d.start()
        s = Site(self, d, name)
        s.cli("site", "init", "--name", name)
        self.sites.append(s)
        return s

    def wan_to(self, site, **kw):
        """A ferry-wan proxy in front of site's link."""
        w = self.wf(connect=site.link(), **kw)
        self.wans[site.name] = w
        return w

    def pair(self, a, b, wan=None):
        """Pairs a and b both ways; with wan (a WanProxy in front of b's link),
        a dials b through it."""
        args = ["site", "pair", b.url]
        if wan is not None:
            args += ["--link", wan.listen]
        a.cli(*args)

    def teardown(self):
        pids = set()
        for s in self.sites:
            if s.d.proc is not None:
                pids.update(s.vm_pids())
        roots = [str(s.d.tmp) for s in self.sites]
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith((b"ferry-simvm", b"qemu-system-x86_64")) and any(
                    r.encode() in arg for arg in cmd for r in roots):
                pids.add(int(pid))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def image_equal(p1, p2, chunk=1 << 20):
    """Byte-for-byte comparison of two image files; returns the first
    differing offset or None."""
    with open(p1, "rb") as f1, open(p2, "rb") as f2:
        off = 0
        while True:
            a, b = f1.read(chunk), f2.read(chunk)
            if a != b:
                for i in range(min(len(a), len(b))):
                    if a[i] != b[i]:
                        return off + i
                return off + min(len(a), len(b))
            if not a:
                return None
            off += len(a)
