"""The REST API and the ferry CLI: disk life cycle, persistence, errors,
write limit, heat/trace/stats."""
import json
import os
import signal
import time

import pytest

from conftest import FERRY, FERRYD, GiB, KiB, MiB, RawNbdClient, run, sanitizer_report


def err_code(js):
    assert isinstance(js, dict) and "error" in js, f"error body not structured: {js}"
    e = js["error"]
    assert isinstance(e.get("code"), str) and isinstance(e.get("message"), str) and e["message"], e
    return e["code"]


def test_health_and_status(ferryd):
    h = ferryd.api_ok("GET", "/v1/health")
    assert h["status"] == "ok"
    assert h["pid"] == ferryd.pid
    assert h["nbd"] == f"unix:{ferryd.sock}"
    assert h["disks"] == 0
    assert h["version"]
    st = ferryd.cli("status", json_out=True)
    assert st["pid"] == ferryd.pid
    assert ferryd.cli("status").stdout.strip()
    assert ferryd.cli("version").stdout.strip()


def test_disk_lifecycle_cli(ferryd):
    d = ferryd.create("vm1", "10G")
    assert d["name"] == "vm1" and d["size"] == 10 * GiB
    assert d["owned"] is True and d["block_device"] is False
    assert d["image"] == str(ferryd.image_path("vm1"))
    assert d["clients"] == 0 and d["dirty_bytes"] == 0
    assert d["nbd_uri"] == ferryd.uri("vm1")
    img = ferryd.image_path("vm1")
    assert img.stat().st_size == 10 * GiB
    assert img.stat().st_blocks * 512 < 10 * MiB, "created image must be sparse"
    ferryd.create("vm0", "1M", granularity="1M")

    lst = ferryd.cli("disk", "list", json_out=True)
    assert [x["name"] for x in lst["disks"]] == ["vm0", "vm1"], "list sorted by name"
    table = ferryd.cli("disk", "list").stdout
    assert "vm0" in table and "vm1" in table and "NAME" in table

    show = ferryd.cli("disk", "show", "vm1", json_out=True)
    assert show["name"] == "vm1" and show["size"] == 10 * GiB
    text = ferryd.cli("disk", "show", "vm1").stdout
    assert "vm1" in text and "10" in text

    rm = ferryd.cli("disk", "rm", "vm1", json_out=True)
    assert rm == {"removed": "vm1", "image_deleted": True}
    assert not img.exists(), "ferry-created image must be deleted by rm"
    assert not ferryd.map_path("vm1").exists(), "dirty map must be deleted by rm"
    assert [x["name"] for x in ferryd.cli("disk", "list", json_out=True)["disks"]] == ["vm0"]
    st, js = ferryd.api("GET", "/v1/disks/vm1")
    assert st == 404 and err_code(js) == "not_found"


def test_disk_add_existing_image(ferryd, tmp_path):
    img = tmp_path / "existing.raw"
    data = bytes(range(256)) * 4096          # 1 MiB of a known pattern
    img.write_bytes(data)
    os.truncate(img, 8 * MiB)
    d = ferryd.cli("disk", "add", "ext", "--image", img, json_out=True)
    assert d["owned"] is False and d["size"] == 8 * MiB and d["image"] == str(img)
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", ferryd.uri("ext"), tmp_path / "back.raw"])
    assert (tmp_path / "back.raw").read_bytes()[:MiB] == data
    ferryd.wait_idle("ext")
    rm = ferryd.cli("disk", "rm", "ext", json_out=True)
    assert rm == {"removed": "ext", "image_deleted": False}
    assert img.exists() and img.read_bytes()[:MiB] == data, "an added image must be left in place"

    # The API takes the same, and a missing image is refused.
    st, js = ferryd.api("POST", "/v1/disks", {"name": "ext2", "image": str(tmp_path / "nope.raw")})
    assert st in (400, 404), (st, js)
    err_code(js)


