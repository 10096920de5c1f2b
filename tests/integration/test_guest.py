"""The tiny test guest (tests/guest/, docs/guest.md): a real Linux guest
under QEMU (TCG) whose writer appends self-checking records to a disk that
ferryd serves over NBD.  It is the workload of the QEMU driver's migration
tests; these tests show that it and its checker can be trusted:

  - the checker passes a good image and names the first bad record for
    each way a disk can go wrong (torn, misplaced, lost in the middle,
    written beyond the end, boot counter or clock out of order);
  - the guest boots (boot time printed), writes records at ferry.rate,
    and a cold restart continues after the last record with boot counter 2;
  - ferryd restarted under the running guest: the writer retries through
    the IO errors and goes on, nothing lost or misplaced;
  - at ferry.rate=0 a small disk fills to its last record and the writer
    idles there with nothing written beyond (QMP answers meanwhile).
"""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run
from guest import (GUEST_SRC, QemuGuestFactory, check_records, guest_artifacts,
                   records_module)

REC = 4096


@pytest.fixture
def guests(ferryd_factory):
    """Depends on ferryd_factory so that QEMU is stopped before ferryd is."""
    f = QemuGuestFactory()
    yield f
    f.teardown()


def boots(report):
    return [b["boot"] for b in report["boots"]]


def say(capsys, text):
    """Prints past pytest's capture (boot times are worth seeing in the run)."""
    with capsys.disabled():
        print(f"\n  {text}")


# --- the checker, on images made here --------------------------------------
def make_image(path, layout, size=64 * REC):
    """layout: list of (boot, count) runs of records from 0; ns grows."""
    m = records_module()
    recs = []
    ns = 1000
    for boot, count in layout:
        for _ in range(count):
            recs.append(m.make_record(len(recs), boot, ns))
            ns += 1000
    path.write_bytes(b"".join(recs) + bytes(size - len(recs) * REC))
    return path


def put(path, index, data):
    with open(path, "r+b") as f:
        f.seek(index * REC)
        f.write(data)


def test_checker_passes_good_and_names_first_bad(tmp_path):
    m = records_module()
    img = make_image(tmp_path / "good.img", [(1, 10), (2, 10)])
    r = check_records(img)
    assert r["ok"] is True and r["error"] is None and r["first_bad"] is None, r
    assert r["records"] == 20 and r["capacity"] == 64, r
    assert r["boots"] == [{"boot": 1, "first": 0, "last": 9, "count": 10},
                          {"boot": 2, "first": 10, "last": 19, "count": 10}], r

    # The command line: JSON on stdout, exit 0 / 1.
    p = run(["/usr/bin/python3", GUEST_SRC / "check_records.py", img])
    assert json.loads(p.stdout) == r

    def bad(name, index, word, damage):
        path = make_image(tmp_path / f"{name}.img", [(1, 10), (2, 10)])
        damage(path)
        r = check_records(path)
        assert r["ok"] is False and r["first_bad"] == index and word in r["error"], (name, r)
        p = run(["/usr/bin/python3", GUEST_SRC / "check_records.py", path], check=False)
        assert p.returncode == 1 and json.loads(p.stdout)["first_bad"] == index, p.stdout
        return r

    def flip(path):                       # one bit of record 5's fill
        with open(path, "r+b") as f:
            f.seek(5 * REC + 100)
            b = f.read(1)
            f.seek(5 * REC + 100)
            f.write(bytes([b[0] ^ 1]))
    bad("torn", 5, "checksum", flip)
    bad("misplaced", 7, "misplaced", lambda p: put(p, 7, m.make_record(8, 1, 9000)))
    bad("foreign", 3, "no record", lambda p: put(p, 3, b"\xff" * REC))
    bad("hole", 13, "beyond the end", lambda p: put(p, 12, bytes(REC)))
    r = bad("beyond", 40, "beyond the end", lambda p: put(p, 40, m.make_record(40, 2, 99000)))
    assert r["records"] == 20, r
    bad("boot-jump", 10, "boot 3 follows boot 1", lambda p: put(p, 10, m.make_record(10, 3, 11000)))
    bad("boot-back", 15, "boot 1 follows boot 2", lambda p: put(p, 15, m.make_record(15, 1, 16000)))
    bad("clock", 4, "clock went back", lambda p: put(p, 4, m.make_record(4, 1, 10)))
    bad("first-boot", 0, "first boot counter", lambda p: put(p, 0, m.make_record(0, 2, 10)))

    empty = tmp_path / "empty.img"
    empty.write_bytes(bytes(8 * REC))
    r = check_records(empty)
    assert r["ok"] is True and r["records"] == 0 and r["boots"] == [], r
    r = check_records(tmp_path / "missing.img")
    assert r["ok"] is False and "cannot open" in r["error"], r


