"""Warm migration (the cloud cache gateway) with sim VMs between two real
ferryd sites on loopback, the site link through ferry-wan where the test needs
a WAN.

What each test proves:
- the VM runs at the destination before any of its data has crossed (no
  fetched byte before it runs; only maps and its state), for 1 GiB and 8 GiB
  sparse-but-filled disks alike (the times are printed for the record);
- warm -> commit and warm -> migrate-back: the sim VM's own verify passes
  where it ends up; after commit the destination's disk is a plain image
  (also after a restart), after migrate-back the cache is gone there;
- RPO: after several write-backs the destination is cut off for good, the
  VM restarts at the source from the last point and its verify passes: every
  block is exactly the point's (a block newer or older fails it), while the
  destination had written after that point;
- a cache smaller than the disk: a skewed read pattern with eviction, and
  the hit ratio ferryd reports equals the one the test measures itself
  (a read that waited for the WAN is a miss);
- kill -9 of the destination ferryd: the cache, its present/dirty state and
  the unflushed writes survive; the VM goes on; migrate-back then verifies;
- link down: hits go on, the migration reports itself degraded after the
  configured limit, and is fine again when the link is back;
- the restore point: `snapshot restore` after migrate-back rolls disks and
  state back (verify passes again), `snapshot rm` drops it.
"""
import json
import os
import random
import signal
import threading
import time

import nbd
import pytest

from sites import SiteEnv
from test_migration import two_sites, wan_factory  # noqa: F401 (fixture)

WARM_RUNNING = ("warm",)


@pytest.fixture
def env(ferryd_factory, wan_factory):  # noqa: F811
    e = SiteEnv(ferryd_factory, wan_factory)
    yield e
    e.teardown()


def start_vm(a, size="64M", fill=50, workload="write=60,iops=300,qd=4", name="vm1"):
    a.create("vda", size)
    a.vm_create(name, ["vda"], workload)
    if fill:
        a.fill(name, ["vda"], fill)
    a.vm_start(name)
    a.wait_vm_io(name, writes=20)


def warm(a, b, **opts):
    body = {"mode": "warm"}
    body.update(opts)
    mid = a.migrate("vm1", b, **body)
    m = a.wait_migration(mid, timeout=120, until=WARM_RUNNING + ("failed", "cancelled"))
    assert m["state"] == "warm", m
    return mid, m


def wstatus(site, mid):
    return site.migration(mid)["warm"]


def wait_warm(site, mid, pred, what, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        w = wstatus(site, mid)
        if pred(w):
            return w
        assert time.monotonic() < deadline, f"no {what} after {timeout}s: {w}"
        time.sleep(0.2)


@pytest.mark.parametrize("size", ["1G", "8G"])
def test_time_to_running_does_not_depend_on_disk_size(env, size):
    a, b, _ = two_sites(env)
    start_vm(a, size=size, fill=10, workload="write=50,iops=200,qd=2")
    t0 = time.monotonic()
    mid, m = warm(a, b, hydrate_rate=0)
    ttr = time.monotonic() - t0
    w = m["warm"]
    print(f"warm {size}: time to running {w['time_to_running_ms']} ms "
          f"(test clock {ttr:.2f} s), VM paused {w['pause_ms']} ms")
    # nothing of the disks crossed before the VM ran there: only the maps and
    # the VM's state (about 1 MiB per GiB for a sim VM)
    assert m["progress"]["bytes"]["data_sent"] < (4 << 20), m["progress"]["bytes"]
    assert b.vm("vm1")["state"] == "running"
    assert a.vm("vm1")["state"] == "migrated"
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 30)
    # the VM reads what it wrote at the source, fetched on demand
    rep = b.verify("vm1")
    assert rep["ok"] is True and rep["written_blocks"] > 0, json.dumps(rep)
    wb = wstatus(b, mid)
    assert wb["hydrated_bytes"] == 0, wb           # no background hydration: only misses
    assert wb["read_misses"] > 0 and wb["fetched_bytes"] > 0, wb


