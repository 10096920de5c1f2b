"""Migration of a real QEMU guest (driver qemu, TCG) between two ferryd sites
on this machine: the tiny Debian-kernel guest of tests/guest/, whose writer
appends sequenced, self-checking records to its disk with O_DIRECT.

- live: the disks are pre-copied while the guest writes, RAM moves by QEMU's
  migration through the site link tunnel, paused before the switch-over
  while ferry drains, checks and hands the disks over.  Afterwards the guest
  runs at the destination (same boot, its writer goes on), and the record
  check of the destination disk shows every record in order, none missing
  or misplaced; downtime (QEMU STOP to RESUME) is reported.
- cold: the guest is powered down (it ignores ACPI: the driver's timeout
  then ends QEMU), its disk copied and checked, and it boots at the
  destination from the copy (boot 2 continues after boot 1's last record).
- a link cut during the RAM migration: QEMU's migration fails, the guest
  runs on at the source, the cutover is tried again and the guest arrives.
- pre-flight: an unmapped network, an unknown machine type: reported, and
  nothing changes.
"""
import re
import time

import pytest

from guest import WRITER_PROGRESS, WRITER_START, check_records, guest_artifacts
from sites import SiteEnv
from test_migration import wan_factory  # noqa: F401 (fixture)

STOP_TIMEOUT = "3s"        # the guest has no ACPI handling: power-down ends by timeout


@pytest.fixture
def env(ferryd_factory, wan_factory):  # noqa: F811
    e = SiteEnv(ferryd_factory, wan_factory)
    yield e
    e.teardown()


def console(site, vm):
    try:
        return (site.d.data_dir / "vms" / vm / "console.log").read_text(errors="replace")
    except OSError:
        return ""


def wait_console(site, vm, regex, pred=None, timeout=90, what=""):
    deadline = time.monotonic() + timeout
    while True:
        hits = [m for m in regex.finditer(console(site, vm)) if pred is None or pred(m)]
        if hits:
            return hits[-1]
        assert "Kernel panic" not in console(site, vm), console(site, vm)[-3000:]
        assert time.monotonic() < deadline, (
            f"{site.name}/{vm}: no {what or regex.pattern} in {timeout}s; console:\n"
            f"{console(site, vm)[-3000:]}\nferryd log:\n{site.d.log()[-3000:]}")
        time.sleep(0.1)


def last_seq(site, vm):
    hits = list(WRITER_PROGRESS.finditer(console(site, vm)))
    return (int(hits[-1].group(1)), int(hits[-1].group(2))) if hits else (0, -1)


def qemu_sites(env, networks=("lan",), wan=None):
    """Two sites; with wan (ferry-wan options), onprem reaches cloud's link
    through a ferry-wan proxy, returned third."""
    stop = ("--qemu-stop-timeout", STOP_TIMEOUT)
    a = env.site("onprem", extra_args=stop)
    b = env.site("cloud", extra_args=stop)
    w = env.wan_to(b, **wan) if wan is not None else None
    env.pair(a, b, wan=w)
    a.wan = w
    for n in networks:
        a.cli("network", "add", n, "--type", "user")
    b.cli("network", "add", "cloudnet", "--type", "user")
    return a, b


def create_guest(a, name="g1", rate=50, network="lan"):
    art = guest_artifacts()
    a.create("vda", "64M")
    args = ["vm", "create", name, "--driver", "qemu", "--disk", "vda", "--memory", "256M",
            "--kernel", art["kernel"], "--initrd", art["initrd"],
            "--append", f"console=ttyS0 panic=-1 ferry.rate={rate}"]
    if network:
        args += ["--nic", f"network={network}"]
    a.cli(*args)
    a.cli("vm", "start", name)
    wait_console(a, name, WRITER_START, what="the writer's start line")
    wait_console(a, name, WRITER_PROGRESS, pred=lambda m: int(m.group(2)) >= 20,
                 what="writer progress")