def test_persistence_across_restart(ferryd):
    ferryd.create("p1", "1G")
    ferryd.create("p2", "2G", granularity="256K")
    ferryd.qemu_io("p1", "write -P 0x61 4096 4096")
    before = {d["name"]: d for d in ferryd.cli("disk", "list", json_out=True)["disks"]}
    ferryd.restart()
    after = {d["name"]: d for d in ferryd.cli("disk", "list", json_out=True)["disks"]}
    assert set(after) == {"p1", "p2"}
    for n in after:
        for k in ("size", "image", "owned", "nbd_uri"):
            assert after[n][k] == before[n][k], (n, k)
        assert after[n]["cbt"]["granularity"] == before[n]["cbt"]["granularity"]
    assert after["p2"]["cbt"]["granularity"] == 256 * KiB
    assert after["p1"]["dirty_bytes"] == 64 * KiB
    ferryd.qemu_io("p1", "read -P 0x61 4096 4096")
    h = ferryd.api_ok("GET", "/v1/health")
    assert h["disks"] == 2


def test_errors_api(ferryd):
    ferryd.create("dup", "1M")
    cases = [
        ("POST", "/v1/disks", {"name": "dup", "size": "1M"}, 409, "already_exists"),
        ("POST", "/v1/disks", {"name": "s1", "size": "12Q"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s2", "size": 0}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s3", "size": -1}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s4", "size": "20E"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s5", "size": "abc"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s6"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s7", "size": "1M", "image": "/x"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s8", "size": "1M", "bogus": 1}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s9", "size": "1M", "cbt_granularity": "3K"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "s10", "size": "1M", "cbt_granularity": "2K"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "../etc", "size": "1M"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "a/b", "size": "1M"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "a b", "size": "1M"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "", "size": "1M"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "-x", "size": "1M"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": "x" * 65, "size": "1M"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", {"name": 7, "size": "1M"}, 400, "invalid_argument"),
        ("POST", "/v1/disks", [1, 2], 400, "invalid_argument"),
        ("GET", "/v1/disks/nosuch", None, 404, "not_found"),
        ("DELETE", "/v1/disks/nosuch", None, 404, "not_found"),
        ("GET", "/v1/disks/nosuch/dirty", None, 404, "not_found"),
        ("POST", "/v1/disks/nosuch/dirty/swap", None, 404, "not_found"),
        ("GET", "/v1/disks/nosuch/heat", None, 404, "not_found"),
        ("GET", "/v1/disks/nosuch/trace", None, 404, "not_found"),
        ("PUT", "/v1/disks/nosuch/write-limit", {"bytes_per_sec": "1M"}, 404, "not_found"),
        ("PUT", "/v1/disks/dup/write-limit", {"bytes_per_sec": "fast"}, 400, "invalid_argument"),
        ("PUT", "/v1/disks/dup/write-limit", {}, 400, "invalid_argument"),
        ("GET", "/v1/nosuchroute", None, 404, "not_found"),
        ("DELETE", "/v1/health", None, 405, "method_not_allowed"),
        ("PUT", "/v1/disks", {"name": "x", "size": "1M"}, 405, "method_not_allowed"),
    ]
    for method, path, body, status, code in cases:
        st, js = ferryd.api(method, path, body)
        assert (st, err_code(js) if st >= 400 else None) == (status, code), \
            f"{method} {path} {body!r} -> {st} {js}, expected {status} {code}"
    # Nothing was created by the refused requests.
    assert [d["name"] for d in ferryd.api_ok("GET", "/v1/disks")["disks"]] == ["dup"]
    assert sorted(os.listdir(ferryd.data_dir / "disks")) == ["dup.img"]


def test_errors_malformed_and_oversize(ferryd):
    for raw in (b"{", b"not json", b'{"name": "x", "size": }', b"\xff\xfe", b""):
        st, js = ferryd.api("POST", "/v1/disks", raw=raw)
        assert st == 400 and err_code(js) == "invalid_argument", (raw, st, js)
    big = b'{"name": "big", "size": "1M", "pad": "' + b"x" * (2 * MiB) + b'"}'
    st, js = ferryd.api("POST", "/v1/disks", raw=big)
    assert st == 413 and err_code(js) == "payload_too_large", (st, js)
    # Still serving after all that.
    ferryd.create("fine", "1M")
    assert ferryd.api("GET", "/v1/disks/big")[0] == 404


