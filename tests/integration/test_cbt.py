"""Changed-block tracking: the dirty map says exactly which regions were
written, survives SIGTERM and kill -9, and a damaged map file is never
trusted as clean."""
import os
import random
import select
import signal
import time

import pytest

from conftest import (KiB, MiB, GiB, expected_extents, extents_to_granules, granules,
                      have_libnbd, need)


def dirty_granules(d, name):
    js = d.dirty(name)
    return extents_to_granules(js["extents"], js["granularity"]), js


CBT_PERSIST_SPAN = 32   # src/disk/cbt.h: regions per persist neighbourhood


def persist_span(gran):
    """Regions per persist neighbourhood: the map file is made durable in
    aligned runs of CBT_PERSIST_SPAN regions (2 MiB at 64 KiB, 128 KiB at
    4 KiB), whatever the granularity."""
    return CBT_PERSIST_SPAN


def check_superset(got, want, gran, touched=None):
    """After kill -9 the map is a superset of the acknowledged writes (want),
    exact to the persist neighbourhood: every extra region shares a 2 MiB
    neighbourhood with a region written (touched: acknowledged or in flight;
    default want)."""
    span = persist_span(gran)
    missing = want - got
    assert not missing, (f"{len(missing)} regions written by acknowledged writes are not "
                         f"marked after kill -9, e.g. {sorted(missing)[:10]}")
    near = {g // span for g in (want if touched is None else touched)}
    stray = sorted(g for g in got - want if g // span not in near)
    assert not stray, (f"{len(stray)} regions marked after kill -9 outside the 2 MiB "
                       f"neighbourhood of any write, e.g. {stray[:10]}")


def check_exact(d, name, ios, gran, size):
    got, js = dirty_granules(d, name)
    want = granules(ios, gran, size)
    assert js["granularity"] == gran
    assert got == want, (f"dirty regions differ: missing {sorted(want - got)[:20]}, "
                         f"extra {sorted(got - want)[:20]}")
    assert js["extents"] == expected_extents(want, gran, size)
    assert js["dirty_regions"] == len(want)
    assert js["dirty_bytes"] == min(len(want) * gran, size)
    return js


IOS = [(1000, 3333), (64 * KiB - 1, 2), (10 * MiB + 7, 200000), (100 * MiB, 64 * KiB),
       (255 * MiB + 12345, 1)]


def write_ios(d, name, ios, pattern=0x5c):
    d.qemu_io(name, *[f"write -P {pattern:#x} {o} {n}" for o, n in ios])


def test_dirty_map_exact(ferryd):
    size, gran = 256 * MiB, 64 * KiB
    js = ferryd.create("cbt", "256M")
    assert js["cbt"]["enabled"] is True
    assert js["cbt"]["granularity"] == gran
    assert js["cbt"]["state"] in ("created", "ok")
    check_exact(ferryd, "cbt", [], gran, size)

    write_ios(ferryd, "cbt", IOS)
    # Trim and write-zeroes change data too: they are marked.
    ferryd.qemu_io("cbt", f"discard {200 * MiB} {128 * KiB}", f"write -z {150 * MiB + 4096} 4096")
    ios = IOS + [(200 * MiB, 128 * KiB), (150 * MiB + 4096, 4096)]
    js = check_exact(ferryd, "cbt", ios, gran, size)
    # Reads mark nothing.
    ferryd.qemu_io("cbt", f"read 0 {4 * MiB}", f"read {50 * MiB} {MiB}")
    check_exact(ferryd, "cbt", ios, gran, size)

    # The CLI and the DISK object agree with the API.
    cli = ferryd.cli("disk", "dirty", "cbt", json_out=True)
    assert cli["extents"] == js["extents"] and cli["generation"] == js["generation"]
    disk = ferryd.disk("cbt")
    assert disk["dirty_bytes"] == js["dirty_bytes"]
    assert disk["cbt"]["dirty_regions"] == js["dirty_regions"]
    assert ferryd.cli("disk", "dirty", "cbt").stdout.strip(), "ferry disk dirty printed nothing"


def test_dirty_map_other_granularity(ferryd):
    size, gran = 64 * MiB, 4 * KiB
    js = ferryd.create("g4k", "64M", granularity="4K")
    assert js["cbt"]["granularity"] == gran
    ios = [(1000, 3333), (8191, 2), (40 * MiB + 100, 10000)]
    write_ios(ferryd, "g4k", ios)
    check_exact(ferryd, "g4k", ios, gran, size)


def test_swap_returns_old_map_and_clears(ferryd):
    size, gran = 256 * MiB, 64 * KiB
    ferryd.create("sw", "256M")
    write_ios(ferryd, "sw", IOS)
    before = check_exact(ferryd, "sw", IOS, gran, size)
    gen = before["generation"]

    old = ferryd.api_ok("POST", "/v1/disks/sw/dirty/swap")
    assert old["extents"] == before["extents"]
    assert old["generation"] == gen
    after = ferryd.dirty("sw")
    assert after["extents"] == [] and after["dirty_bytes"] == 0
    assert after["generation"] == gen + 1

    ios2 = [(5 * MiB, 1), (7 * MiB + 65535, 2)]
    write_ios(ferryd, "sw", ios2)
    check_exact(ferryd, "sw", ios2, gran, size)
    # The CLI swap does the same.
    old2 = ferryd.cli("disk", "dirty", "sw", "--swap", json_out=True)
    assert extents_to_granules(old2["extents"], gran) == granules(ios2, gran, size)
    assert old2["generation"] == gen + 1
    assert ferryd.dirty("sw")["generation"] == gen + 2
    check_exact(ferryd, "sw", [], gran, size)


def test_swap_survives_restart(ferryd):
    """A swap is durable: after SIGTERM + restart the clean map stays clean."""
    size, gran = 256 * MiB, 64 * KiB
    ferryd.create("swr", "256M")
    write_ios(ferryd, "swr", IOS)
    ferryd.api_ok("POST", "/v1/disks/swr/dirty/swap")
    ios2 = [(3 * MiB, 10)]
    write_ios(ferryd, "swr", ios2)
    ferryd.restart()
    check_exact(ferryd, "swr", ios2, gran, size)


def test_exact_after_sigterm_restart(ferryd):
    size, gran = 256 * MiB, 64 * KiB
    ferryd.create("rs", "256M")
    write_ios(ferryd, "rs", IOS)
    before = check_exact(ferryd, "rs", IOS, gran, size)
    ferryd.restart()
    after = check_exact(ferryd, "rs", IOS, gran, size)
    assert after["generation"] == before["generation"]
    assert ferryd.disk("rs")["cbt"]["state"] == "ok"
    # And the data is there.
    ferryd.qemu_io("rs", *[f"read -P 0x5c {o} {n}" for o, n in IOS])


def _plan_writes(size, count, seed):
    """count writes of assorted sizes in distinct 128 KiB slots (no two
    overlap, so the data each leaves is unambiguous even when they race on
    different connections): [(off, len, byte)]."""
    rng = random.Random(seed)
    slot = 128 * KiB
    out = []
    for s in rng.sample(range(size // slot), count):
        ln = rng.choice([1, 512, 4096, 5000, 65536, 100000])
        off = s * slot + rng.randrange(0, slot - ln + 1)
        out.append((off, ln, rng.randrange(1, 256)))
    return out


def _burst_libnbd(uri, plan):
    """The planned writes with up to 64 in flight over 4 connections; returns
    the handles (left open: no flush, no disconnect, so the kill comes with
    nothing synced by the client) and the writes whose completion reported
    success, i.e. the writes ferryd acknowledged."""
    import nbd
    handles = []
    for _ in range(4):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    acked = []
    pending = []

    def reap(entry):
        h, cookie, w, _buf = entry
        while not h.aio_command_completed(cookie):   # raises if the write failed
            h.poll(-1)
        acked.append(w)

    for i, (off, ln, byte) in enumerate(plan):
        h = handles[i % len(handles)]
        buf = nbd.Buffer.from_bytearray(bytearray([byte]) * ln)
        pending.append((h, h.aio_pwrite(buf, off), (off, ln, byte), buf))
        if len(pending) >= 64:
            reap(pending.pop(0))
    for entry in pending:
        reap(entry)
    return handles, acked


def test_kill9_after_acknowledged_writes(ferryd):
    """Every region written by an acknowledged write is marked after kill -9,
    and the acknowledged data is there."""
    size, gran = 1 * GiB, 64 * KiB
    ferryd.create("k9", "1G")
    write_ios(ferryd, "k9", [(0, 1)])
    ferryd.api_ok("POST", "/v1/disks/k9/dirty/swap")   # generation 1, clean
    handles = []
    if have_libnbd():
        handles, acked = _burst_libnbd(ferryd.uri("k9"), _plan_writes(size, 2000, seed=9))
    else:
        need("qemu-io")   # each qemu-io command that returned was acknowledged
        acked = _plan_writes(size, 300, seed=9)
        ferryd.qemu_io("k9", *[f"write -P {b:#x} {o} {n}" for o, n, b in acked])
    assert len(acked) >= 300
    ferryd.kill9()
    del handles   # libnbd closes a handle when it is collected
    ferryd.start()

    got, js = dirty_granules(ferryd, "k9")
    assert js["granularity"] == gran
    want = granules([(o, n) for o, n, _ in acked], gran, size)
    missing = want - got
    assert not missing, f"{len(missing)} written regions not marked after kill -9, e.g. {sorted(missing)[:10]}"
    state = ferryd.disk("k9")["cbt"]["state"]
    if state == "ok":
        # Closed cleanly after all (no write since the last clean map): exact.
        assert got == want, f"extra regions marked: {sorted(got - want)[:10]}"
    else:
        # Writes since the swap, no clean close: the file is exact only to the
        # 2 MiB neighbourhood of each write (every write was acknowledged).
        assert state.startswith("recovered: unclean shutdown"), state
        check_superset(got, want, js["granularity"])

    # Acknowledged data survived the kill.
    sample = random.Random(1).sample(acked, 200)
    if have_libnbd():
        import nbd
        h = nbd.NBD()
        h.connect_uri(ferryd.uri("k9"))
        try:
            for off, ln, byte in sample:
                data = h.pread(ln, off)
                assert data == bytes([byte]) * ln, f"acknowledged write at {off}+{ln} lost after kill -9"
        finally:
            h.shutdown()
    else:
        ferryd.qemu_io("k9", *[f"read -P {b:#x} {o} {n}" for o, n, b in sample])


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_kill9_in_the_middle_of_a_burst(ferryd, seed):
    """kill -9 is sent from inside libnbd's completion callback of the 1500th
    acknowledged write, while up to 64 more are in flight on 4 connections:
    every write acknowledged before the kill is marked in the map and its data
    is there (writes still in flight may or may not be)."""
    if not have_libnbd():
        pytest.skip("python3-libnbd is not installed (scripts/setup.sh installs it)")
    import nbd
    # 4 TiB (sparse): 2052 bit pages, so each commit writes many pages and
    # the window between a mark and its commit is wide enough to matter.
    size, gran, kill_at = 4096 * GiB, 64 * KiB, 1500
    ferryd.create("mid", "4T")
    ferryd.api_ok("POST", "/v1/disks/mid/dirty/swap")
    plan = iter(_plan_writes(size, 4000, seed=seed))
    handles = []
    for _ in range(4):
        h = nbd.NBD()
        h.connect_uri(ferryd.uri("mid"))
        handles.append(h)
    pid = ferryd.pid
    acked, bufs, issued = [], [], []
    state = {"killed": False}

    def completion(w):
        def cb(err):
            if err.value == 0 and not state["killed"]:
                acked.append(w)
                if len(acked) == kill_at:
                    os.kill(pid, signal.SIGKILL)
                    state["killed"] = True
            return 1
        return cb

    deadline = time.monotonic() + 120
    try:
        while not state["killed"]:
            assert time.monotonic() < deadline, "burst did not complete"
            for h in handles:
                while h.aio_in_flight() < 16:
                    off, ln, byte = next(plan)
                    buf = nbd.Buffer.from_bytearray(bytearray([byte]) * ln)
                    bufs.append(buf)
                    issued.append((off, ln))
                    h.aio_pwrite(buf, off, completion=completion((off, ln, byte)))
            rd, wr = [], []
            for h in handles:
                d = h.aio_get_direction()
                if d & nbd.AIO_DIRECTION_READ:
                    rd.append(h.aio_get_fd())
                if d & nbd.AIO_DIRECTION_WRITE:
                    wr.append(h.aio_get_fd())
            r, w, _ = select.select(rd, wr, [], 5)
            for h in handles:
                fd = h.aio_get_fd()
                if fd in r:
                    h.aio_notify_read()
                if fd in w and not state["killed"]:
                    h.aio_notify_write()
                if state["killed"]:
                    break
    except nbd.Error:
        assert state["killed"], "a write failed before the kill"
    assert len(acked) == kill_at
    ferryd.kill9()   # reaps the process, checks its log
    del handles, bufs
    ferryd.start()
    got, js = dirty_granules(ferryd, "mid")
    assert js["granularity"] == gran
    want = granules([(o, n) for o, n, _ in acked], gran, size)
    missing = want - got
    assert not missing, (f"{len(missing)} regions written by acknowledged writes are not marked "
                         f"after kill -9, e.g. {sorted(missing)[:10]}")
    state = ferryd.disk("mid")["cbt"]["state"]
    assert state.startswith("recovered: unclean shutdown"), state
    # Extra regions: only around writes acknowledged or in flight at the kill.
    check_superset(got, want, js["granularity"], touched=granules(issued, gran, size))
    h = nbd.NBD()
    h.connect_uri(ferryd.uri("mid"))
    try:
        for off, ln, byte in acked:
            assert h.pread(ln, off) == bytes([byte]) * ln, f"acknowledged write at {off}+{ln} lost"
    finally:
        h.shutdown()


def test_swap_under_load_loses_nothing(ferryd):
    """Swaps taken while 4 connections keep writing (each write to regions of
    its own): every write is in some map; a write acknowledged before a swap
    was asked for is in that swap's map or an earlier one; a write sent after
    a swap returned is in no map up to that one.  (A write may show up in two
    consecutive maps: a NOWAIT attempt marks, gives up, and the worker marks
    again after the swap.  That is a harmless superset.)"""
    if not have_libnbd():
        pytest.skip("python3-libnbd is not installed (scripts/setup.sh installs it)")
    import threading
    import nbd
    size, gran = 1 * GiB, 64 * KiB
    ferryd.create("swl", "1G")
    plan = iter(_plan_writes(size, 3000, seed=5))
    handles = []
    for _ in range(4):
        h = nbd.NBD()
        h.connect_uri(ferryd.uri("swl"))
        handles.append(h)
    writes = []          # [off, len, t_submit, t_done]
    bufs = []
    swaps = []           # (t_start, t_end, granules)
    stop = threading.Event()
    errors = []

    def swapper():
        try:
            while not stop.is_set():
                time.sleep(0.02)
                t0 = time.monotonic()
                js = ferryd.api_ok("POST", "/v1/disks/swl/dirty/swap")
                swaps.append((t0, time.monotonic(), extents_to_granules(js["extents"], gran)))
        except BaseException as e:   # noqa: B902 - reported below
            errors.append(e)

    def completion(rec):
        def cb(err):
            if err.value == 0:
                rec[3] = time.monotonic()
            return 1
        return cb

    th = threading.Thread(target=swapper)
    th.start()
    try:
        exhausted = False
        while True:
            for h in handles:
                while not exhausted and h.aio_in_flight() < 16:
                    try:
                        off, ln, byte = next(plan)
                    except StopIteration:
                        exhausted = True
                        break
                    rec = [off, ln, time.monotonic(), None]
                    writes.append(rec)
                    buf = nbd.Buffer.from_bytearray(bytearray([byte]) * ln)
                    bufs.append(buf)
                    h.aio_pwrite(buf, off, completion=completion(rec))
            if exhausted and all(h.aio_in_flight() == 0 for h in handles):
                break
            rd = [h.aio_get_fd() for h in handles if h.aio_get_direction() & nbd.AIO_DIRECTION_READ]
            wr = [h.aio_get_fd() for h in handles if h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE]
            r, w, _ = select.select(rd, wr, [], 5)
            for h in handles:
                if h.aio_get_fd() in r:
                    h.aio_notify_read()
                if h.aio_get_fd() in w:
                    h.aio_notify_write()
    finally:
        stop.set()
        th.join()
        for h in handles:
            h.shutdown()
    assert not errors, errors
    assert len(swaps) >= 2, "the burst ended before two swaps were taken"
    maps = [g for _, _, g in swaps] + [dirty_granules(ferryd, "swl")[0]]
    for off, ln, t_sub, t_done in writes:
        assert t_done is not None, f"write at {off} failed"
        regs = granules([(off, ln)], gran, size)
        assert regs <= set().union(*maps), f"write {off}+{ln} is in no map"
        for k, (t0, t1, _) in enumerate(swaps):
            if t_done < t0:
                assert regs <= set().union(*maps[:k + 1]), \
                    f"write {off}+{ln} acknowledged before swap {k} was asked is not in maps 0..{k}"
            if t_sub > t1:
                assert not regs & set().union(*maps[:k + 1]), \
                    f"write {off}+{ln} sent after swap {k} returned is in a map up to {k}"
    # Nothing else is marked.
    allw = granules([(o, n) for o, n, _, _ in writes], gran, size)
    assert set().union(*maps) == allw


def _read_header(path):
    raw = path.read_bytes()
    assert raw[:8] == b"FERRYCBT", f"map file {path} has no FERRYCBT magic"
    return raw


def test_corrupt_header_refused_all_dirty(ferryd):
    size = 256 * MiB
    ferryd.create("bad", "256M")
    write_ios(ferryd, "bad", IOS)
    ferryd.stop()
    path = ferryd.map_path("bad")
    raw = bytearray(_read_header(path))
    raw[40] ^= 0xff   # the generation field, covered by the header checksum
    path.write_bytes(raw)
    ferryd.start()
    disk = ferryd.disk("bad")
    state = disk["cbt"]["state"]
    assert state.startswith("recovered"), f"corrupt map accepted: state {state!r}"
    assert len(state) > len("recovered: "), "no reason given"
    js = ferryd.dirty("bad")
    assert js["dirty_bytes"] == size, "a corrupt map must leave the whole disk dirty"
    assert js["extents"] == [{"offset": 0, "length": size}]
    refusals = [ln for ln in ferryd.log().splitlines() if "bad" in ln and "refused" in ln]
    assert refusals, "ferryd did not log that it refused the map of disk 'bad'"
    assert "checksum" in refusals[0] or "checksum" in state, (refusals, state)
    # The disk is served all the same, data intact.
    ferryd.qemu_io("bad", *[f"read -P 0x5c {o} {n}" for o, n in IOS])
    # After a clean restart the (now written anew) map is trusted and still all dirty.
    ferryd.restart()
    assert ferryd.dirty("bad")["dirty_bytes"] == size


def test_corrupt_page_refuses_only_that_page(ferryd):
    """4 GiB at 64 KiB = 65536 regions = 3 bit pages (file pages 1-3, 32704
    regions each; src/disk/cbt.h).  A bad file page 2 marks its regions
    dirty and leaves pages 1 and 3 exact."""
    size, gran = 4 * GiB, 64 * KiB
    per_page = (4096 - 8) * 8
    ferryd.create("pg", "4G")
    # regions 0 (file page 1), 40000 (page 2) and 65500 (page 3)
    ios = [(1000, 1), (40000 * gran + 5, 10), (65500 * gran + 7, 100)]
    write_ios(ferryd, "pg", ios)
    ferryd.stop()
    path = ferryd.map_path("pg")
    raw = bytearray(_read_header(path))
    assert len(raw) == 4 * 4096, f"map file of {len(raw)} bytes for a header and 3 bit pages"
    raw[2 * 4096 + 100] ^= 0x01       # a bit in file page 2: its checksum now fails
    path.write_bytes(raw)
    ferryd.start()
    state = ferryd.disk("pg")["cbt"]["state"]
    assert state.startswith("recovered"), state
    got, _ = dirty_granules(ferryd, "pg")
    want = granules(ios, gran, size) | set(range(per_page, 2 * per_page))
    assert got == want, (f"missing {sorted(want - got)[:10]} extra {sorted(got - want)[:10]}")
    # The map was rewritten: a clean restart keeps exactly that.
    ferryd.restart()
    assert dirty_granules(ferryd, "pg")[0] == want
    assert ferryd.disk("pg")["cbt"]["state"] == "ok"


def test_truncated_map_refused(ferryd):
    size = 64 * MiB
    ferryd.create("tr", "64M")
    write_ios(ferryd, "tr", [(0, 1)])
    ferryd.stop()
    path = ferryd.map_path("tr")
    raw = _read_header(path)
    path.write_bytes(raw[:100])
    ferryd.start()
    assert ferryd.disk("tr")["cbt"]["state"].startswith("recovered")
    assert ferryd.dirty("tr")["dirty_bytes"] == size


def test_missing_map_all_dirty(ferryd):
    """A map file that vanished cannot vouch for anything."""
    size = 64 * MiB
    ferryd.create("gone", "64M")
    write_ios(ferryd, "gone", [(0, 1)])
    ferryd.stop()
    ferryd.map_path("gone").unlink()
    ferryd.start()
    assert ferryd.disk("gone")["cbt"]["state"].startswith("recovered")
    assert ferryd.dirty("gone")["dirty_bytes"] == size


def test_no_cbt_daemon_then_cbt_back_all_dirty(ferryd):
    """Writes served with --no-cbt are not tracked, so when CBT comes back the
    map must be all dirty (docs/cli.md)."""
    size = 64 * MiB
    ferryd.create("nc", "64M")
    ferryd.api_ok("POST", "/v1/disks/nc/dirty/swap")
    ferryd.stop()
    ferryd.start(extra_args=["--no-cbt", "--no-heat"])
    assert ferryd.disk("nc")["cbt"]["enabled"] is False
    write_ios(ferryd, "nc", [(5 * MiB, 1)])
    ferryd.stop()
    ferryd.start(extra_args=[])
    d = ferryd.disk("nc")
    assert d["cbt"]["enabled"] is True
    assert ferryd.dirty("nc")["dirty_bytes"] == size, d["cbt"]