def test_warm_then_commit(env):
    a, b, _ = two_sites(env)
    start_vm(a)
    mid, m = warm(a, b, hydrate_rate="1G", rpo="3s")
    # the source's restore point is there
    snaps = a.api_ok("GET", "/v1/snapshots")["snapshots"]
    assert [s["vm"] for s in snaps] == ["vm1"] and snaps[0]["kind"] == "delta", snaps
    # commit is refused until every region is here ... or goes through at once
    wait_warm(a, mid, lambda w: w.get("hydrated_pct", 0) >= 100, "full hydration")
    wait_warm(a, mid, lambda w: w.get("points", 0) >= 1, "a write-back point")
    out = a.cli("commit", "vm1").stdout
    assert "committed" in out, out
    ma = a.migration(mid)
    assert ma["state"] == "committed", ma
    assert b.migration(mid)["state"] == "committed"
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 20)
    rep = b.verify("vm1")
    assert rep["ok"] is True and rep["written_blocks"] > 0, rep
    # the destination's disk is a plain image now, also after a restart
    b.d.restart()
    assert b.d.disk("vda")["fence"] is None
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 20, timeout=90)
    rep = b.verify("vm1")
    assert rep["ok"] is True, rep
    # the source keeps the restore point (its images, fenced)
    snaps = a.api_ok("GET", "/v1/snapshots")["snapshots"]
    assert snaps[0]["kind"] == "image", snaps
    assert a.d.disk("vda")["fence"], a.d.disk("vda")
    a.cli("snapshot", "rm", "vm1")
    assert a.api_ok("GET", "/v1/snapshots")["snapshots"] == []
    assert a.api("GET", "/v1/disks/vda")[0] == 404


def test_commit_refused_until_hydrated(env):
    a, b, _ = two_sites(env)
    start_vm(a)
    mid, _ = warm(a, b, hydrate_rate=0)
    r = a.cli("commit", "vm1", check=False)
    assert r.returncode != 0 and "hydration is at" in r.stderr, r.stderr
    assert a.migration(mid)["state"] == "warm"
    assert b.vm("vm1")["state"] == "running"


def test_warm_then_migrate_back_and_restore_point(env):
    a, b, _ = two_sites(env)
    start_vm(a)
    mid, _ = warm(a, b, rpo="2s")
    wait_warm(a, mid, lambda w: w.get("points", 0) >= 2, "two write-back points")
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 50)
    out = a.cli("migrate-back", "vm1").stdout
    assert "returned" in out, out
    assert a.migration(mid)["state"] == "returned"
    assert b.migration(mid)["state"] == "returned"
    # the VM runs here again with everything it wrote there
    assert a.vm("vm1")["state"] == "running"
    assert a.d.disk("vda")["fence"] is None
    a.wait_vm_io("vm1", writes=a.vm_writes("vm1") + 20)
    rep = a.verify("vm1")
    assert rep["ok"] is True and rep["written_blocks"] > 0, rep
    # the cloud cache is released
    assert b.api("GET", "/v1/disks/vda")[0] == 404
    assert b.api("GET", "/v1/vms/vm1")[0] == 404
    # the restore point stays: rolling back gives the VM of the migrate time
    r = a.cli("snapshot", "restore", "vm1", check=False)
    assert r.returncode != 0 and "--yes" in r.stderr, r.stderr
    r = a.cli("snapshot", "restore", "vm1", "--yes", check=False)
    assert r.returncode != 0 and "stop it first" in r.stderr, r.stderr
    a.cli("vm", "stop", "vm1")
    a.cli("snapshot", "restore", "vm1", "--yes")
    a.vm_start("vm1")
    a.wait_vm_io("vm1", writes=a.vm_writes("vm1") + 20)
    rep = a.verify("vm1")
    assert rep["ok"] is True, rep
    a.cli("snapshot", "rm", "vm1")
    assert a.api_ok("GET", "/v1/snapshots")["snapshots"] == []
    assert a.d.disk("vda")["fence"] is None


