"""Live migration between two real ferryd sites on loopback, with a real
simulated VM (ferry-simvm) writing all the while, and faults: kill -9 of
either daemon, link cuts and stalls through ferry-wan, damaged frames,
unpaired and wrongly keyed peers, cancel, write and replication backpressure.

The proof that nothing was lost is the VM's own verify (every block against
the table of its acknowledged writes) at the destination, and, for a disk
written by an independent NBD client, a byte-for-byte comparison of the
source and destination images after cutover.
"""
import os
import random
import signal
import struct
import threading
import time

import pytest

from conftest import have_libnbd, run
from sites import SiteEnv, image_equal
from wanproxy import WanFactory

MiB = 1024 * 1024


@pytest.fixture
def wan_factory(tmp_path_factory):
    f = WanFactory(tmp_path_factory)
    yield f
    f.teardown()


@pytest.fixture
def env(ferryd_factory, wan_factory):
    e = SiteEnv(ferryd_factory, wan_factory)
    yield e
    e.teardown()


def two_sites(env, wan=None, a_env=None, b_env=None, **wan_kw):
    a = env.site("onprem", env=a_env)
    b = env.site("cloud", env=b_env)
    w = env.wan_to(b, **wan_kw) if wan else None
    env.pair(a, b, wan=w)
    return a, b, w


def start_vm(a, name="vm1", disks=("vda",), size="64M", fill=0, workload="write=80,iops=400,qd=4"):
    for d in disks:
        a.create(d, size)
    a.vm_create(name, list(disks), workload)
    if fill:
        a.fill(name, list(disks), fill)
    a.vm_start(name)
    a.wait_vm_io(name, writes=20)


def assert_arrived(a, b, m, vm="vm1"):
    assert m["state"] == "completed", m
    # the VM runs at the destination, verified block by block ...
    vb = b.vm(vm)
    assert vb["state"] == "running", vb
    b.wait_vm_io(vm, writes=b.vm_writes(vm) + 10)
    rep = b.verify(vm)
    assert rep["ok"] is True, rep
    assert rep["written_blocks"] > 0 and rep["checked"] >= rep["written_blocks"], rep
    # ... and no longer at the source, whose disks are fenced
    va = a.vm(vm)
    assert va["state"] == "migrated" and va["moved_to"] == "cloud", va
    for d in va["disks"]:
        assert a.d.disk(d)["fence"], a.d.disk(d)
        assert b.d.disk(d)["fence"] is None, b.d.disk(d)


def bytes_of(m, key):
    return m["progress"]["bytes"][key]


# ---------------------------------------------------------------------------

