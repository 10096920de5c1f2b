"""Standard NBD clients against ferryd's disks, over a unix socket and TCP:
qemu-img, qemu-io, nbdinfo, nbdcopy and fio must see a correct disk."""
import hashlib
import json
import os


from conftest import (KiB, MiB, GiB, expected_extents, granules, need, nbdinfo_map, run)


def random_file(path, size, zero_ranges=()):
    """Random bytes with the given (off, len) ranges zeroed; returns its sha256."""
    data = bytearray(os.urandom(size))
    for off, ln in zero_ranges:
        data[off:off + ln] = bytes(ln)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def test_qemu_img_info(ferryd_any):
    need("qemu-img")
    ferryd_any.create("info1", "1G")
    ferryd_any.create("info2", "3333M")
    for name, size in (("info1", GiB), ("info2", 3333 * MiB)):
        p = run(["qemu-img", "info", "--output=json", ferryd_any.uri(name)])
        assert json.loads(p.stdout)["virtual-size"] == size


def test_qemu_img_convert_roundtrip(ferryd_any, tmp_path):
    need("qemu-img")
    size = 64 * MiB
    src = tmp_path / "src.raw"
    # A zero stretch in the middle makes qemu-img send WRITE_ZEROES too.
    digest = random_file(src, size, zero_ranges=[(20 * MiB, 4 * MiB), (size - 64 * KiB, 64 * KiB)])
    ferryd_any.create("conv", "64M")
    uri = ferryd_any.uri("conv")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri])
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out])
    assert out.stat().st_size == size
    assert sha256(out) == digest, "image read back through ferryd differs from what was written"


def test_qemu_io_unaligned_patterns(ferryd_any):
    need("qemu-io")
    ferryd_any.create("pat", "64M")
    writes = [(0xab, 1000, 3333), (0xcd, 65530, 10), (0x11, MiB - 1, 128 * KiB + 3),
              (0x5a, 33 * MiB + 511, 1), (0x77, 64 * MiB - 777, 777)]
    ferryd_any.qemu_io("pat", *[f"write -P {p:#x} {o} {n}" for p, o, n in writes])
    # A second process reads: nothing comes from qemu's own cache.
    reads = [f"read -P {p:#x} {o} {n}" for p, o, n in writes]
    # The bytes between the writes were never written and must read as zero.
    reads += ["read -P 0 0 1000", "read -P 0 4333 61197", "read -P 0 65540 983035",
              f"read -P 0 {MiB + 128 * KiB + 2} {32 * MiB - 128 * KiB - 2 + 511}",
              f"read -P 0 {33 * MiB + 512} {31 * MiB - 777 - 512}"]
    ferryd_any.qemu_io("pat", *reads)
    # A wrong pattern must be caught (the check itself can fail).
    p = ferryd_any.qemu_io("pat", "read -P 0xac 1000 3333", check=False)
    assert p.returncode != 0 or "Pattern verification failed" in p.stdout


def test_nbdinfo_list(ferryd_any):
    need("nbdinfo")
    names = ["alpha", "beta", "gamma-3"]
    for n in names:
        ferryd_any.create(n, "16M")
    p = run(["nbdinfo", "--list", "--json", ferryd_any.server_uri()])
    js = json.loads(p.stdout)
    listed = {e["export-name"]: e for e in js["exports"]}
    assert set(listed) == set(names)
    for n in names:
        assert listed[n]["export-size"] == 16 * MiB
        assert "base:allocation" in listed[n].get("contexts", [])
        assert "ferry:dirty" in listed[n].get("contexts", [])
        assert listed[n]["can_multi_conn"] is True
        assert listed[n]["is_read_only"] is False


def _kinds(extents, size):
    """[(start, end, type)] with adjacent equal types merged; checks coverage."""
    out = []
    pos = 0
    for e in extents:
        assert e["offset"] == pos, f"extents not contiguous at {pos}: {e}"
        t = e["type"]
        if out and out[-1][2] == t:
            out[-1] = (out[-1][0], e["offset"] + e["length"], t)
        else:
            out.append((e["offset"], e["offset"] + e["length"], t))
        pos = e["offset"] + e["length"]
    assert pos == size, f"extents end at {pos}, disk size {size}"
    return out


