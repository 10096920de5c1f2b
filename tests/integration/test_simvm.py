"""ferry-simvm against a real ferryd: the simulated VM is the proof that a
migration lost no acknowledged write, so these tests show that its verify
passes when nothing was lost and catches each way data can go wrong:

  - a write-heavy run verifies ok (inside the VM, and offline from the state
    file), also after a restart from the saved state and with 64 KiB IOs;
  - blocks damaged behind ferryd's back are `foreign` / `misplaced`, and the
    running VM's own reads count them as read_errors and go on;
  - an acknowledged write undone (old image put back) is `lost`;
  - ferryd killed with -9 under load (and restarted cleanly): the VM stalls,
    reconnects, re-sends, keeps going, and verifies ok;
  - NBD error replies (a fenced disk: EPERM) make blocks uncertain, count as
    write_errors / read_io_errors, and the VM goes on;
  - pause drains: after its reply ferryd sees no more writes;
  - the state file moved to another ferryd's copy of the disk verifies ok
    there (the migration primitive);
  - corrupt, truncated or mismatched state files are refused;
  - bad workload specs and bad control requests are refused and the VM goes on.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import MiB, need, run
from simvm import (BLOCK, SIMVM, SimVMFactory, fill, offline_verify, parse_block,
                   scan_image, simvm)


@pytest.fixture
def simvms(ferryd_factory):
    """Depends on ferryd_factory so that VMs are stopped before ferryd is."""
    f = SimVMFactory()
    yield f
    f.teardown()


def ferry_writes(d, disk):
    """ferryd's own count of writes to a disk."""
    return d.cli("disk", "show", disk, json_out=True)["stats"]["ops"]["write"]


def assert_clean(report):
    bad = {k: report[k] for k in ("lost", "newer", "misplaced", "foreign", "unexpected",
                                  "read_io_errors")}
    assert report["ok"] is True and not any(bad.values()), report
    assert report["checked"] == report["good"], report


def test_write_heavy_run_verifies(ferryd, simvms):
    d = ferryd
    d.create("vda", "32M")
    d.create("vdb", "8M")
    disks = {"vda": d.uri("vda"), "vdb": d.uri("vdb")}
    vm = simvms(d.tmp, disks, workload="write=90,iops=0,qd=8,zipf=0.5", name="vm-one").start()
    st = vm.wait_writes(3000)
    assert st["state"] == "running" and st["name"] == "vm-one"
    assert [x["name"] for x in st["disks"]] == ["vda", "vdb"]
    assert st["disks"][0]["size"] == 32 * MiB and st["disks"][1]["blocks"] == 2048
    assert st["workload"] == "write=90,bs=4k,iops=0,zipf=0.5,qd=8,disks=all"
    c = st["counters"]
    assert c["read_errors"] == c["write_errors"] == c["read_io_errors"] == 0, c
    assert st["write_iops"] > 0 and st["write_latency_us"]["p99"] > 0, st

    rep = vm.verify()
    assert_clean(rep)
    assert rep["written_blocks"] > 1000 and rep["blocks"] == (32 + 8) * MiB // BLOCK, rep
    assert all(x["written_blocks"] > 0 for x in rep["disks"]), rep
    # verify resumed the VM.
    assert vm.status()["state"] == "running"
    vm.wait_writes(200)

    # Multi-block IOs: 64 KiB writes and reads.
    r = vm.set_workload("write=60,bs=64k,iops=0,qd=4,zipf=0")
    assert r["workload"] == "write=60,bs=64k,iops=0,zipf=0,qd=4,disks=all"
    vm.wait_writes(300)
    assert_clean(vm.verify())

    vm.stop()
    rc, rep, err = offline_verify(vm.state, disks)
    assert rc == 0, err
    assert_clean(rep)
    assert rep["written_blocks"] > 1000

    # Restarted from the state file: same VM, counters carried on, still ok.
    vm.create = False
    vm.paused = True
    vm.workload = None
    vm.start()
    st2 = vm.status()
    assert st2["state"] == "paused" and st2["vm_id"] == st["vm_id"]
    assert st2["counters"]["writes"] >= c["writes"]
    assert st2["workload"] == "write=60,bs=64k,iops=0,zipf=0,qd=4,disks=all"
    assert_clean(vm.verify())
    assert vm.status()["state"] == "paused"   # verify does not resume a paused VM
    vm.terminate(signal.SIGTERM)               # SIGTERM: as stop, exit 0
    assert "stopped: state saved" in vm.log()