def test_rpo_point_is_exact_after_losing_the_destination(env):
    a, b, _ = two_sites(env)
    start_vm(a, workload="write=80,iops=400,qd=4")
    mid, _ = warm(a, b, rpo="2s", degraded_after="2s")
    wait_warm(a, mid, lambda w: w.get("points", 0) >= 3, "three write-back points")
    last = a.migration(mid)["warm"]["last_point"]
    # the VM goes on writing at the destination after that point ...
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 100)
    # ... and then the destination is gone (for good, as far as the source knows)
    pids = b.vm_pids()
    link = b.link()
    b.d.kill9()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    a.wait_progress(mid, lambda m: m["warm"].get("degraded") is True, "degraded", timeout=60)
    assert "migrate-back" in a.migration(mid)["progress"]["verdict"]
    out = a.cli("migrate-back", "vm1", "--last-rpo", "--yes").stdout
    a.cli("vm", "pause", "vm1")
    ma = a.migration(mid)
    assert ma["state"] == "recovering", ma          # until the destination is fenced
    assert "lost" in (ma["error"] or ""), ma
    assert ma["warm"]["last_point"] >= last
    # every block is exactly its content at that point: none newer, none older
    assert a.vm("vm1")["state"] == "paused", out
    rep = a.verify("vm1")
    assert rep["ok"] is True and rep["written_blocks"] > 0, json.dumps(rep)
    # the destination comes back: its VM is stopped there and its disks fenced
    b.d.start(extra_args=["--link", link])
    ma = a.wait_migration(mid, timeout=60)
    assert ma["state"] == "recovered", ma
    mb = b.migration(mid)
    assert mb["state"] == "recovered", mb
    assert b.d.disk("vda")["fence"], b.d.disk("vda")
    assert b.vm("vm1")["state"] != "running", b.vm("vm1")
    # the VM goes on here
    a.cli("vm", "resume", "vm1")
    a.wait_vm_io("vm1", writes=a.vm_writes("vm1") + 10)