# --- the guest --------------------------------------------------------------
def test_guest_build_is_cached():
    art = guest_artifacts()
    for k in ("kernel", "initrd", "writer", "vmlinux", "vmlinuz"):
        assert art[k] and os.path.exists(art[k]), (k, art)
    assert art["modules"][-1] == "virtio_blk.ko" and "virtio_pci.ko" in art["modules"], art
    # Up to date now: a second run does nothing, quickly.
    t0 = time.monotonic()
    p = subprocess.run([str(GUEST_SRC / "build.sh"), str(Path(art["initrd"]).parent)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 0 and "up to date" in p.stdout, p.stdout
    assert took < 5, f"cached guest build took {took:.1f}s"


def test_guest_writes_reboots_and_rides_out_ferryd_restart(ferryd, guests, capsys):
    d = ferryd
    d.create("vda", "64M")
    uri = d.uri("vda")
    art = guest_artifacts()
    g = guests(d.tmp, uri, name="g", rate=50)

    # Boot 1: records from 0 at 50/s.
    g.start()
    assert g.wait_writer_start() == (1, 0)
    t_start = time.monotonic()
    _, seq1 = g.wait_progress(100)
    g.stop()
    ran = time.monotonic() - t_start
    boot1 = g.boot_seconds
    d.wait_idle("vda")
    r1 = check_records(uri)
    assert r1["ok"] is True, r1
    assert r1["records"] >= seq1 + 1 and boots(r1) == [1], r1
    # ferry.rate is a ceiling: no more than 50/s (+ slack for the first record).
    assert r1["records"] <= 50 * ran + 5, (r1["records"], ran)
    # The image behind ferryd says the same as the NBD view.
    assert check_records(d.image_path("vda")) == r1
    n1 = r1["records"]

    # Boot 2 (a cold restart): continues at the first free record, boot 2.
    g.start()
    assert g.wait_writer_start() == (2, n1)
    boot2 = g.boot_seconds
    _, seq = g.wait_progress(n1 + 25)

    # ferryd goes away under the running guest and comes back: the writer's
    # IOs fail meanwhile (retried every 100 ms), then it goes on.
    d.restart()
    _, seq2 = g.wait_progress(seq + 50, timeout=60)
    retried = re.search(r"^ferry-writer: \w+ seq \d+ succeeded after (\d+) failed tries",
                        g.console(), re.M)
    g.stop()
    d.wait_idle("vda")
    r2 = check_records(uri)
    assert r2["ok"] is True, r2
    assert boots(r2) == [1, 2], r2
    assert r2["boots"][0]["count"] == n1 and r2["boots"][1]["first"] == n1, r2
    assert r2["records"] >= seq2 + 1, (r2, seq2)

    say(capsys, f"guest: kernel {art['kernel_release']} ({art['boot']} boot), "
                f"QEMU start to writer's first line: {boot1}s, {boot2}s (TCG); "
                f"{r2['records']} records; ferryd restart: "
                + (f"writer retried {retried.group(1)} times" if retried else "no IO error seen"))


def test_guest_fills_small_disk_and_idles(ferryd, guests):
    d = ferryd
    d.create("small", "1M")               # 256 records
    uri = d.uri("small")
    g = guests(d.tmp, uri, name="small", rate=0, qmp=True)
    g.start()
    assert g.wait_writer_start() == (1, 0)
    assert g.qmp_command("query-status")["status"] == "running"
    blk = g.qmp_command("query-block")
    assert any(b.get("inserted", {}).get("drv") == "raw" and "nbd" in b["inserted"]["file"]
               for b in blk), blk
    g.wait_for(re.compile(r"^ferry-writer: end of disk at seq 255 \(256 records\); idling$", re.M),
               timeout=60, what="end of disk")
    time.sleep(0.5)                       # idling: still up, writing nothing
    assert g.proc.poll() is None, g.console()[-3000:]
    g.stop()
    d.wait_idle("small")
    r = check_records(uri)
    assert r["ok"] is True and r["records"] == 256 == r["capacity"] and boots(r) == [1], r