def test_damaged_blocks_are_foreign_or_misplaced(ferryd, simvms):
    d = ferryd
    d.create("vda", "16M")
    disks = {"vda": d.uri("vda")}
    vm = simvms(d.tmp, disks, workload="write=100,iops=0,qd=8,zipf=0").start()
    vm.wait_writes(2000)
    vm.pause()
    vm_id = int(vm.status()["vm_id"], 16)
    img = d.image_path("vda")
    blocks = scan_image(img, vm_id)
    assert len(blocks) >= 3, "the VM's blocks are not in the image"
    (a, _), (b, _), (c, hc) = blocks[0], blocks[len(blocks) // 2], blocks[-1]
    fd = os.open(img, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xde\xad\xbe\xef" * 4, a + 100)          # damage inside a block
        block_b = os.pread(fd, BLOCK, b)
        os.pwrite(fd, block_b, c)                               # b's block written at c
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(img, "rb") as f:
        f.seek(c)
        assert parse_block(f.read(BLOCK))["offset"] == b

    rep = vm.verify()
    assert rep["ok"] is False, rep
    assert rep["foreign"] == 1 and rep["misplaced"] == 1, rep
    assert rep["lost"] == rep["newer"] == rep["unexpected"] == 0, rep
    kinds = {(p["offset"], p["kind"]) for p in rep["problems"]}
    assert (a, "foreign") in kinds and (c, "misplaced") in kinds, rep["problems"]
    pa = next(p for p in rep["problems"] if p["offset"] == a)
    assert "checksum" in pa["detail"], pa
    pc = next(p for p in rep["problems"] if p["offset"] == c)
    assert str(b) in pc["detail"] and pc["expected_generation"] == hc["generation"], pc

    rc, orep, _ = offline_verify(vm.state, disks)
    assert rc == 1 and orep["foreign"] == 1 and orep["misplaced"] == 1, orep

    # The running VM's own reads see the damage, count it, log it, go on.
    vm.set_workload("write=0,iops=0,qd=8,zipf=0")
    vm.resume()
    st = vm.wait_for(lambda s: s["counters"]["read_errors"] >= 1, 30, "a read error")
    assert st["state"] == "running"
    vm.wait_for(lambda s: s["counters"]["reads"] >= st["counters"]["reads"] + 500, 30, "more reads")
    assert "read check failed at offset" in vm.log()
    vm.stop()


def test_lost_acknowledged_write_is_detected(ferryd, simvms):
    d = ferryd
    d.create("vda", "4M")
    disks = {"vda": d.uri("vda")}
    vm = simvms(d.tmp, disks, workload="write=100,iops=0,qd=8,zipf=0").start()
    vm.wait_writes(2000)
    vm.pause()
    img = d.image_path("vda")
    old = d.tmp / "vda.old"
    shutil.copyfile(img, old)
    vm.resume()
    vm.wait_writes(3000)           # 1024 blocks: most of them overwritten since the copy
    vm.pause()
    d.stop()
    shutil.copyfile(old, img)      # the acknowledged writes since the copy are gone
    d.start()
    rep = vm.verify()
    assert rep["ok"] is False and rep["lost"] > 0, rep
    assert rep["problems"][0]["kind"] in ("lost", "foreign"), rep
    lost = [p for p in rep["problems"] if p["kind"] == "lost"]
    assert lost and all(p["found_generation"] < p["expected_generation"] for p in lost), rep
    vm.stop()


def test_ferryd_kill9_and_restart_reconnect(ferryd, simvms):
    d = ferryd
    d.create("vda", "32M")
    disks = {"vda": d.uri("vda")}
    vm = simvms(d.tmp, disks, workload="write=70,iops=1500,qd=8").start()
    vm.wait_writes(500)
    d.kill9()
    st = vm.wait_for(lambda s: s["counters"]["io_stalled"], 10, "io_stalled")
    assert st["state"] == "running" and st["disks"][0]["connected"] is False
    time.sleep(0.5)
    d.start()
    st = vm.wait_for(lambda s: s["counters"]["reconnects"] >= 1 and not s["counters"]["io_stalled"],
                     30, "reconnect")
    vm.wait_writes(500)
    assert "reconnected after" in vm.log() and "will be re-sent" in vm.log()
    # A clean restart (SIGTERM: ferryd answers what is in flight, then closes).
    n = st["counters"]["reconnects"]
    d.restart()
    vm.wait_for(lambda s: s["counters"]["reconnects"] > n and not s["counters"]["io_stalled"],
                30, "reconnect after a clean restart")
    vm.wait_writes(300)
    rep = vm.verify()
    assert_clean(rep)
    assert rep["written_blocks"] > 0
    st = vm.status()
    assert st["counters"]["write_errors"] == 0 and st["counters"]["read_errors"] == 0, st
    vm.stop()


def test_nbd_error_replies(tmp_path, simvms):
    """nbdkit's error filter fails every write (EPERM, as a fenced disk) while
    a file exists, and every read while another does."""
    need("nbdkit")
    sock, fence, readfail = tmp_path / "k.sock", tmp_path / "fence", tmp_path / "readfail"
    log = open(tmp_path / "nbdkit.log", "w")
    kit = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--filter=error", "memory", "size=8M",
                            "error=EPERM", "error-pwrite-rate=1", f"error-pwrite-file={fence}",
                            "error-pread-rate=1", f"error-pread-file={readfail}"],
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert kit.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        vm = simvms(tmp_path, {"vda": f"nbd+unix:///?socket={sock}"},
                    workload="write=50,iops=0,qd=4,zipf=0").start()
        vm.wait_writes(500)
        fence.touch()
        st = vm.wait_for(lambda s: s["counters"]["write_errors"] >= 20, 20, "write errors")
        assert st["state"] == "running" and st["counters"]["read_errors"] == 0
        assert "marked uncertain" in vm.log()
        rep = vm.verify()           # uncertain blocks are skipped, not problems
        assert_clean(rep)
        assert rep["uncertain"] > 0 and rep["checked"] > 0, rep
        readfail.touch()
        vm.wait_for(lambda s: s["counters"]["read_io_errors"] >= 20, 20, "read IO errors")
        readfail.unlink()
        fence.unlink()              # unfenced: writes succeed again
        n = vm.counters()["write_errors"]
        vm.wait_writes(1000)
        st = vm.status()
        assert st["counters"]["write_errors"] - n < 10, st
        rep = vm.verify()
        assert_clean(rep)
        vm.stop()
    finally:
        kit.terminate()
        kit.wait(timeout=30)


def test_pause_drains(ferryd, simvms):
    d = ferryd
    d.create("vda", "32M")
    vm = simvms(d.tmp, {"vda": d.uri("vda")}, workload="write=100,iops=0,qd=16").start()
    vm.wait_writes(2000)
    r = vm.pause(timeout_ms=30000)
    assert r["state"] == "paused", r
    w1 = ferry_writes(d, "vda")
    st1 = vm.status()
    assert st1["counters"]["inflight"] == 0 and st1["state"] == "paused"
    time.sleep(1.0)
    assert ferry_writes(d, "vda") == w1, "writes reached ferryd after the pause reply"
    assert vm.status()["counters"]["writes"] == st1["counters"]["writes"]
    assert st1["counters"]["writes"] <= w1
    vm.resume()
    vm.wait_writes(100)
    assert ferry_writes(d, "vda") > w1
    vm.stop()


def test_state_moves_to_another_site(ferryd, ferryd_factory, simvms):
    a = ferryd
    b = ferryd_factory()
    a.create("vda", "16M")
    vm1 = simvms(a.tmp, {"vda": a.uri("vda")}, tag="src", workload="write=80,iops=0,qd=8").start()
    vm1.wait_writes(3000)
    vm1.pause()                                    # drained and saved: the "RAM" to move
    st1 = vm1.status()
    copy = b.tmp / "vda-copy.img"
    shutil.copyfile(a.image_path("vda"), copy)     # the disk, replicated
    b.cli("disk", "add", "vda", "--image", copy)
    state2 = b.tmp / "moved.state"
    shutil.copyfile(vm1.state, state2)             # the state, moved
    vm2 = simvms(b.tmp, {"vda": b.uri("vda")}, tag="dst", state=state2, create=False).start()
    st2 = vm2.status()
    assert st2["vm_id"] == st1["vm_id"] and st2["state"] == "running"
    assert st2["counters"]["writes"] >= st1["counters"]["writes"]
    assert st2["workload"] == st1["workload"]
    rep = vm2.verify()
    assert_clean(rep)
    assert rep["written_blocks"] >= st1["disks"][0]["written_blocks"] > 1000, (rep, st1)
    vm2.wait_writes(1000)
    assert_clean(vm2.verify())
    vm2.stop()
    vm1.stop()


def test_corrupt_or_mismatched_state_is_refused(ferryd, simvms):
    d = ferryd
    d.create("vda", "8M")
    d.create("small", "4M")
    disks = {"vda": d.uri("vda")}
    state = d.tmp / "fill.state"
    fill(state, disks, percent=50, create=True)
    rc, rep, err = offline_verify(state, disks)
    assert rc == 0, err
    assert_clean(rep)
    assert rep["written_blocks"] == rep["checked"] == 1024, rep
    good = state.read_bytes()

    def refused(data, want, disks_=disks, tag="bad"):
        p = d.tmp / f"{tag}.state"
        if data is not None:
            p.write_bytes(data)
        vm = simvms(d.tmp, disks_, tag=tag, state=p, create=False)
        rc, log = vm.run_expecting_failure()
        assert rc == 1 and want in log, (want, log[-2000:])
        assert not vm.control.exists()
        rc, _, err = offline_verify(p, disks_)
        assert rc == 1 and want in err, (want, err)
        return log

    flip = bytearray(good)
    flip[20] ^= 1                                  # in the vm_id
    refused(bytes(flip), "header checksum mismatch", tag="hdr")
    flip = bytearray(good)
    flip[len(good) - 10] ^= 0x80                   # in the table
    refused(bytes(flip), "table checksum mismatch", tag="tbl")
    refused(good[:len(good) - 1], "truncated", tag="trunc")
    refused(good + b"\0", "trailing bytes", tag="long")
    refused(b"not a state file at all" * 200, "bad magic", tag="magic")
    refused(None, "does not exist", tag="absent")
    refused(good, "not the disk this VM wrote", disks_={"vda": d.uri("small")}, tag="size")
    refused(good, "which no --disk names", disks_={"vdx": d.uri("vda")}, tag="name")
    refused(good, "has 1 disks, --disk gives 2",
            disks_={"vda": d.uri("vda"), "small": d.uri("small")}, tag="count")

    # The good file still runs, and its filled half verifies in the VM too.
    vm = simvms(d.tmp, disks, tag="good", state=state, create=False, paused=True).start()
    assert_clean(vm.verify())
    vm.stop()


def test_bad_input_is_refused_and_the_vm_goes_on(ferryd, simvms):
    d = ferryd
    d.create("vda", "8M")
    disks = {"vda": d.uri("vda")}
    for spec, want in [("write=101", "write"), ("bs=6k", "bs"), ("qd=0", "qd"),
                       ("iops=10,rate=1M", "alternatives"), ("zipf=abc", "zipf"),
                       ("foo=1", "unknown key"), ("write=50,", "trailing comma"),
                       ("disks=nosuch", "no disk 'nosuch'")]:
        vm = simvms(d.tmp, disks, tag="badwl", workload=spec)
        rc, log = vm.run_expecting_failure()
        assert rc in (1, 2) and want in log, (spec, rc, log[-1000:])
    p = simvm("run", "--state", d.tmp / "x.state", "--disk", "vda", check=False)
    assert p.returncode == 2 and "NAME=NBD_URI" in p.stderr
    p = simvm("run", "--state", d.tmp / "x.state", *["--disk", f"vda={d.uri('vda')}"],
              check=False)
    assert p.returncode == 2 and "--control" in p.stderr
    p = simvm("frobnicate", check=False)
    assert p.returncode == 2

    vm = simvms(d.tmp, disks, workload="write=50,iops=800,qd=4").start()
    vm.wait_writes(100)
    for spec in ["qd=999", "bs=3k", "disks=nosuch", "write=50 ,qd=2", "bs=1M,qd=128"]:
        r = vm.set_workload(spec, check=False)
        assert r["ok"] is False and "workload" in r["error"], (spec, r)
    # Requests that are not requests.
    cases = [
        (b"hello\n", "invalid JSON"),
        (b"{\n", "invalid JSON"),
        (b"[1,2]\n", "JSON object"),
        (b'{"cmd":5}\n', 'no "cmd"'),
        (b'{"cmd":"reboot"}\n', "unknown command"),
        (b'{"cmd":"status","extra":1}\n', "unknown field"),
        (b'{"cmd":"pause","timeout_ms":"soon"}\n', "timeout_ms"),
        (b'{"cmd":"pause","timeout_ms":-1}\n', "timeout_ms"),
        (b'{"cmd":"set_workload"}\n', "needs"),
        (b'{"cmd":"set_workload","workload":7}\n', "needs"),
        (b'{"cmd":"status","cmd":"stop"}\n', "invalid JSON"),
        (b'\x00\xff\xfe garbage\n', "invalid JSON"),
        (b'{"cmd":"status"} trailing\n', "invalid JSON"),
    ]
    for data, want in cases:
        replies = vm.raw(data)
        assert len(replies) == 1 and replies[0]["ok"] is False, (data, replies)
        assert want in replies[0]["error"], (data, replies)
    # Several requests on one connection, with ids echoed; blank lines ignored.
    replies = vm.raw(b'{"cmd":"status","id":1}\n\n{"cmd":"bogus","id":"two"}\r\n'
                     b'{"cmd":"status","id":[3]}\n')
    assert [r.get("id") for r in replies] == [1, "two", [3]]
    assert [r["ok"] for r in replies] == [True, False, True]
    # An endless line: an error, then the connection is closed.
    replies = vm.raw(b"x" * 70000)
    assert len(replies) == 1 and "longer than" in replies[0]["error"], replies
    # More clients than allowed: the extra ones are told and closed.
    socks = [vm.connect() for _ in range(20)]
    time.sleep(0.3)
    told = 0
    for s in socks:
        s.settimeout(0.2)
        try:
            data = s.recv(4096)
            told += b"too many" in data
        except socket.timeout:
            pass
    for s in socks:
        s.close()
    assert told >= 1, "no client was refused"
    time.sleep(0.2)
    # The `ctl` command line.
    p = simvm("ctl", vm.control, "status")
    assert json.loads(p.stdout)["ok"] is True
    p = simvm("ctl", vm.control, "reboot", check=False)
    assert p.returncode == 1 and json.loads(p.stdout)["ok"] is False
    p = simvm("ctl", vm.control, "set_workload", '{"workload":"qd=0"}', check=False)
    assert p.returncode == 1 and "qd" in json.loads(p.stdout)["error"]
    p = simvm("ctl", vm.control, "status", "not json", check=False)
    assert p.returncode == 2
    # After all that the VM is running, unharmed.
    st = vm.wait_writes(100)
    assert st["state"] == "running" and st["counters"]["read_errors"] == 0
    assert st["workload"] == "write=50,bs=4k,iops=800,zipf=0.9,qd=4,disks=all"

    # A second VM on a live control socket is refused; a stale one is replaced.
    other = simvms(d.tmp, disks, tag="other", control=vm.control)
    rc, log = other.run_expecting_failure()
    assert rc == 1 and "another process is listening" in log
    vm.pause()                                     # saved: the table matches the disk
    vm.kill9()
    assert vm.control.exists()                     # stale socket left by kill -9
    vm.create = False
    vm.workload = None
    vm.start()
    assert "replaced stale control socket" in vm.log()
    assert_clean(vm.verify())
    vm.stop()