def test_cache_quota_smaller_than_disk_hit_ratio(env):
    a, b, w = two_sites(env, wan=True, delay="50ms")
    # a read-mostly VM; its reads warm the cache, the test's own reads are measured
    start_vm(a, size="64M", fill=90, workload="write=10,iops=200,zipf=1.1,qd=2")
    mid, _ = warm(a, b, cache_size="4M", hydrate_rate=0, prefetch="none")
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 20)
    b.api_ok("POST", "/v1/vms/vm1/pause")
    time.sleep(0.5)
    before = wstatus(b, mid)
    h = nbd.NBD()
    h.connect_uri(b.d.uri("vda"))
    size = h.get_size()
    rng = random.Random(7)
    hot = [rng.randrange(0, size // 65536) for _ in range(48)]   # 3 MiB hot set
    hits = misses = 0
    for i in range(400):
        # 80% of the reads go to the hot set, the rest anywhere (evictions)
        region = rng.choice(hot) if rng.random() < 0.8 else rng.randrange(0, size // 65536)
        off = region * 65536 + rng.randrange(0, 16) * 4096
        t = time.monotonic()
        h.pread(4096, off)
        dt = time.monotonic() - t
        if dt >= 0.05:          # waited for the WAN (RTT 100 ms)
            misses += 1
        else:
            hits += 1
    h.shutdown()
    after = wstatus(b, mid)
    d_hits = after["read_hits"] - before["read_hits"]
    d_misses = after["read_misses"] - before["read_misses"]
    print(f"measured {hits} hits {misses} misses; ferryd {d_hits} hits {d_misses} misses; "
          f"evictions {after['evictions']}, local {after['local_bytes']} of {after['quota_bytes']}")
    assert (d_hits, d_misses) == (hits, misses)
    assert after["evictions"] > before["evictions"], after
    assert after["local_bytes"] <= after["quota_bytes"] * 1.1, after
    assert 0 < hits and 0 < misses


def test_destination_kill9_keeps_the_cache(env):
    a, b, _ = two_sites(env)
    start_vm(a)
    mid, _ = warm(a, b, rpo="10m", hydrate_rate="4M")
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 100)
    wb = wstatus(b, mid)
    assert wb["unflushed_bytes"] > 0, wb
    link = b.link()
    b.d.kill9()
    b.d.start(extra_args=["--link", link])      # same port: the source dials it
    after = wait_warm(b, mid, lambda w: w["link"] == "up", "the source back", timeout=60)
    assert after["present_regions"] >= wb["present_regions"], (wb, after)
    assert after["unflushed_bytes"] > 0, after
    # the VM goes on (it reconnects to its disks) ...
    b.wait_vm_io("vm1", writes=b.vm_writes("vm1") + 50, timeout=90)
    # ... and nothing it wrote, before or after the crash, is lost
    a.cli("migrate-back", "vm1")
    a.wait_vm_io("vm1", writes=a.vm_writes("vm1") + 10)
    rep = a.verify("vm1")
    assert rep["ok"] is True and rep["written_blocks"] > 0, rep


def test_link_down_degraded_then_recovers(env):
    a, b, w = two_sites(env, wan=True)
    start_vm(a, workload="write=50,iops=200,qd=2")
    mid, _ = warm(a, b, degraded_after="2s", hydrate_rate="8M")
    wait_warm(b, mid, lambda s: s["hydrated_pct"] >= 100, "full hydration")
    w.ctl("cut")
    # every region is here: the VM goes on during the cut (hits only)
    writes = b.vm_writes("vm1")
    wait_warm(b, mid, lambda s: s["degraded"] is True, "degraded at the destination", timeout=30)
    a.wait_progress(mid, lambda m: m["warm"].get("degraded") is True, "degraded at the source",
                    timeout=30)
    assert b.vm_writes("vm1") > writes
    w.ctl("restore")
    wait_warm(b, mid, lambda s: s["degraded"] is False and s["link"] == "up", "recovered",
              timeout=60)
    a.cli("migrate-back", "vm1")
    rep = a.verify("vm1")
    assert rep["ok"] is True, rep


def test_source_kill9_misses_wait_then_continue(env):
    a, b, _ = two_sites(env)
    start_vm(a, fill=80)
    mid, _ = warm(a, b, hydrate_rate=0, prefetch="none")
    b.api_ok("POST", "/v1/vms/vm1/pause")
    w0 = wstatus(b, mid)
    assert w0["hydrated_pct"] < 100, w0
    a.d.kill9()
    # a read of a region that is not here waits for the source ...
    h = nbd.NBD()
    h.connect_uri(b.d.uri("vda"))
    size = h.get_size()
    got = {}

    def reader():
        # every region of the disk until one needs the source: the thread waits in it
        for off in range(0, size, 65536):
            got[off] = h.pread(4096, off)
        got["done"] = True

    t = threading.Thread(target=reader)
    t.start()
    wait_warm(b, mid, lambda s: s["waiting"] >= 1, "a read waiting for the source", timeout=30)
    assert "done" not in got
    # ... and goes on once the source is back
    a.d.start()
    t.join(timeout=120)
    assert got.get("done"), "the read did not complete after the source came back"
    h.shutdown()
    ma = a.wait_migration(mid, until=("warm",), timeout=60)
    assert ma["progress"]["counters"]["restarts"] >= 1, ma["progress"]["counters"]
    b.api_ok("POST", "/v1/vms/vm1/resume")
    a.cli("migrate-back", "vm1")
    a.wait_vm_io("vm1", writes=a.vm_writes("vm1") + 10)
    rep = a.verify("vm1")
    assert rep["ok"] is True and rep["written_blocks"] > 0, json.dumps(rep)
