#!/usr/bin/python3
"""migration_bench: ferry's live migration over an emulated WAN, beside the
cold copies an operator would otherwise do, in one run.  Not part of the test
suite (numbers depend on the machine).

  bench/migration_bench.py [--build build] [--rows 100mbit:1G:50,1gbit:8G:25]
                           [--delay 10ms] [--workload SPEC] [--json out.json]

Each row is RATE:DISK_SIZE:FILL_PERCENT.  For each row, over ferry-wan at RATE
with DELAY each way (RTT = 2 x DELAY):

  ferry live    two ferryd sites, a sim VM (WORKLOAD) on a sparse disk of
                DISK_SIZE with FILL% written, `ferry migrate --wait`; the VM
                keeps running.  Downtime as ferry measures it (pause to resume).
  nbdcopy       the same image, VM stopped, copied by nbdcopy to qemu-nbd at
                the destination (through the WAN) -- downtime = the copy
  qemu-img      the same with `qemu-img convert -n` to the same qemu-nbd
  rsync         the same image to an rsync daemon at the destination
                (--sparse --inplace, whole file: the destination starts empty)

Reported: total time, bytes on the wire (both directions, as ferry-wan
counted them: TLS and protocol overhead included), downtime, the VM's IOPS
during the migration against before it, ferryd's peak resident memory
(VmHWM) at source and destination.  Every process it starts is stopped by
its pid; everything lives in a temp dir.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = "/usr/bin/python3"


def parse_size(s):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower().rstrip("b").rstrip("i")
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def hwm_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, log, **kw):
        f = open(log, "w")
        p = subprocess.Popen([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, **kw)
        f.close()
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=60):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in reversed(self.procs):
            self.stop(p)


class Bench:
    def __init__(self, args):
        self.a = args
        self.build = Path(args.build).resolve()
        self.tmp = Path(tempfile.mkdtemp(prefix="ferry-mbench."))
        self.procs = Procs()
        self.vm_pids = []

    def ferry(self, api, *args, check=True, timeout=3600):
        p = subprocess.run([str(self.build / "ferry"), "--api", api, *map(str, args)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"ferry {' '.join(map(str, args))}: {p.stderr}{p.stdout}")
        return p

    def fj(self, api, *args):
        return json.loads(self.ferry(api, "-o", "json", *args).stdout)

    def wan(self, name, connect, rate):
        ready = self.tmp / f"{name}.json"
        ctl = self.tmp / f"{name}.sock"
        p = self.procs.start([self.build / "ferry-wan", "--listen", "127.0.0.1:0", "--connect",
                              connect, "--control", f"unix:{ctl}", "--delay", self.a.delay,
                              "--rate", rate, "--ready-file", ready, "--log-level", "warn"],
                             self.tmp / f"{name}.log")
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        return p, info["listen"], ctl

    def wan_stats(self, ctl):
        out = subprocess.run([str(self.build / "ferry-wan"), "ctl", f"unix:{ctl}", "stats"],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        return json.loads(out[out.index("{"):])

    def ferryd(self, name):
        d = self.tmp / name
        d.mkdir()
        ready = d / "data" / "ferryd.json"
        p = self.procs.start([self.build / "ferryd", "--data-dir", d / "data", "--api",
                              "127.0.0.1:0", "--link", "127.0.0.1:0", "--nbd",
                              f"unix:{d}/nbd.sock", "--log-level", "warn"], d / "ferryd.log")
        for _ in range(600):
            if ready.exists():
                info = json.loads(ready.read_text())
                if info["pid"] == p.pid:
                    return p, info["api"], d
            time.sleep(0.05)
        raise RuntimeError(f"{name}: ferryd not ready")

    # ---- ferry live ---------------------------------------------------------
    def ferry_live(self, rate, size, fill):
        pa, A, da = self.ferryd("onprem")
        pb, B, db = self.ferryd("cloud")
        self.ferry(A, "site", "init", "--name", "onprem")
        self.ferry(B, "site", "init", "--name", "cloud")
        blink = self.fj(B, "site", "show")["link"]
        pw, wlisten, wctl = self.wan("wan-ferry", blink, rate)
        self.ferry(A, "site", "pair", B, "--link", wlisten)
        self.ferry(A, "disk", "create", "vda", "--size", size)
        self.ferry(A, "vm", "create", "vm1", "--disk", "vda", "--workload", self.a.workload)
        state = da / "data" / "vms" / "vm1" / "state.sim"
        subprocess.run([str(self.build / "ferry-simvm"), "fill", "--state", state, "--create",
                        "--percent", str(fill), "--disk",
                        f"vda=nbd+unix:///vda?socket={da}/nbd.sock", "--log-level", "warn"],
                       check=True)
        image = da / "data" / "disks" / "vda.img"
        self.ferry(A, "vm", "start", "vm1")

        def iops(api):
            v = self.fj(api, "vm", "show", "vm1")
            return v.get("runtime", {}).get("iops", 0.0)

        time.sleep(2)
        before = [iops(A) for _ in range(5) if time.sleep(1) is None]
        w0 = self.wan_stats(wctl)
        samples, stop = [], threading.Event()

        def sampler():
            while not stop.is_set():
                try:
                    samples.append(iops(A))
                except Exception:
                    pass
                stop.wait(1)

        t = threading.Thread(target=sampler)
        t0 = time.monotonic()
        mid = self.fj(A, "migrate", "vm1", "--to", "cloud", "--max-downtime",
                      self.a.max_downtime)["id"]
        t.start()
        while True:
            m = self.fj(A, "migration", "show", mid)
            if m["state"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        stop.set()
        t.join()
        w1 = self.wan_stats(wctl)
        wire = (w1["bytes_up"] - w0["bytes_up"]) + (w1["bytes_down"] - w0["bytes_down"])
        ok = self.fj(B, "vm", "verify", "vm1")["ok"] if m["state"] == "completed" else False
        # VMs outlive ferryd: end this one.
        for api in (A, B):
            for v in self.fj(api, "vm", "list")["vms"]:
                if v["pid"]:
                    os.kill(v["pid"], signal.SIGKILL)
        mem_a, mem_b = hwm_kib(pa.pid), hwm_kib(pb.pid)
        # The same image, for the cold copies (the source disk is fenced now).
        cold = self.tmp / "cold.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(cold)], check=True)
        for p in (pa, pb, pw):
            self.procs.stop(p)
        shutil.rmtree(da)
        shutil.rmtree(db)
        during = samples[1:-1] or samples
        p = m["progress"]
        return {
            "method": "ferry live", "state": m["state"], "verify_ok": ok,
            "time_s": elapsed, "wire_bytes": wire,
            "downtime_ms": p["cutover"]["downtime_ms"],
            "data_sent": p["bytes"]["data_sent"], "resent": p["bytes"]["resent"],
            "vm_iops_before": sum(before) / max(len(before), 1),
            "vm_iops_during": sum(during) / max(len(during), 1),
            "hwm_src_mib": mem_a / 1024, "hwm_dst_mib": mem_b / 1024,
        }, cold

    # ---- cold copies -------------------------------------------------------
    def cold_target(self, rate, size):
        dst = self.tmp / "dst.img"
        if dst.exists():
            dst.unlink()
        with open(dst, "wb") as f:
            f.truncate(parse_size(size))
        port = free_port()
        q = self.procs.start(["qemu-nbd", "-f", "raw", "-x", "dst", "-b", "127.0.0.1", "-p",
                              str(port), "-t", "--cache=writeback", str(dst)],
                             self.tmp / "qemu-nbd.log")
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        w, listen, ctl = self.wan("wan-cold", f"127.0.0.1:{port}", rate)
        return q, w, listen, ctl

    def cold_copy(self, method, rate, size, image):
        q, w, listen, ctl = self.cold_target(rate, size)
        host, port = listen.rsplit(":", 1)
        uri = f"nbd://{host}:{port}/dst"
        w0 = self.wan_stats(ctl)
        t0 = time.monotonic()
        if method == "nbdcopy":
            cmd = ["nbdcopy", "--destination-is-zero", str(image), uri]
        else:
            cmd = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(image), uri]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        w1 = self.wan_stats(ctl)
        self.procs.stop(w)
        self.procs.stop(q)
        wire = (w1["bytes_up"] - w0["bytes_up"]) + (w1["bytes_down"] - w0["bytes_down"])
        return {"method": method + " (cold)", "time_s": elapsed, "wire_bytes": wire,
                "downtime_ms": elapsed * 1000}

    def rsync(self, rate, image):
        if not shutil.which("rsync"):
            return {"method": "rsync (cold)", "skipped": "rsync not installed"}
        mod = self.tmp / "rsync-dst"
        if mod.exists():
            shutil.rmtree(mod)
        mod.mkdir()
        port = free_port()
        conf = self.tmp / "rsyncd.conf"
        conf.write_text(f"use chroot = no\n[dst]\n path = {mod}\n read only = no\n"
                        f" uid = {os.getuid()}\n gid = {os.getgid()}\n")
        d = self.procs.start(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                              f"--port={port}", "--address=127.0.0.1"], self.tmp / "rsyncd.log")
        time.sleep(0.5)
        w, listen, ctl = self.wan("wan-rsync", f"127.0.0.1:{port}", self.row_rate)
        host, wport = listen.rsplit(":", 1)
        w0 = self.wan_stats(ctl)
        t0 = time.monotonic()
        subprocess.run(["rsync", "--sparse", "--inplace", "-W", f"--port={wport}", str(image),
                        f"rsync://{host}/dst/"], check=True, stdout=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        w1 = self.wan_stats(ctl)
        self.procs.stop(w)
        self.procs.stop(d)
        wire = (w1["bytes_up"] - w0["bytes_up"]) + (w1["bytes_down"] - w0["bytes_down"])
        return {"method": "rsync (cold)", "time_s": elapsed, "wire_bytes": wire,
                "downtime_ms": elapsed * 1000}

    def run(self):
        results = []
        try:
            for row in self.a.rows.split(","):
                rate, size, fill = row.split(":")
                self.row_rate = rate
                print(f"# {rate}, RTT {2 * int(self.a.delay.rstrip('ms'))} ms, {size} disk, "
                      f"{fill}% filled", file=sys.stderr)
                live, image = self.ferry_live(rate, size, int(fill))
                rows = [live]
                for method in ("nbdcopy", "qemu-img"):
                    print(f"#   {method}", file=sys.stderr)
                    rows.append(self.cold_copy(method, rate, size, image))
                print("#   rsync", file=sys.stderr)
                rows.append(self.rsync(rate, image))
                for r in rows:
                    r.update(rate=rate, size=size, fill=int(fill),
                             allocated=os.stat(image).st_blocks * 512)
                results += rows
                image.unlink()
        finally:
            self.procs.stop_all()
            for pid in self.vm_pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.tmp, ignore_errors=True)
        return results


def table(results, delay):
    out = ["| link | disk (allocated) | method | total time | on the wire | downtime | VM IOPS during / before | peak RSS src / dst |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("skipped"):
            out.append(f"| {r['rate']} | {r['size']} | {r['method']} | skipped: {r['skipped']} | | | | |")
            continue
        alloc = f"{r['size']} ({r['allocated'] / (1 << 30):.2f} GiB)"
        dt = f"{r['downtime_ms']:.0f} ms" if r["method"] == "ferry live" else f"{r['downtime_ms'] / 1000:.1f} s (VM off)"
        iops = (f"{r['vm_iops_during']:.0f} / {r['vm_iops_before']:.0f}"
                if "vm_iops_before" in r else "-")
        mem = (f"{r['hwm_src_mib']:.0f} / {r['hwm_dst_mib']:.0f} MiB"
               if "hwm_src_mib" in r else "-")
        extra = "" if r["method"] != "ferry live" else (
            f" ({r['state']}, verify {'ok' if r['verify_ok'] else 'FAILED'})")
        out.append(f"| {r['rate']}, {2 * int(delay.rstrip('ms'))} ms RTT | {alloc} | "
                   f"{r['method']}{extra} | {r['time_s']:.1f} s | "
                   f"{r['wire_bytes'] / (1 << 20):.0f} MiB | {dt} | {iops} | {mem} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.environ.get("FERRY_BUILD", str(ROOT / "build")))
    ap.add_argument("--rows", default="100mbit:1G:50,1gbit:8G:25")
    ap.add_argument("--delay", default="10ms")
    ap.add_argument("--workload", default="write=70,bs=4k,iops=1000,zipf=0.9,qd=8")
    ap.add_argument("--max-downtime", default="500ms")
    ap.add_argument("--json")
    a = ap.parse_args()
    for tool in ("qemu-nbd", "qemu-img", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"migration_bench: {tool} is missing (scripts/setup.sh)")
    res = Bench(a).run()
    print(f"\nlive migration vs cold copies over ferry-wan, delay {a.delay} each way, "
          f"VM workload {a.workload}\n")
    print(table(res, a.delay))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