def stop_and_check(site, vm, disk="vda"):
    """Ends the guest (the record check reads the image as it is on disk)."""
    site.cli("vm", "stop", vm, timeout=120)
    rep = check_records(site.image(disk))
    assert rep["ok"] is True, rep
    return rep


def test_qemu_live_migration(env):
    a, b = qemu_sites(env)
    create_guest(a)
    assert a.vm("g1")["state"] == "running"
    st, js = a.api("POST", "/v1/migrations", {"vm": "g1", "to": "cloud", "mode": "live",
                                              "max_downtime": 2000,
                                              "networks": {"lan": "cloudnet"}})
    assert st == 201, js
    assert all(c["ok"] for c in js["params"]["preflight"]), js["params"]["preflight"]
    mid = js["id"]
    m = a.wait_migration(mid, timeout=300)
    assert m["state"] == "completed", m
    boot_a, seq_a = last_seq(a, "g1")
    prog = m["progress"]
    assert prog["ram"]["sent"] > 0, prog["ram"]
    downtime = prog["cutover"]["downtime_ms"]
    assert 0 < downtime < 60000, prog["cutover"]
    # the source QEMU is gone, its disk fenced; the guest runs at the destination
    va = a.vm("g1")
    assert va["state"] == "migrated" and va["moved_to"] == "cloud", va
    assert a.d.disk("vda")["fence"]
    vb = b.vm("g1")
    assert vb["state"] == "running", vb
    assert vb["config"]["nics"][0]["network"] == "cloudnet", vb
    # same boot, the writer goes on there (its console continues in the
    # destination's log: the serial port is part of the migrated machine)
    wait_console(b, "g1", WRITER_PROGRESS,
                 pred=lambda m: int(m.group(1)) == 1 and int(m.group(2)) > seq_a + 20,
                 what=f"writer progress past seq {seq_a + 20} at the destination")
    assert WRITER_START.search(console(b, "g1")) is None, "the guest booted again"
    mb = b.migration(mid)
    assert mb["state"] == "completed" and mb["progress"]["cutover"]["downtime_ms"] == downtime
    rep = stop_and_check(b, "g1")
    assert rep["records"] > seq_a + 20, rep
    assert [x["boot"] for x in rep["boots"]] == [1], rep
    print(f"\nqemu live migration: downtime {downtime} ms, RAM {prog['ram']['sent']} bytes, "
          f"{rep['records']} records in order")


def test_qemu_cold_migration(env):
    a, b = qemu_sites(env)
    create_guest(a)
    st, js = a.api("POST", "/v1/migrations", {"vm": "g1", "to": "cloud", "mode": "cold",
                                              "networks": {"lan": "cloudnet"}})
    assert st == 201, js
    m = a.wait_migration(js["id"], timeout=300)
    assert m["state"] == "completed", m
    assert a.vm("g1")["state"] == "migrated"
    rep_a = check_records(a.image("vda"))
    assert rep_a["ok"] is True, rep_a
    # what boot 1 wrote is at the destination byte for byte (the guest may
    # already append boot 2's records there: past that prefix)
    n = rep_a["records"] * 4096
    with open(a.image("vda"), "rb") as fa, open(b.image("vda"), "rb") as fb:
        assert fa.read(n) == fb.read(n)
    # it boots at the destination from the copy: boot 2 starts after boot 1
    assert b.vm("g1")["state"] == "running"
    mm = wait_console(b, "g1", WRITER_START, what="the writer's start line at the destination")
    assert int(mm.group(1)) == 2 and int(mm.group(2)) == rep_a["records"], (mm.group(0), rep_a)
    wait_console(b, "g1", WRITER_PROGRESS,
                 pred=lambda m: int(m.group(1)) == 2 and int(m.group(2)) >= rep_a["records"] + 10,
                 what="boot 2 progress")
    rep = stop_and_check(b, "g1")
    assert [x["boot"] for x in rep["boots"]] == [1, 2], rep


