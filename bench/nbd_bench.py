#!/usr/bin/python3
"""nbd_bench: ferryd's NBD data path against qemu-nbd and nbdkit, with fio's
nbd engine.  Not part of the test suite (numbers depend on the machine).

  bench/nbd_bench.py [--runtime 15] [--size 2G] [--build build]
                     [--servers ferryd,ferryd-nocbt,qemu-nbd,nbdkit]
                     [--transports unix,tcp] [--workloads all|name,...]
                     [--json out.json]

Every server serves the same raw image (filled with data and read once, so it
sits in the page cache) over a unix socket and over TCP loopback, one server
at a time.  Workloads (each time-boxed):
  randread-4k-qd1, randread-4k-qd16, randwrite-4k-qd1, randwrite-4k-qd16,
  seqread-1m-qd16, seqwrite-1m-qd16
Prints a markdown table: IOPS and MB/s per server, ferryd / max(qemu-nbd,
nbdkit), and ferryd with CBT+heat against ferryd --no-cbt --no-heat.

Servers listen on free ports (bound to 127.0.0.1 only) and on sockets in a
temp dir; every process this script starts is stopped by its pid at the end.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = {
    "randread-4k-qd1":   dict(rw="randread", bs="4k", iodepth=1),
    "randread-4k-qd16":  dict(rw="randread", bs="4k", iodepth=16),
    "randwrite-4k-qd1":  dict(rw="randwrite", bs="4k", iodepth=1),
    "randwrite-4k-qd16": dict(rw="randwrite", bs="4k", iodepth=16),
    "seqread-1m-qd16":   dict(rw="read", bs="1m", iodepth=16),
    "seqwrite-1m-qd16":  dict(rw="write", bs="1m", iodepth=16),
}
SERVERS = ["ferryd", "ferryd-nocbt", "qemu-nbd", "nbdkit"]


def parse_size(s):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower().rstrip("b").rstrip("i")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(transport, addr, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            if transport == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(addr)
            else:
                s = socket.create_connection(("127.0.0.1", addr), timeout=1)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start listening")


def stop(proc, timeout=30):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    """Starts one server kind on one transport; .uri for fio; .stop()."""

    def __init__(self, kind, transport, image, tmp, build):
        self.kind, self.transport, self.proc = kind, transport, None
        sock = os.path.join(tmp, f"{kind}-{transport}.sock")
        log = open(os.path.join(tmp, f"{kind}-{transport}.log"), "w")
        if kind.startswith("ferryd"):
            data = os.path.join(tmp, f"data-{kind}-{transport}")
            nbd = f"unix:{sock}" if transport == "unix" else "127.0.0.1:0"
            args = [os.path.join(build, "ferryd"), "--data-dir", data, "--api", "127.0.0.1:0",
                    "--nbd", nbd, "--log-level", "warn"]
            if kind == "ferryd-nocbt":
                args += ["--no-cbt", "--no-heat"]
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            ready = os.path.join(data, "ferryd.json")
            deadline = time.monotonic() + 30
            info = None
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ferryd exited {self.proc.returncode}; see {log.name}")
                try:
                    with open(ready) as f:
                        info = json.load(f)
                    if info.get("pid") == self.proc.pid:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.05)
            else:
                raise RuntimeError("ferryd not ready")
            subprocess.run([os.path.join(build, "ferry"), "--api", info["api"], "disk", "add",
                            "bench", "--image", image], check=True, stdout=subprocess.DEVNULL)
            if transport == "unix":
                self.uri = f"nbd+unix:///bench?socket={sock}"
            else:
                self.uri = f"nbd://{info['nbd']}/bench"
        elif kind == "qemu-nbd":
            args = ["qemu-nbd", "-f", "raw", "-t", "-e", "16", "--cache=writeback", "-x", "bench"]
            if transport == "unix":
                args += ["-k", sock]
                addr = sock
            else:
                addr = free_port()
                args += ["-p", str(addr), "-b", "127.0.0.1"]
            args.append(image)
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            wait_listening(transport, addr, self.proc)
            self.uri = (f"nbd+unix:///bench?socket={sock}" if transport == "unix"
                        else f"nbd://127.0.0.1:{addr}/bench")
        elif kind == "nbdkit":
            args = ["nbdkit", "-f"]
            if transport == "unix":
                args += ["-U", sock]
                addr = sock
            else:
                addr = free_port()
                args += ["-p", str(addr), "-i", "127.0.0.1"]
            args += ["file", image]
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            wait_listening(transport, addr, self.proc)
            self.uri = (f"nbd+unix:///?socket={sock}" if transport == "unix"
                        else f"nbd://127.0.0.1:{addr}/")
        else:
            raise ValueError(kind)
        log.close()

    def stop(self):
        stop(self.proc)
        self.proc = None


def run_fio(uri, wl, runtime, size, tmp):
    w = WORKLOADS[wl]
    args = ["fio", f"--name={wl}", "--ioengine=nbd", f"--uri={uri}", f"--rw={w['rw']}",
            f"--bs={w['bs']}", f"--iodepth={w['iodepth']}", f"--size={size}",
            "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--norandommap",
            "--randrepeat=0", "--output-format=json"]
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=runtime + 120, cwd=tmp)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed ({p.returncode}): {p.stderr[-2000:]}")
    js = json.loads(p.stdout[p.stdout.index("{"):])
    job = js["jobs"][0]
    side = job["read"] if w["rw"] in ("randread", "read") else job["write"]
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "lat_us_p50": side.get("clat_ns", {}).get("percentile", {}).get("50.000000", 0) / 1000}


def prepare_image(path, size):
    """A fully written image (so reads hit data, not holes), read once so it
    is in the page cache."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=int(os.environ.get("BENCH_RUNTIME", 15)))
    ap.add_argument("--size", default="2G")
    ap.add_argument("--build", default=os.environ.get("FERRY_BUILD", os.path.join(ROOT, "build")))
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--transports", default="unix,tcp")
    ap.add_argument("--workloads", default="all")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    servers = a.servers.split(",")
    transports = a.transports.split(",")
    workloads = list(WORKLOADS) if a.workloads == "all" else a.workloads.split(",")
    for s in servers:
        assert s in SERVERS, f"unknown server {s}"
    for w in workloads:
        assert w in WORKLOADS, f"unknown workload {w}"
    need = {"fio"} | ({"qemu-nbd"} & set(servers)) | ({"nbdkit"} & set(servers))
    for t in need:
        if shutil.which(t) is None:
            sys.exit(f"nbd_bench: {t} not installed (scripts/setup.sh)")
    if any(s.startswith("ferryd") for s in servers) and not os.path.exists(os.path.join(a.build, "ferryd")):
        sys.exit(f"nbd_bench: no ferryd in {a.build} (scripts/build.sh release)")

    size = parse_size(a.size)
    results = {}   # (wl, transport, server) -> dict
    tmp = tempfile.mkdtemp(prefix="ferry-bench.")
    current = None

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        image = os.path.join(tmp, "bench.img")
        print(f"# preparing a {a.size} image in {tmp} ...", file=sys.stderr)
        prepare_image(image, size)
        total = len(servers) * len(transports) * len(workloads)
        n = 0
        for transport in transports:
            for server in servers:
                current = Server(server, transport, image, tmp, a.build)
                try:
                    for wl in workloads:
                        n += 1
                        print(f"# [{n}/{total}] {server} {transport} {wl} ({a.runtime}s)",
                              file=sys.stderr, flush=True)
                        results[(wl, transport, server)] = run_fio(current.uri, wl, a.runtime, size, tmp)
                finally:
                    current.stop()
                    current = None
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
    finally:
        if current is not None:
            current.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    # The table.
    cols = [s for s in SERVERS if s in servers]
    head = ["workload", "transport"] + [f"{s} IOPS / MB/s" for s in cols]
    if "ferryd" in cols and ({"qemu-nbd", "nbdkit"} & set(cols)):
        head.append("ferryd / best other")
    if "ferryd" in cols and "ferryd-nocbt" in cols:
        head.append("CBT+heat on / off")
    print()
    print(f"fio nbd engine, {a.runtime}s per run, {a.size} image in page cache, "
          f"{os.cpu_count()} CPUs")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for wl in workloads:
        for transport in transports:
            row = [wl, transport]
            for s in cols:
                r = results.get((wl, transport, s))
                row.append("-" if r is None else f"{fmt(r['iops'])} / {fmt(r['mbps'], 1)}")
            f = results.get((wl, transport, "ferryd"))
            if "ferryd / best other" in head:
                others = [results[(wl, transport, o)]["iops"] for o in ("qemu-nbd", "nbdkit")
                          if (wl, transport, o) in results]
                row.append(f"{f['iops'] / max(others):.2f}" if f and others and max(others) > 0 else "-")
            if "CBT+heat on / off" in head:
                off = results.get((wl, transport, "ferryd-nocbt"))
                row.append(f"{f['iops'] / off['iops']:.2f}" if f and off and off["iops"] > 0 else "-")
            print("| " + " | ".join(row) + " |")
    if a.json:
        with open(a.json, "w") as fjs:
            json.dump([dict(workload=k[0], transport=k[1], server=k[2], **v) for k, v in results.items()],
                      fjs, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