def test_nbdinfo_map_allocation(ferryd_any):
    need("nbdinfo", "qemu-io")
    size = 64 * MiB
    ferryd_any.create("map", "64M")
    uri = ferryd_any.uri("map")
    assert _kinds(nbdinfo_map(uri), size) == [(0, size, 3)], "a new disk must be one hole"

    ferryd_any.qemu_io("map", f"write -P 0x42 {4 * MiB} {MiB}", f"write -P 0x43 {40 * MiB} {2 * MiB}")
    data = [(s, e) for s, e, t in _kinds(nbdinfo_map(uri), size) if not t & 1]
    assert data == [(4 * MiB, 5 * MiB), (40 * MiB, 42 * MiB)], f"data extents {data}"

    # Trim gives the space back: the range is a hole again (and reads zero).
    ferryd_any.qemu_io("map", f"discard {40 * MiB} {2 * MiB}")
    data = [(s, e) for s, e, t in _kinds(nbdinfo_map(uri), size) if not t & 1]
    assert data == [(4 * MiB, 5 * MiB)], f"after trim, data extents {data}"
    ferryd_any.qemu_io("map", f"read -P 0 {40 * MiB} {2 * MiB}", f"read -P 0x42 {4 * MiB} {MiB}")


def test_nbdinfo_map_dirty(ferryd_any):
    need("nbdinfo", "qemu-io")
    size, gran = 64 * MiB, 64 * KiB
    ferryd_any.create("dm", "64M")
    uri = ferryd_any.uri("dm")
    assert [e for e in nbdinfo_map(uri, "ferry:dirty") if e["type"] & 1] == []
    ios = [(1000, 3333), (200 * KiB - 1, 2), (10 * MiB + 7, 200000), (size - 1, 1)]
    ferryd_any.qemu_io("dm", *[f"write -P 0x9 {o} {n}" for o, n in ios],
                       f"write -z {30 * MiB} {4 * KiB}", f"discard {50 * MiB} {64 * KiB}")
    ios += [(30 * MiB, 4 * KiB), (50 * MiB, 64 * KiB)]
    want = granules(ios, gran, size)
    got_ext = nbdinfo_map(uri, "ferry:dirty")
    _kinds(got_ext, size)
    got = set()
    for e in got_ext:
        if e["type"] & 1:
            assert e["offset"] % gran == 0 and (e["length"] % gran == 0 or e["offset"] + e["length"] == size), e
            got.update(range(e["offset"] // gran, (e["offset"] + e["length"]) // gran))
    assert got == want, f"ferry:dirty regions {sorted(got)} != written regions {sorted(want)}"
    # The API tells the same.
    assert ferryd_any.dirty("dm")["extents"] == expected_extents(want, gran, size)


def test_nbdcopy_in_and_out(ferryd_any, tmp_path):
    need("nbdcopy")
    size = 64 * MiB
    src = tmp_path / "in.raw"
    digest = random_file(src, size, zero_ranges=[(8 * MiB, 8 * MiB)])
    ferryd_any.create("copy", "64M")
    uri = ferryd_any.uri("copy")
    # nbdcopy uses several connections when the server allows multi-conn.
    run(["nbdcopy", "--connections=4", "--requests=16", src, uri])
    out = tmp_path / "out.raw"
    out.write_bytes(b"")
    os.truncate(out, size)
    run(["nbdcopy", "--connections=4", uri, out])
    assert sha256(out) == digest, "nbdcopy out of ferryd is not what nbdcopy put in"
    run(["cmp", src, out])


def test_fio_randwrite_verify(ferryd_any, tmp_path):
    """4 jobs (4 connections), iodepth 16, random 4K writes with crc32c
    verification; each job owns its own 16 MiB so verification is exact."""
    need("fio")
    ferryd_any.create("fio", "64M")
    p = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={ferryd_any.uri('fio')}",
             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=4",
             "--size=16M", "--offset_increment=16M", "--verify=crc32c", "--do_verify=1",
             "--verify_fatal=1", "--group_reporting", "--output-format=json"],
            timeout=600, cwd=tmp_path)   # fio leaves verify state files in its cwd
    js = json.loads(p.stdout[p.stdout.index("{"):])
    job = js["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == 64 * MiB, job["write"]["io_bytes"]
    assert job["read"]["io_bytes"] == 64 * MiB, "fio did not read everything back to verify"
    # Every region was written: the whole disk is dirty.
    d = ferryd_any.disk("fio")
    assert d["dirty_bytes"] == 64 * MiB
    assert d["stats"]["ops"]["write"] >= 16384