@pytest.mark.skipif(not have_libnbd(), reason="python3-libnbd is not installed")
def test_live_migration_write_heavy_arrives_whole(env):
    """A write-heavy VM moves; its verify passes at the destination; a second
    disk written by an independent NBD client during the whole migration is
    byte-identical at both sites after the cutover; downtime is reported and
    within the budget (loopback: the dirty rate is below the link's)."""
    import nbd
    a, b, _ = two_sites(env)
    start_vm(a, disks=("vda", "vdb"), fill=40, workload="write=90,iops=600,qd=8,disks=vda")

    # Independent writer on vdb until the fence refuses it.
    stop = threading.Event()
    acked = {}
    errors = []

    def writer():
        h = nbd.NBD()
        h.connect_uri(a.d.uri("vdb"))
        rnd = random.Random(7)
        n = 0
        nblocks = 64 * MiB // 4096
        try:
            while not stop.is_set():
                # Past what the VM's fill wrote (its first 40%): the VM's own
                # verify leaves blocks it never wrote alone.
                blk = rnd.randrange(nblocks // 2, nblocks)
                data = struct.pack("<QQ", blk, n) * 256
                h.pwrite(data, blk * 4096)
                acked[blk] = data
                n += 1
        except nbd.Error as e:
            errors.append(e)
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    mid = a.migrate("vm1", b, max_downtime="500ms")
    m = a.wait_migration(mid)
    stop.set()
    t.join(30)
    assert_arrived(a, b, m)
    p = m["progress"]
    assert 0 < p["cutover"]["downtime_ms"] <= 500, p["cutover"]
    assert len(acked) > 100
    # The writer was refused at the fence, with EPERM, not cut off silently.
    assert errors and "Operation not permitted" in str(errors[0]), errors
    off = image_equal(a.image("vdb"), b.image("vdb"))
    assert off is None, f"vdb differs at offset {off}"
    with open(b.image("vdb"), "rb") as f:
        for blk, data in acked.items():
            f.seek(blk * 4096)
            assert f.read(4096) == data, f"acknowledged write to block {blk} missing"
    # The destination agrees on what it was sent, and the source on what it sent.
    db = b.migration(mid)
    assert db["role"] == "destination" and db["state"] == "completed"
    assert db["progress"]["cutover"]["downtime_ms"] == p["cutover"]["downtime_ms"]
    assert p["counters"]["verified_regions"] > 0
    assert bytes_of(m, "resent") == 0


def test_cli_progress_bar_and_summary(env):
    """`ferry migrate --wait` shows progress and ends with the figures."""
    a, b, _ = two_sites(env)
    start_vm(a, size="32M", fill=30)
    p = a.cli("migrate", "vm1", "--to", "cloud", "--max-downtime", "1s", "--wait", timeout=300)
    out = p.stdout
    assert "started: VM vm1 to site cloud" in out, out
    assert "%" in out and "left" in out and "backlog" in out, out
    assert "completed" in out and "downtime:" in out, out
    lst = a.cli("migration", "list").stdout
    assert "completed" in lst and "source" in lst
    assert "destination" in b.cli("migration", "list").stdout
    assert b.cli("vm", "verify", "vm1").returncode == 0


def test_write_backpressure_makes_it_converge(env):
    """Dirty rate above the link's bandwidth: the migration still converges,
    by slowing the VM's writes, and says so."""
    a, b, w = two_sites(env, wan=True, rate="24mbit")       # 3 MB/s
    start_vm(a, size="32M", fill=10, workload="write=100,bs=64k,rate=8M,qd=4")
    mid = a.migrate("vm1", b, max_downtime="300ms")
    m = a.wait_progress(mid, lambda m: m["progress"]["backpressure_bps"] > 0,
                        "write backpressure", timeout=180)
    assert "backpressure" in m["progress"]["verdict"], m["progress"]["verdict"]
    assert a.d.disk("vda")["backpressure_limit_bps"] > 0
    m = a.wait_migration(mid, timeout=300)
    assert_arrived(a, b, m)
    assert m["progress"]["cutover"]["downtime_ms"] > 0
    log = a.d.log()
    assert "write backpressure: VM writes limited to" in log
    # Lifted after the cutover.
    assert a.d.disk("vda")["backpressure_limit_bps"] == 0


def test_replication_rate_limit_changes_while_running(env):
    a, b, _ = two_sites(env)
    start_vm(a, size="64M", fill=60, workload="write=50,iops=100")
    mid = a.migrate("vm1", b, rate_limit="2M")
    a.wait_progress(mid, lambda m: m["progress"]["bytes"]["data_sent"] > 2 * MiB, "data sent")
    t0, s0 = time.monotonic(), bytes_of(a.migration(mid), "data_sent")
    time.sleep(3)
    rate = (bytes_of(a.migration(mid), "data_sent") - s0) / (time.monotonic() - t0)
    assert rate < 4 * MiB, f"{rate / MiB:.1f} MiB/s under a 2 MiB/s cap"
    a.cli("migration", "set", mid, "--rate-limit", "0")
    m = a.wait_migration(mid, timeout=120)
    assert_arrived(a, b, m)


@pytest.mark.parametrize("victim", ["source", "destination"])
def test_kill9_resumes_from_persisted_progress(env, victim):
    """kill -9 of either ferryd in the middle of the background copy: after
    its restart the migration goes on by itself and sends again only a small
    part of the disk."""
    a, b, w = two_sites(env, wan=True, rate="80mbit")       # 10 MB/s: a few seconds of copy
    start_vm(a, size="128M", fill=60, workload="write=70,iops=300")
    mid = a.migrate("vm1", b)
    a.wait_progress(mid, lambda m: m["progress"]["bytes"]["data_sent"] > 24 * MiB, "a quarter")
    site = a if victim == "source" else b
    link = site.link()
    site.d.kill9()
    time.sleep(1)
    # Same link port: the proxy (and the peer record) dial it.
    site.d.start(extra_args=["--link", link])
    m = a.wait_migration(mid, timeout=300)
    assert_arrived(a, b, m)
    resent = bytes_of(m, "resent")
    assert resent < 0.05 * 128 * MiB, f"{resent} bytes sent twice"
    c = m["progress"]["counters"]
    assert c["restarts"] >= 1 if victim == "source" else c["reconnects"] >= 1, c


@pytest.mark.parametrize("cut_s", [2, 15])
def test_link_cut_resumes(env, cut_s):
    """The link is cut (connections reset, new ones refused) for a while; the
    migration resumes by itself, sending again only what was in flight."""
    a, b, w = two_sites(env, wan=True, rate="80mbit")
    start_vm(a, size="128M", fill=60)
    mid = a.migrate("vm1", b)
    a.wait_progress(mid, lambda m: m["progress"]["bytes"]["data_sent"] > 16 * MiB, "progress")
    w.ctl("cut", f"{cut_s}s")
    a.wait_progress(mid, lambda m: m["progress"]["link"] != "up", "link down", timeout=30)
    m = a.wait_migration(mid, timeout=300)
    assert_arrived(a, b, m)
    assert m["progress"]["counters"]["reconnects"] >= 1
    assert bytes_of(m, "resent") < 0.05 * 128 * MiB, m["progress"]["bytes"]


def test_link_stall_detected_and_resumed(env):
    """Nothing moves on the link (connections stay open): the source notices
    within its stall limit, drops the link and resumes once bytes flow."""
    a, b, w = two_sites(env, wan=True, rate="80mbit")
    start_vm(a, size="64M", fill=60)
    mid = a.migrate("vm1", b)
    a.wait_progress(mid, lambda m: m["progress"]["bytes"]["data_sent"] > 8 * MiB, "progress")
    w.ctl("stall")
    a.wait_progress(mid, lambda m: m["progress"]["link"] != "up", "stall detection", timeout=40)
    w.ctl("unstall")
    m = a.wait_migration(mid, timeout=300)
    assert_arrived(a, b, m)
    assert m["progress"]["counters"]["reconnects"] >= 1


def test_bit_flips_on_the_wire_are_caught(env):
    """ferry-wan flips bits in the TLS stream: TLS refuses the record, the
    link drops, the session resumes; nothing damaged is written."""
    a, b, w = two_sites(env, wan=True, rate="80mbit")
    start_vm(a, size="64M", fill=60)
    mid = a.migrate("vm1", b)
    a.wait_progress(mid, lambda m: m["progress"]["bytes"]["data_sent"] > 4 * MiB, "progress")
    w.ctl("flip", "3", "up")
    m = a.wait_migration(mid, timeout=300)
    assert_arrived(a, b, m)
    assert w.stats()["flipped_up"] >= 1
    assert m["progress"]["counters"]["reconnects"] >= 1


def test_damaged_frames_are_resent_never_written(env):
    """Frames damaged after their checksum (a test hook at the sender, since
    TLS would catch damage on the wire first): the destination refuses each,
    asks again, and the migration arrives whole."""
    a, b, _ = two_sites(env, a_env={"FERRY_TEST_CORRUPT_FRAMES": "25"})
    start_vm(a, size="32M", fill=50)
    mid = a.migrate("vm1", b)
    m = a.wait_migration(mid, timeout=300)
    assert_arrived(a, b, m)
    assert m["progress"]["counters"]["nacks"] >= 1, m["progress"]["counters"]
    assert b.migration(mid)["progress"]["counters"]["bad_frames"] >= 1
    assert "damaged" in b.d.log()


def test_unpaired_and_wrongly_keyed_peers_are_refused(env, tmp_path):
    a, b, _ = two_sites(env)
    c = env.site("rogue")
    start_vm(c, name="vmc", disks=("vdc",), size="16M")
    # Not paired at all: refused before anything is sent.
    st, js = c.api("POST", "/v1/migrations", {"vm": "vmc", "to": b.url})
    assert st == 400 and "not a paired site" in js["error"]["message"], js
    # Paired one way only (c trusts b, b does not know c): b refuses the
    # handshake, already at the pre-flight, so no migration is recorded.
    c.cli("site", "pair", "--name", "cloud", "--link", b.link(),
          "--fingerprint", b.api_ok("GET", "/v1/site")["fingerprint"])
    st, js = c.api("POST", "/v1/migrations", {"vm": "vmc", "to": "cloud"})
    assert st == 412, js
    bad = [x for x in js["preflight"] if not x["ok"]]
    assert [x["check"] for x in bad] == ["destination"], bad
    assert "refused our certificate" in bad[0]["detail"], bad
    assert c.vm("vmc")["state"] == "running"
    assert c.api_ok("GET", "/v1/migrations")["migrations"] == []
    assert "refused" in b.d.log() or "not paired" in b.d.log()
    # Wrong key: a's record of b holds another fingerprint: a refuses b.
    a.api_ok("POST", "/v1/peers", {"name": "cloud", "api_url": b.url, "link": b.link(),
                                   "fingerprint": "sha256:" + "ab" * 32}, status=201)
    start_vm(a, size="16M")
    st, js = a.api("POST", "/v1/migrations", {"vm": "vm1", "to": "cloud"})
    assert st == 412, js
    assert "sha256:" + "ab" * 32 in js["error"]["message"], js
    assert a.vm("vm1")["state"] == "running"
    assert b.api_ok("GET", "/v1/migrations")["migrations"] == [], \
        "the destination must not have heard of a refused source"


def test_cancel_keeps_the_vm_and_cleans_the_destination(env):
    a, b, w = two_sites(env, wan=True, rate="16mbit")
    start_vm(a, size="64M", fill=80)
    mid = a.migrate("vm1", b)
    a.wait_progress(mid, lambda m: m["progress"]["bytes"]["data_sent"] > MiB, "progress")
    assert b.api("GET", "/v1/disks/vda")[0] == 200
    r = a.cli("migration", "cancel", mid)
    assert "cancelled" in r.stdout
    m = a.migration(mid)
    assert m["state"] == "cancelled"
    assert a.vm("vm1")["state"] == "running" and a.vm("vm1")["migration"] is None
    a.wait_vm_io("vm1", writes=a.vm_writes("vm1") + 10)
    assert a.d.disk("vda")["fence"] is None
    assert b.api("GET", "/v1/disks/vda")[0] == 404
    assert b.migration(mid)["state"] == "cancelled"
    assert a.verify("vm1")["ok"] is True
    # A second migration of the same VM goes through.
    w.ctl("rate", "0")
    m = a.wait_migration(a.migrate("vm1", b), timeout=300)
    assert_arrived(a, b, m)


def test_bad_requests_are_refused_and_change_nothing(env):
    a, b, _ = two_sites(env)
    start_vm(a, size="16M")
    bad = [
        ({"vm": "vm1"}, "missing field 'to'"),
        ({"vm": "vm1", "to": "cloud", "mode": "seeded"}, "not supported"),
        ({"vm": "vm1", "to": "cloud", "mode": "warm", "rpo": "0s"}, "at least 1 s"),
        ({"vm": "vm1", "to": "cloud", "mode": "warm", "prefetch": "all"}, "prefetch"),
        ({"vm": "vm1", "to": "cloud", "mode": "warm", "cache_size": "lots"}, "cache_size"),
        ({"vm": "vm1", "to": "cloud", "max_downtime": "soon"}, "duration"),
        ({"vm": "vm1", "to": "cloud", "max_downtime": 0}, "more than 0"),
        ({"vm": "vm1", "to": "cloud", "rate_limit": -1}, "negative"),
        ({"vm": "vm1", "to": "cloud", "verify": "maybe"}, "verify"),
        ({"vm": "vm1", "to": "cloud", "bogus": 1}, "unknown field"),
        ({"vm": "../x", "to": "cloud"}, "invalid"),
        ({"vm": "nope", "to": "cloud"}, "does not exist"),
        ({"vm": "vm1", "to": "nowhere"}, "not a paired site"),
    ]
    for body, msg in bad:
        st, js = a.api("POST", "/v1/migrations", body)
        assert st in (400, 404, 409), (body, st, js)
        assert msg in js["error"]["message"], (body, js)
    st, _ = a.api("POST", "/v1/migrations", raw=b"{not json")
    assert st == 400
    for body in ({"name": "x"}, {"name": "x", "api_url": "ftp://h", "link": "h:1",
                                 "fingerprint": "sha256:" + "00" * 32},
                 {"name": "x", "api_url": "http://h:1", "link": "nope",
                  "fingerprint": "sha256:" + "00" * 32},
                 {"name": "x", "api_url": "http://h:1", "link": "h:1", "fingerprint": "md5:1"}):
        st, js = a.api("POST", "/v1/peers", body)
        assert st == 400, (body, st, js)
    for body in ({"name": "v2"}, {"name": "v2", "disks": ["nope"]},
                 {"name": "v2", "disks": ["vda"], "driver": "xen"},
                 {"name": "v2", "disks": ["vda"]},          # vda belongs to vm1
                 {"name": "v2", "disks": ["vda", "vda"]},
                 {"name": "v2", "disks": "vda"}):
        st, js = a.api("POST", "/v1/vms", body)
        assert st in (400, 409), (body, st, js)
    assert a.api("GET", "/v1/migrations/m-000000000000")[0] == 404
    assert a.api("GET", "/v1/migrations/banana")[0] == 400
    assert a.api_ok("GET", "/v1/migrations")["migrations"] == []
    assert len(a.api_ok("GET", "/v1/vms")["vms"]) == 1
    # CLI usage errors are exit 2, before anything is sent.
    for args in (["migrate", "vm1"], ["migrate", "vm1", "--to", "cloud", "--max-downtime", "x"],
                 ["migrate", "vm1", "--to", "cloud", "--mode", "seeded"],
                 ["migrate", "vm1", "--to", "cloud", "--rpo", "5m"],
                 ["migrate", "vm1", "--to", "cloud", "--mode", "warm", "--rpo", "0s"],
                 ["migration", "show", "zzz"], ["vm", "create", "v3"],
                 ["site", "pair", "--name", "x"]):
        assert a.cli(*args, check=False).returncode == 2, args
    # A migration that runs holds the VM and its disk's dirty map.
    mid = a.migrate("vm1", b)
    st, js = a.api("POST", "/v1/disks/vda/dirty/swap")
    assert st in (409, 200), js          # 200 only if it finished already
    if st == 409:
        assert "consumed by migration" in js["error"]["message"]
    a.wait_migration(mid)


def test_migrate_there_and_back(env):
    """The VM goes to cloud and comes back: the copy onprem kept of its disk
    (fenced since it left) is taken over and overwritten whole, and the VM
    arrives whole both times."""
    a, b, _ = two_sites(env)
    env.pair(b, a)                      # the way back (re-pairs both ways)
    start_vm(a, size="32M", fill=50)
    m = a.wait_migration(a.migrate("vm1", b))
    assert_arrived(a, b, m)
    back = b.migrate("vm1", a)
    m2 = b.wait_migration(back)
    assert m2["state"] == "completed", m2
    assert a.vm("vm1")["state"] == "running" and b.vm("vm1")["state"] == "migrated"
    assert a.d.disk("vda")["fence"] is None and b.d.disk("vda")["fence"]
    a.wait_vm_io("vm1", writes=a.vm_writes("vm1") + 10)
    assert a.verify("vm1")["ok"] is True
    assert "comes back from site cloud" in a.d.log()
    lst = a.api_ok("GET", "/v1/migrations")["migrations"]
    assert [x["role"] for x in lst] == ["source", "destination"], lst