def test_qemu_preflight_unmapped_network(env):
    a, b = qemu_sites(env)
    create_guest(a, rate=20)
    # no --map-network: 'lan' does not exist at the destination
    r = a.cli("migrate", "g1", "--to", "cloud", check=False)
    assert r.returncode != 0
    assert "preflight_failed" in r.stderr and "no network 'lan' here" in r.stderr, r.stderr
    assert re.search(r"ok\s+destination hypervisor\s+QEMU \d", r.stderr), r.stderr
    # nothing changed: the guest writes on at the source, nothing at the destination
    assert a.api_ok("GET", "/v1/migrations")["migrations"] == []
    assert b.api_ok("GET", "/v1/migrations")["migrations"] == []
    assert b.api("GET", "/v1/vms/g1")[0] == 404
    assert b.api("GET", "/v1/disks/vda")[0] == 404
    assert a.vm("g1")["state"] == "running" and a.d.disk("vda")["fence"] is None
    _, seq = last_seq(a, "g1")
    wait_console(a, "g1", WRITER_PROGRESS, pred=lambda m: int(m.group(2)) > seq + 5,
                 what="writer progress after the refusal")
    # mapped, every check passes
    st, js = a.api("POST", "/v1/migrations", {"vm": "g1", "to": "cloud", "preflight_only": True,
                                              "networks": {"lan": "cloudnet"}})
    assert st == 200 and all(c["ok"] for c in js["preflight"]), js
    # an unknown machine type is caught the same way: asked of QEMU there
    # (query-machines), not guessed.  g2 was never started here.
    a.create("vdb", "16M")
    a.cli("vm", "create", "g2", "--driver", "qemu", "--disk", "vdb", "--memory", "128M",
          "--machine", "pc-q35-99.9")
    st, js = a.api("POST", "/v1/migrations", {"vm": "g2", "to": "cloud", "mode": "cold"})
    assert st == 412, js
    bad = [c for c in js["preflight"] if not c["ok"]]
    assert [c["check"] for c in bad] == ["destination machine type"], bad
    assert "pc-q35-99.9" in bad[0]["detail"], bad
    assert b.api("GET", "/v1/disks/vdb")[0] == 404 and a.d.disk("vdb")["fence"] is None
    assert a.vm("g2")["state"] == "stopped"


def test_qemu_ram_migration_survives_a_link_cut(env):
    a, b = qemu_sites(env, wan={"rate": "40mbit"})
    w = a.wan
    create_guest(a)
    st, js = a.api("POST", "/v1/migrations", {"vm": "g1", "to": "cloud", "max_downtime": 2000,
                                              "networks": {"lan": "cloudnet"}})
    assert st == 201, js
    mid = js["id"]
    a.wait_progress(mid, lambda m: m["progress"]["phase"] == "ram" and
                    m["progress"]["ram"]["sent"] > 0, "the RAM migration", timeout=180)
    w.ctl("cut", "2s")
    # QEMU's migration fails with the tunnel; the guest is never paused for long
    a.wait_progress(mid, lambda m: m["progress"]["phase"] != "ram", "the aborted RAM migration",
                    timeout=120)
    _, seq = last_seq(a, "g1")
    wait_console(a, "g1", WRITER_PROGRESS, pred=lambda m: int(m.group(2)) > seq,
                 what="writer progress at the source after the aborted attempt")
    m = a.wait_migration(mid, timeout=300)
    assert m["state"] == "completed", m
    assert m["progress"]["counters"]["cutover_attempts"] >= 2, m["progress"]["counters"]
    assert "cutover aborted" in a.d.log()
    # the destination discarded its first incoming QEMU; the second one runs
    assert b.vm("g1")["state"] == "running"
    wait_console(b, "g1", WRITER_PROGRESS,
                 pred=lambda m: int(m.group(1)) == 1 and int(m.group(2)) > seq + 10,
                 what="writer progress at the destination")
    rep = stop_and_check(b, "g1")
    assert [x["boot"] for x in rep["boots"]] == [1], rep
