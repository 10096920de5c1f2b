"""The qemu hypervisor driver against a real ferryd and real QEMU processes
(docs/qemu.md).  The guest is SeaBIOS looping on "no bootable device" (blank
disks): enough to start, pause, resume, stop and adopt a real QEMU.

  - the probe: QEMU's version, machines and CPU models as QEMU lists them,
    KVM's verdict (on a host whose KVM cannot run guests: TCG, and why);
  - networks: add, list, show, rm (refused while a VM's NIC uses it);
  - a qemu VM: create with memory, NICs, a MAC generated and stored; start
    (accel tcg and the TCG warning when KVM is unusable), the QEMU command
    line, pause/resume as QEMU reports them, verify refused with 501, kill -9
    of ferryd and restart (the VM is adopted, same pid), stop falling back
    from the guest powerdown to QMP quit after --qemu-stop-timeout;
  - bad options: usage errors (exit 2) before anything is sent, API 400s
    with the reason, a QEMU that exits at start.
Every QEMU a test starts is killed at teardown (by the pid in its pidfile,
after checking it is that VM's QEMU).
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import need

STOP_TIMEOUT_ARGS = ["--qemu-stop-timeout", "1s"]


@pytest.fixture(autouse=True)
def _need_qemu():
    need("qemu-system-x86_64")


def qemu_pids(d):
    """pid -> VM name of every live QEMU under d's data dir (pidfiles)."""
    out = {}
    for pf in (d.data_dir / "vms").glob("*/qemu.pid"):
        try:
            pid = int(pf.read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(d.data_dir / "run").encode() in cmd:
            out[pid] = pf.parent.name
    return out


@pytest.fixture
def qemu_site(ferryd_factory):
    """A ferryd with a short powerdown timeout; its QEMUs are killed after."""
    sites = []

    def make(extra=()):
        d = ferryd_factory("unix", extra_args=STOP_TIMEOUT_ARGS + list(extra))
        sites.append(d)
        return d
    yield make
    for d in sites:
        for pid in qemu_pids(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def alive(pid):
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def test_probe_and_networks(qemu_site):
    d = qemu_site()
    p = d.api_ok("GET", "/v1/hypervisors/qemu")
    assert p["driver"] == "qemu" and p["present"] is True, p
    assert p["version"].count(".") == 2 and int(p["version"].split(".")[0]) >= 6, p
    assert p["program"].endswith("qemu-system-x86_64")
    assert "q35" in p["machines"] and "pc" in p["machines"] and "none" in p["machines"]
    assert "qemu64" in p["cpu_models"]
    assert set(p["kvm"]) == {"present", "usable", "why"} and p["kvm"]["why"], p
    assert p["accel"] == ("kvm" if p["kvm"]["usable"] else "tcg")
    assert p["mem_available"] > 64 * 1024 * 1024
    if os.path.exists("/dev/kvm"):
        assert p["kvm"]["present"] is True
    # Cached: the same answer without a new QEMU; refresh probes again.
    assert d.api_ok("GET", "/v1/hypervisors/qemu") == p
    r = d.api_ok("GET", "/v1/hypervisors/qemu?refresh=true")
    assert r["version"] == p["version"] and r["kvm"]["usable"] == p["kvm"]["usable"]
    sim = d.api_ok("GET", "/v1/hypervisors/sim")
    assert sim["driver"] == "sim" and sim["present"] is True, sim
    lst = d.api_ok("GET", "/v1/hypervisors")["hypervisors"]
    assert [h["driver"] for h in lst] == ["sim", "qemu"]
    assert d.api("GET", "/v1/hypervisors/xen")[0] == 404
    assert d.api("GET", "/v1/hypervisors/qemu?fresh=1")[0] == 400
    text = d.cli("hypervisor", "show", "qemu").stdout
    assert f"QEMU {p['version']}" in text and "accel:" in text and "q35" in text, text
    assert "kvm:" in text and r["kvm"]["why"] in text, text
    assert "sim" in d.cli("hypervisor", "list").stdout
    assert d.cli("hypervisor", "show", "xen", check=False).returncode == 2
    assert "--refresh" in d.cli("hypervisor", "show", "--help").stdout

    # Networks.
    assert d.cli("network", "list").stdout.strip() == "no networks"
    n = d.cli("network", "add", "lan", "--type", "user", json_out=True)
    assert n["name"] == "lan" and n["type"] == "user" and n["bridge"] is None and n["used_by"] == []
    n = d.cli("network", "add", "br", "--type", "bridge", "--bridge", "br0", json_out=True)
    assert n["bridge"] == "br0"
    nets = d.cli("network", "list", json_out=True)["networks"]
    assert [x["name"] for x in nets] == ["br", "lan"]
    assert "br0" in d.cli("network", "list").stdout
    assert "bridge br0" in d.cli("network", "show", "br").stdout
    for args in (["network", "add", "x"], ["network", "add", "x", "--type", "tap"],
                 ["network", "add", "x", "--type", "bridge"],
                 ["network", "add", "x", "--type", "user", "--bridge", "br0"],
                 ["network", "add", "-x", "--type", "user"], ["network", "frob"]):
        assert d.cli(*args, check=False).returncode == 2, args
    for body, want in [({"name": "x", "type": "tap"}, "unknown network type"),
                       ({"name": "x", "type": "bridge"}, "needs its bridge"),
                       ({"name": "x", "type": "bridge", "bridge": "br0,x=1"}, "bad bridge name"),
                       ({"name": "x", "type": "bridge", "bridge": "a" * 16}, "bad bridge name"),
                       ({"name": "x", "type": "user", "bridge": "br0"}, "no bridge"),
                       ({"name": "x", "type": "user", "mtu": 9000}, "unknown field")]:
        st, js = d.api("POST", "/v1/networks", body)
        assert st == 400 and want in js["error"]["message"], (body, st, js)
    st, js = d.api("POST", "/v1/networks", {"name": "lan", "type": "user"})
    assert st == 409 and js["error"]["code"] == "already_exists", js
    assert d.api("GET", "/v1/networks/nope")[0] == 404
    assert d.api("DELETE", "/v1/networks/nope")[0] == 404
    assert d.cli("network", "rm", "br").stdout.strip() == "network br removed"
    # Networks persist.
    d.restart()
    assert [x["name"] for x in d.api_ok("GET", "/v1/networks")["networks"]] == ["lan"]


def test_qemu_vm_lifecycle(qemu_site):
    d = qemu_site()
    d.create("vda", "64M")
    d.create("vdb", "16M")
    d.cli("network", "add", "lan", "--type", "user")
    vm = d.cli("vm", "create", "g1", "--driver", "qemu", "--disk", "vda", "--disk", "vdb",
               "--memory", "128M", "--cpus", "2", "--nic", "network=lan",
               "--nic", "network=lan,model=e1000,mac=02:AA:bb:cc:dd:01", json_out=True)
    assert vm["driver"] == "qemu" and vm["state"] == "stopped" and vm["workload"] == "", vm
    c = vm["config"]
    assert c["memory"] == 128 * 1024 * 1024 and c["cpus"] == 2 and c["machine"] == "q35", c
    assert c["cpu_model"] == "" and c["kernel"] == "" and c["initrd"] == "" and c["append"] == ""
    mac0 = c["nics"][0]["mac"]
    assert mac0.startswith("52:54:00:") and len(mac0) == 17, vm
    assert c["nics"][0]["model"] == "virtio-net-pci"
    assert c["nics"][1] == {"network": "lan", "model": "e1000", "mac": "02:aa:bb:cc:dd:01"}
    text = d.cli("vm", "show", "g1").stdout
    assert "128 MiB, 2 CPUs, machine q35" in text and mac0 in text and "boot:" in text, text
    assert "used_by" in d.api_ok("GET", "/v1/networks/lan") and \
        d.api_ok("GET", "/v1/networks/lan")["used_by"] == ["g1"]
    st, js = d.api("DELETE", "/v1/networks/lan")
    assert st == 409 and "used by VM 'g1'" in js["error"]["message"], js

    probe = d.api_ok("GET", "/v1/hypervisors/qemu")
    kvm_ok = probe["kvm"]["usable"]
    t0 = time.monotonic()
    vm = d.cli("vm", "start", "g1", json_out=True)
    assert time.monotonic() - t0 < 20
    assert vm["state"] == "running" and vm["pid"] > 0, vm
    pid = vm["pid"]
    rt = vm["runtime"]
    assert rt["state"] == "running" and rt["qemu_status"] == "running", rt
    assert rt["accel"] == ("kvm" if kvm_ok else "tcg") and rt["machine"] == "q35", rt
    assert rt["cpu_model"] == ("host" if kvm_ok else "qemu64") and rt["qemu_version"] == probe["version"]
    if not kvm_ok:
        assert "KVM unusable (" in d.log() and "using TCG, expect slow guests" in d.log()
    args = cmdline(pid)
    for a in (b"-nodefaults", b"-no-user-config", b"-pidfile", b"-blockdev"):
        assert a in args, args
    assert (b"q35,accel=tcg" if not kvm_ok else b"q35,accel=kvm") in args
    assert b"128M" in args and b"2" in args
    assert f"unix:{d.data_dir}/run/g1.qmp,server=on,wait=off".encode() in args
    assert b"user,id=net0" in args and b"user,id=net1" in args
    assert f"virtio-net-pci,netdev=net0,mac={mac0},id=nic0".encode() in args
    assert b"e1000,netdev=net1,mac=02:aa:bb:cc:dd:01,id=nic1" in args
    bd = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == b"-blockdev"]
    assert [b["file"]["export"] for b in bd] == ["vda", "vdb"]
    assert bd[0]["file"]["server"] == {"type": "unix", "path": str(d.sock)}
    assert (d.data_dir / "vms" / "g1" / "console.log").exists()
    assert int((d.data_dir / "vms" / "g1" / "qemu.pid").read_text()) == pid
    wait_for(lambda: d.disk("vda")["clients"] == 1 and d.disk("vdb")["clients"] == 1, 10,
             "QEMU's NBD connections")

    vm = d.cli("vm", "pause", "g1", json_out=True)
    assert vm["state"] == "paused" and vm["runtime"]["qemu_status"] == "paused", vm
    assert "QEMU paused" in d.cli("vm", "show", "g1").stdout
    vm = d.cli("vm", "resume", "g1", json_out=True)
    assert vm["state"] == "running" and vm["runtime"]["qemu_status"] == "running", vm
    st, js = d.api("POST", "/v1/vms/g1/verify")
    assert st == 501 and js["error"]["code"] == "not_supported", (st, js)
    assert "guest's own check" in js["error"]["message"]
    p = d.cli("vm", "verify", "g1", check=False)
    assert p.returncode == 1 and "not_supported" in p.stderr, p.stderr
    st, js = d.api("PUT", "/v1/vms/g1/workload", {"workload": "write=50"})
    assert st == 400 and "no workload" in js["error"]["message"], js
    assert d.api("POST", "/v1/vms/g1/start")[0] == 409
    assert d.api_ok("GET", "/v1/vms")["vms"][0]["pid"] == pid

    # ferryd killed: QEMU runs on; the next ferryd adopts it over QMP.
    d.kill9()
    assert alive(pid)
    d.start()
    assert "VM 'g1' adopted (pid %d, running)" % pid in d.log(), d.log()[-3000:]
    vm = d.api_ok("GET", "/v1/vms/g1")
    assert vm["state"] == "running" and vm["pid"] == pid and vm["runtime"]["qemu_status"] == "running"
    assert vm["config"] == c                                  # persisted
    # (QEMU's NBD client reconnects at the guest's next IO: SeaBIOS does none.)
    vm = d.cli("vm", "pause", "g1", json_out=True)
    assert vm["runtime"]["qemu_status"] == "paused"

    # Stop: SeaBIOS ignores the power button; after 1 s QEMU is told to quit.
    t0 = time.monotonic()
    vm = d.cli("vm", "stop", "g1", json_out=True)
    took = time.monotonic() - t0
    assert vm["state"] == "stopped" and vm["pid"] == 0, vm
    assert 1.0 <= took < 15, took
    assert "the guest did not power down within 1000 ms; quitting QEMU" in d.log()
    wait_for(lambda: not alive(pid), 10, "QEMU to exit")
    assert "runtime" not in d.api_ok("GET", "/v1/vms/g1")

    # Started paused by nobody: start again, then rm --force ends it.
    vm = d.cli("vm", "start", "g1", json_out=True)
    pid2 = vm["pid"]
    assert pid2 != pid and vm["state"] == "running"
    assert d.api("DELETE", "/v1/vms/g1")[0] == 409
    d.cli("vm", "rm", "g1", "--force")
    wait_for(lambda: not alive(pid2), 15, "QEMU to exit after rm --force")
    assert not (d.data_dir / "vms" / "g1").exists()
    assert d.cli("network", "rm", "lan").returncode == 0


def test_bad_options(qemu_site, ferryd_factory):
    d = qemu_site()
    d.create("vda", "16M")
    d.cli("network", "add", "lan", "--type", "user")
    base = ["vm", "create", "x", "--driver", "qemu", "--disk", "vda"]
    usage = [
        (["--memory", "8M"], "at least 16M"), (["--memory", "lots"], "bad --memory"),
        (["--memory", "1000000000"], "whole MiB"), (["--cpus", "0"], "--cpus"),
        (["--cpus", "300"], "--cpus"), (["--nic", "bogus=1"], "unknown key"),
        (["--nic", "network=lan,mac=zz"], "bad MAC"), (["--nic", "model=e1000"], "missing network"),
        (["--nic", "network=l@n"], "invalid name"), (["--initrd", "/x"], "needs --kernel"),
        (["--append", "quiet"], "needs --kernel"), (["--workload", "write=5"], "sim only"),
    ]
    for extra, want in usage:
        p = d.cli(*base, *extra, check=False)
        assert p.returncode == 2 and want in p.stderr, (extra, p.stderr)
    p = d.cli("vm", "create", "x", "--disk", "vda", "--memory", "1G", check=False)
    assert p.returncode == 2 and "--memory applies to --driver qemu only" in p.stderr
    p = d.cli("vm", "create", "x", "--disk", "vda", "--driver", "xen", check=False)
    assert p.returncode == 2 and "unknown driver" in p.stderr
    help_text = d.cli("vm", "create", "--help").stdout
    for opt in ("--memory", "--cpus", "--machine", "--cpu-model", "--nic", "--kernel",
                "--initrd", "--append", "qemu"):
        assert opt in help_text, opt

    q = {"name": "x", "driver": "qemu", "disks": ["vda"]}
    bad = [
        ({**q, "nics": [{"network": "nope"}]}, 400, "network 'nope' does not exist"),
        ({**q, "kernel": "/nonexistent/vmlinuz"}, 400, "not a readable file"),
        ({**q, "kernel": "relative/vmlinuz"}, 400, "absolute path"),
        ({**q, "memory": "8M"}, 400, "16M to 16T"),
        ({**q, "machine": "q35,accel=kvm"}, 400, "bad machine type"),
        ({**q, "cpu_model": "qemu64 -smp 9"}, 400, "bad CPU model"),
        ({**q, "workload": "write=1"}, 400, "sim VMs only"),
        ({**q, "disks": ["nope"]}, 400, "disk 'nope' does not exist"),
        ({**q, "frobs": 1}, 400, "unknown field"),
        ({"name": "x", "disks": ["vda"], "cpus": 2}, 400, "qemu VMs only"),
    ]
    for body, status, want in bad:
        st, js = d.api("POST", "/v1/vms", body)
        assert st == status and want in js["error"]["message"], (body, st, js)
    assert d.api_ok("GET", "/v1/vms")["vms"] == []

    # A machine type QEMU does not have: start fails with QEMU's own words.
    d.cli("vm", "create", "bad", "--driver", "qemu", "--disk", "vda", "--memory", "64M",
          "--machine", "nosuch")
    st, js = d.api("POST", "/v1/vms/bad/start")
    assert st == 500 and "exited at start" in js["error"]["message"], js
    assert "unsupported machine type" in js["error"]["message"], js
    assert d.api_ok("GET", "/v1/vms/bad")["state"] == "stopped"
    probe = d.api_ok("GET", "/v1/hypervisors/qemu")
    if not probe["kvm"]["usable"]:
        d.create("vdh", "16M")
        d.cli("vm", "create", "host", "--driver", "qemu", "--disk", "vdh", "--cpu-model", "host")
        st, js = d.api("POST", "/v1/vms/host/start")
        assert st == 400 and "needs KVM" in js["error"]["message"], js
    assert qemu_pids(d) == {}

    # ferryd's own options.
    e = ferryd_factory("unix", start=False)
    for args in (["--qemu-stop-timeout", "soon"], ["--qemu-stop-timeout", "0"],
                 ["--qemu-stop-timeout", "2h"], ["--qemu", ""]):
        from conftest import FERRYD, run
        p = run([FERRYD, "--data-dir", e.data_dir, *args], check=False, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
    # A QEMU that is not there: the probe says so, start says what to do.
    f = qemu_site(["--qemu", "/nonexistent/qemu-system-x86_64"])
    p = f.api_ok("GET", "/v1/hypervisors/qemu")
    assert p["present"] is False and "not found" in p["why"], p
    f.create("vda", "16M")
    f.cli("vm", "create", "y", "--driver", "qemu", "--disk", "vda")
    st, js = f.api("POST", "/v1/vms/y/start")
    assert st == 500 and "ferryd --qemu PATH" in js["error"]["message"], js