def test_errors_cli(ferryd):
    ferryd.create("c1", "1M")
    p = ferryd.cli("disk", "create", "c1", "--size", "1M", check=False)
    assert p.returncode == 1 and "ferry: already_exists:" in p.stderr, (p.returncode, p.stderr)
    p = ferryd.cli("disk", "show", "nosuch", check=False)
    assert p.returncode == 1 and "ferry: not_found:" in p.stderr, (p.returncode, p.stderr)
    p = ferryd.cli("disk", "create", "bad/name", "--size", "1M", check=False)
    assert p.returncode in (1, 2) and p.stderr.strip(), (p.returncode, p.stderr)
    p = ferryd.cli("disk", "create", "c2", "--size", "lots", check=False)
    assert p.returncode in (1, 2) and p.stderr.strip(), (p.returncode, p.stderr)
    p = ferryd.cli("disk", "frobnicate", check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    p = ferryd.cli("disk", "create", "c3", check=False)      # no --size
    assert p.returncode == 2, (p.returncode, p.stderr)
    # The daemon is not there: exit 3.
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = run([FERRY, "--api", f"http://127.0.0.1:{port}", "disk", "list"], check=False)
    assert p.returncode == 3, (p.returncode, p.stderr)
    # $FERRY_API is honoured.
    p = run([FERRY, "-o", "json", "disk", "list"], env={**os.environ, "FERRY_API": ferryd.api_url})
    assert [d["name"] for d in json.loads(p.stdout)["disks"]] == ["c1"]
    assert ferryd.cli("--help").stdout.strip()
    assert ferryd.cli("disk", "--help").stdout.strip()


def test_rm_busy_and_force(ferryd_any):
    d = ferryd_any
    d.create("busy", "16M")
    d.qemu_io("busy", "write -P 0x33 0 4096")
    d.wait_idle("busy")
    c = RawNbdClient(d, "busy")
    assert c.size == 16 * MiB
    assert c.read(0, 4096) == b"\x33" * 4096
    assert d.disk("busy")["clients"] == 1
    st, js = d.api("DELETE", "/v1/disks/busy")
    assert st == 409 and err_code(js) == "busy", (st, js)
    p = d.cli("disk", "rm", "busy", check=False)
    assert p.returncode == 1 and "busy" in p.stderr
    assert d.disk("busy")["clients"] == 1, "a refused rm must change nothing"
    assert c.read(4096, 512) == bytes(512)

    rm = d.cli("disk", "rm", "busy", "--force", json_out=True)
    assert rm == {"removed": "busy", "image_deleted": True}
    assert c.closed_by_server(), "forced rm must end the client's connection"
    c.close()
    assert d.api("GET", "/v1/disks/busy")[0] == 404
    # A new client cannot open it.
    with pytest.raises(OSError):
        RawNbdClient(d, "busy")


def test_clients_count_goes_back_to_zero(ferryd):
    ferryd.create("cc", "1M")
    cs = [RawNbdClient(ferryd, "cc") for _ in range(3)]
    for c in cs:
        c.read(0, 512)   # a reply proves the server has attached the client
    assert ferryd.disk("cc")["clients"] == 3
    for c in cs:
        c.close()
    deadline = time.monotonic() + 10
    while ferryd.disk("cc")["clients"] != 0:
        assert time.monotonic() < deadline, "client count stuck after disconnect"
        time.sleep(0.05)
    ferryd.cli("disk", "rm", "cc")


def _timed_writes(d, name, count, size):
    t0 = time.monotonic()
    d.qemu_io(name, *[f"write -P 0x7 {i * size} {size}" for i in range(count)], timeout=600)
    return time.monotonic() - t0


def test_write_limit_applied_and_persisted(ferryd):
    rate = 1 * MiB
    ferryd.create("wl", "64M")
    d = ferryd.cli("disk", "limit", "wl", "--write", "1M", json_out=True)
    assert d["write_limit_bps"] == rate
    # 48 writes of 64 KiB = 3 MiB at 1 MiB/s: the last one cannot start before
    # (3 MiB - 64 KiB) / rate, less a burst allowance of 100 ms.
    n, sz = 48, 64 * KiB
    lower = (n * sz - sz) / rate - 0.1
    took = _timed_writes(ferryd, "wl", n, sz)
    assert took >= lower * 0.95, f"{n * sz} bytes at {rate} B/s took only {took:.2f}s (>= {lower:.2f}s expected)"
    assert ferryd.disk("wl")["throttled_ms"] > 0

    ferryd.restart()
    assert ferryd.disk("wl")["write_limit_bps"] == rate, "write limit lost across restart"
    took = _timed_writes(ferryd, "wl", n, sz)
    assert took >= lower * 0.95, f"limit not applied after restart: {took:.2f}s"

    # The API sets it too; 0 turns it off (and that persists as well).
    d = ferryd.api_ok("PUT", "/v1/disks/wl/write-limit", {"bytes_per_sec": 0})
    assert d["write_limit_bps"] == 0
    d = ferryd.api_ok("PUT", "/v1/disks/wl/write-limit", {"bytes_per_sec": "512K"})
    assert d["write_limit_bps"] == 512 * KiB
    d = ferryd.api_ok("PUT", "/v1/disks/wl/write-limit", {"bytes_per_sec": 0})
    ferryd.restart()
    assert ferryd.disk("wl")["write_limit_bps"] == 0


def test_stats_heat_trace_reflect_io(ferryd):
    ferryd.create("st", "1G")
    writes = [(5 * MiB + i * 8192 + 7, 1000 + i) for i in range(7)]   # all in heat region 5
    ferryd.qemu_io("st", *[f"write -P 0x1 {o} {n}" for o, n in writes])
    k, nbytes = len(writes), sum(n for _, n in writes)
    reads = [(300 * MiB, 4096), (300 * MiB + 65536, 8192)]
    ferryd.qemu_io("st", *[f"read {o} {n}" for o, n in reads])

    d = ferryd.disk("st")
    ops, byts = d["stats"]["ops"], d["stats"]["bytes"]
    assert ops["write"] == k, ops
    assert byts["write"] == nbytes, byts
    assert ops["read"] == len(reads), ops
    assert byts["read"] == sum(n for _, n in reads), byts
    assert ops["trim"] == 0 and ops["zero"] == 0
    assert d["stats"]["latency_us"]["write"]["count"] == k
    assert d["stats"]["latency_us"]["read"]["count"] == len(reads)
    lat = d["stats"]["latency_us"]["write"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]

    # Heat: 1 GiB -> 1 MiB regions; all writes in region 5, reads in region 300.
    deadline = time.monotonic() + 10
    while True:
        h = ferryd.api_ok("GET", "/v1/disks/st/heat?all=true&top=3")
        regions = {r["offset"]: r for r in h["all"]}
        if regions[5 * MiB]["write_heat"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert h["region_size"] == MiB and h["regions"] == 1024 and len(h["all"]) == 1024
    assert h["half_life_s"] == 300
    r5 = regions[5 * MiB]
    assert (r5["writes"], r5["write_bytes"], r5["reads"]) == (k, nbytes, 0), r5
    assert r5["write_heat"] > 0, "heat never folded in"
    r300 = regions[300 * MiB]
    assert (r300["reads"], r300["read_bytes"], r300["writes"]) == (len(reads), 12288, 0), r300
    others = [r for off, r in regions.items() if off not in (5 * MiB, 300 * MiB)]
    assert all(r["writes"] == 0 and r["reads"] == 0 for r in others)
    assert h["top"][0]["offset"] == 5 * MiB, h["top"]
    assert len(h["top"]) <= 3
    assert d["heat"]["region_size"] == MiB

    cli = ferryd.cli("disk", "heat", "st", "--top", "2", json_out=True)
    assert cli["top"][0]["offset"] == 5 * MiB and len(cli["top"]) <= 2

    # Trace: what is sampled is what was done, oldest first.
    t = ferryd.api_ok("GET", "/v1/disks/st/trace?max=1000")
    done = {("write", o, n) for o, n in writes} | {("read", o, n) for o, n in reads}
    seqs = [e["seq"] for e in t["entries"]]
    assert seqs == sorted(seqs)
    io = [e for e in t["entries"] if e["kind"] in ("read", "write")]
    for e in io:
        assert (e["kind"], e["offset"], e["length"]) in done, e
    if t["sample_every"] == 1:
        assert [(e["kind"], e["offset"], e["length"]) for e in io] == \
            [("write", o, n) for o, n in writes] + [("read", o, n) for o, n in reads]
    t2 = ferryd.api_ok("GET", "/v1/disks/st/trace?max=2")
    assert len(t2["entries"]) <= 2
    assert ferryd.cli("disk", "trace", "st", "--max", "5").returncode == 0

    # Rates over the last minute see the writes.
    deadline = time.monotonic() + 10
    while ferryd.disk("st")["stats"]["write_iops_60s"] <= 0:
        assert time.monotonic() < deadline, "write_iops_60s stayed 0"
        time.sleep(0.2)

    # Counters survive nothing but are exact: K more writes add exactly K.
    ferryd.qemu_io("st", "write 0 512", "write 512 512")
    assert ferryd.disk("st")["stats"]["ops"]["write"] == k + 2


def test_second_ferryd_on_same_data_dir_refused(ferryd):
    """Two daemons on one data dir would each keep half of the dirty map."""
    ferryd.create("one", "1M")
    p = run([FERRYD, "--data-dir", ferryd.data_dir, "--api", "127.0.0.1:0",
             "--nbd", f"unix:{ferryd.tmp / 'other.sock'}"], check=False, timeout=60)
    out = (p.stdout + p.stderr).lower()
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "lock" in out or "already" in out or "another" in out, out
    assert sanitizer_report(out) is None, out
    # The first one is untouched and still serving.
    assert json.loads((ferryd.data_dir / "ferryd.json").read_text())["pid"] == ferryd.pid
    assert ferryd.disk("one")["size"] == MiB


def test_missing_image_left_out_then_removable(ferryd, tmp_path):
    img = tmp_path / "vanishing.raw"
    img.write_bytes(bytes(4 * MiB))
    ferryd.cli("disk", "add", "van", "--image", img)
    ferryd.create("stay", "1M")
    ferryd.stop()
    img.unlink()
    ferryd.start()
    names = [d["name"] for d in ferryd.cli("disk", "list", json_out=True)["disks"]]
    assert names == ["stay"], names
    assert any("van" in ln and str(img) in ln for ln in ferryd.log().splitlines()), \
        "the missing image must be logged with its path"
    # Its registry row can still be removed, and stays removed.
    st, js = ferryd.api("DELETE", "/v1/disks/van")
    assert st == 200 and js["removed"] == "van", (st, js)
    ferryd.restart()
    assert ferryd.api("GET", "/v1/disks/van")[0] == 404
    assert str(img) not in ferryd.log(), "a removed disk is still being opened at start"


def test_sigterm_answers_requests_in_flight(ferryd):
    """SIGTERM while a rate-limited write is still waiting and another client
    is idle: the write is finished and answered, the idle client is
    disconnected, ferryd exits 0, and the data is there after a restart."""
    nbd = pytest.importorskip("nbd")
    ferryd.create("drain", "16M")
    ferryd.cli("disk", "limit", "drain", "--write", "256K")
    h = nbd.NBD()
    h.connect_uri(ferryd.uri("drain"))
    idle = RawNbdClient(ferryd, "drain")
    idle.read(0, 512)
    bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * MiB) for i in range(2)]
    cookies = [h.aio_pwrite(b, i * MiB) for i, b in enumerate(bufs)]
    # At 256 KiB/s the second 1 MiB write waits about 4 s in the limiter.
    t_end = time.monotonic() + 0.5
    while time.monotonic() < t_end:
        h.poll(0)
        time.sleep(0.01)
    assert not h.aio_command_completed(cookies[1]), "the limit did not hold the second write"
    ferryd.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    pending = list(cookies)
    while pending and time.monotonic() < deadline:
        h.poll(1)
        for c in list(pending):
            try:
                if h.aio_command_completed(c):
                    pending.remove(c)
            except nbd.Error as e:
                pytest.fail(f"a write in flight at SIGTERM failed: {e}")
    assert not pending, "writes in flight at SIGTERM were not answered"
    assert idle.closed_by_server(), "the idle client was not disconnected"
    idle.close()
    rc = ferryd.proc.wait(timeout=60)
    ferryd.proc = None
    assert rc == 0, ferryd.log()[-3000:]
    assert sanitizer_report(ferryd.log()) is None
    assert not (ferryd.data_dir / "ferryd.json").exists()
    del h
    ferryd.start()
    assert ferryd.disk("drain")["dirty_bytes"] == 2 * MiB
    ferryd.qemu_io("drain", f"read -P 1 0 {MiB}", f"read -P 2 {MiB} {MiB}")
