#!/usr/bin/python3
"""warm_bench: ferry's warm migration (compute first, data follows through the
destination's cloud cache) against its live migration, over an emulated WAN.
Not part of the test suite (numbers depend on the machine).

  bench/warm_bench.py [--build build] [--rows 100mbit:4G:25,1gbit:4G:25]
                      [--delay 15ms] [--workload SPEC] [--duration 60]
                      [--warmup 10] [--rpo D] [--cache-size SIZE]
                      [--hydrate-rate RATE] [--max-downtime D] [--methods hot,none,live]
                      [--converge-timeout 300] [--timeout 1800] [--json out.json]
                      [--keep [always]]

Each row is RATE:DISK_SIZE:FILL_PERCENT.  For each row and each method, two
fresh ferryd sites (release build in $FERRY_BUILD, default build/), the site
link through ferry-wan at RATE with DELAY each way (RTT = 2 x DELAY), a sim VM
(WORKLOAD) on a sparse disk of DISK_SIZE with FILL% written by
`ferry-simvm fill`, started and run WARMUP s at the source (so that the
source's heat map knows the hot set; the VM's IOPS "before" are its last 5 s);
then:

  warm hot    `ferry migrate vm1 --to cloud --mode warm --prefetch hot --wait`
              (returns once the VM runs at the destination); then DURATION s
              sampled once a second at the destination: the VM's IOPS and read
              latency, the cache's hits/misses (hit ratio cumulative and per
              interval), hydrated %, miss latency, bytes on the WAN; then
              `ferry migrate-back vm1` and `ferry vm verify vm1` at the source.
  warm none   the same with --prefetch none.
  live        `ferry migrate vm1 --to cloud --wait` (live): the VM runs at the
              destination once it completes; sampled once a second from the
              start to the end of the migration; `vm verify` at the destination.
              One that stays in phase `converging` (its backlog never fits
              --max-downtime) for --converge-timeout s is cancelled and
              reported as such.

Time to running: warm, the CLI's wall time and ferry's `time_to_running_ms`
(migrate request to the VM running there); live, from the migrate command to
the VM resumed at the destination (cutover.started_ns + downtime_ms, ferry's
own clock) and the CLI's wall time (to `completed`; the CLI polls once a
second).  The IOPS windows start when the VM runs at the destination (warm)
and at the migrate command (live: the VM runs on during the copy).  WAN bytes
are what ferry-wan carried, both directions, from the migrate command to the
end of the window (TLS and protocol overhead included).

--json writes {"meta": the arguments, git HEAD and the binaries' md5,
"results": one object per row and method with every figure above, the cache's
figures at the end of the window ("warm_end"), the migrate-back attempts, and
"samples": the per-second series (t, VM iops / read_p50_ms / read_p99_ms /
read_errors, hit_ratio, interval_hit_ratio, hydrated_pct, miss_p50/p90/p99_ms,
fetched/hydrated bytes, wan_up/down_bytes, ...)}.  A row whose VM read a bad
block, whose verify failed or whose migration failed makes the exit status 1.

Every process it starts is stopped by its pid, the VM processes too (they
outlive ferryd: their pids come from `vm list` / `vm show` and are checked to
be ours before the kill); everything lives in a temp dir, removed at the end
unless --keep (kept when something failed; --keep always: kept anyway).
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHODS = {"hot": "warm, prefetch hot", "none": "warm, prefetch none", "live": "live"}


def hwm_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class BenchError(RuntimeError):
    pass


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
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in reversed(list(self.procs)):
            self.stop(p)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def peak(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


class Bench:
    def __init__(self, args):
        self.a = args
        self.build = Path(args.build).resolve()
        self.tmp = Path(tempfile.mkdtemp(prefix="ferry-wbench."))
        self.procs = Procs()
        self.vm_pids = set()
        self.failed = False

    # ---- helpers (as in migration_bench.py) --------------------------------
    def ferry(self, api, *args, check=True, timeout=120):
        cmd = [str(self.build / "ferry"), "--api", api, *map(str, args)]
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"`ferry {' '.join(map(str, args))}` did not return within "
                             f"{timeout} s")
        if check and p.returncode != 0:
            raise BenchError(f"`ferry {' '.join(map(str, args))}` exited {p.returncode}: "
                             f"{p.stderr.strip()} {p.stdout.strip()}".strip())
        return p

    def fj(self, api, *args, timeout=120):
        out = self.ferry(api, "-o", "json", *args, timeout=timeout).stdout
        try:
            return json.loads(out)
        except ValueError:
            raise BenchError(f"`ferry -o json {' '.join(map(str, args))}`: not JSON: {out[:300]}")

    def wan(self, d, connect, rate):
        ready = d / "wan.json"
        ctl = d / "wan.sock"
        p = self.procs.start([self.build / "ferry-wan", "--listen", "127.0.0.1:0", "--connect",
                              connect, "--control", f"unix:{ctl}", "--delay", self.a.delay,
                              "--rate", rate, "--ready-file", ready, "--log-level", "warn"],
                             d / "wan.log")
        for _ in range(300):
            if ready.exists():
                info = json.loads(ready.read_text())
                return p, info["listen"], ctl
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"ferry-wan did not start: {self.tail(d / 'wan.log')}")

    def wan_stats(self, ctl):
        out = subprocess.run([str(self.build / "ferry-wan"), "ctl", f"unix:{ctl}", "stats"],
                             stdout=subprocess.PIPE, text=True, check=True, timeout=10).stdout
        return json.loads(out[out.index("{"):])

    def ferryd(self, d, name):
        d.mkdir(parents=True)
        ready = d / "data" / "ferryd.json"
        p = self.procs.start([self.build / "ferryd", "--data-dir", d / "data", "--api",
                              "127.0.0.1:0", "--link", "127.0.0.1:0", "--nbd",
                              f"unix:{d}/nbd.sock", "--log-level", self.a.log_level],
                             d / "ferryd.log")
        for _ in range(600):
            if ready.exists():
                try:
                    info = json.loads(ready.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == p.pid:
                    return p, info["api"]
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"{name}: ferryd not ready: {self.tail(d / 'ferryd.log')}")

    @staticmethod
    def tail(path, n=25):
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # ---- VM processes: they outlive ferryd ---------------------------------
    def ours(self, pid):
        """pid is a ferry-simvm whose files are in our temp dir (not a reused pid)."""
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (bool(cmd) and cmd[0].endswith(b"ferry-simvm")
                and any(str(self.tmp).encode() in c for c in cmd))

    def note_vms(self, api):
        try:
            for v in self.fj(api, "vm", "list", timeout=20)["vms"]:
                if v.get("pid"):
                    self.vm_pids.add(v["pid"])
        except Exception:
            pass

    def kill_vms(self, apis=()):
        for api in apis:
            self.note_vms(api)
        # Also any VM process of ours no answer named (ferryd gone meanwhile).
        for e in os.listdir("/proc"):
            if e.isdigit() and self.ours(int(e)):
                self.vm_pids.add(int(e))
        for pid in sorted(self.vm_pids):
            if self.ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.vm_pids.clear()

    # ---- one site pair with a filled, running VM ---------------------------
    def setup(self, d, rate, size, fill):
        pa, A = self.ferryd(d / "onprem", "onprem")
        pb, B = self.ferryd(d / "cloud", "cloud")
        self.ferry(A, "site", "init", "--name", "onprem")
        self.ferry(B, "site", "init", "--name", "cloud")
        blink = self.fj(B, "site", "show")["link"]
        pw, wlisten, wctl = self.wan(d, blink, rate)
        self.ferry(A, "site", "pair", B, "--link", wlisten)
        self.ferry(A, "disk", "create", "vda", "--size", size)
        self.ferry(A, "vm", "create", "vm1", "--disk", "vda", "--workload", self.a.workload)
        state = d / "onprem" / "data" / "vms" / "vm1" / "state.sim"
        t0 = time.monotonic()
        p = subprocess.run([str(self.build / "ferry-simvm"), "fill", "--state", state,
                            "--create", "--percent", str(fill), "--disk",
                            f"vda=nbd+unix:///vda?socket={d}/onprem/nbd.sock",
                            "--log-level", "warn"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=3600)
        if p.returncode != 0:
            raise BenchError(f"ferry-simvm fill exited {p.returncode}: {p.stdout.strip()}")
        fill_s = time.monotonic() - t0
        self.ferry(A, "vm", "start", "vm1")
        self.note_vms(A)
        return {"pa": pa, "pb": pb, "pw": pw, "A": A, "B": B, "wctl": wctl, "fill_s": fill_s}

    def vm_sample(self, api):
        """(iops, read_p50_ms, read_p99_ms, state) of vm1 at api, or None."""
        v = self.fj(api, "vm", "show", "vm1", timeout=20)
        if v.get("pid"):
            self.vm_pids.add(v["pid"])
        rt = v.get("runtime")
        if not rt or rt.get("state") != "running":
            return None
        lat = rt.get("read_latency_us") or {}
        ms = (lambda x: x / 1000.0 if isinstance(x, (int, float)) else None)
        return {"iops": rt.get("iops"), "read_iops": rt.get("read_iops"),
                "write_iops": rt.get("write_iops"),
                "read_p50_ms": ms(lat.get("p50")) if lat.get("count") else None,
                "read_p99_ms": ms(lat.get("p99")) if lat.get("count") else None,
                "read_count": lat.get("count"),
                "read_errors": (rt.get("counters") or {}).get("read_errors"),
                "io_stalled": (rt.get("counters") or {}).get("io_stalled")}

    def warmup(self, s):
        """Runs the VM WARMUP s at the source; its IOPS over the last 5 s."""
        w = max(self.a.warmup, 1.0)
        start = time.monotonic()
        before = []
        while time.monotonic() - start < w:
            time.sleep(1)
            if time.monotonic() - start >= w - 5:
                try:
                    x = self.vm_sample(s["A"])
                    if x:
                        before.append(x)
                except Exception:
                    pass
        if not before:
            raise BenchError("the VM does not run at the source (no runtime figures)")
        return {"vm_iops_before": mean(x["iops"] for x in before),
                "vm_read_errors_before": before[-1].get("read_errors") or 0,
                "vm_read_p50_ms_before": median(x["read_p50_ms"] for x in before),
                "vm_read_p99_ms_before": peak(x["read_p99_ms"] for x in before)}

    # ---- the sampler -------------------------------------------------------
    def sampler(self, stop, out, t0, once):
        """Calls once(t) at t0 + 1, t0 + 2, ... until stop is set."""
        k = 1
        while not stop.is_set():
            due = t0 + k
            if stop.wait(max(0.0, due - time.monotonic())):
                break
            t = time.monotonic() - t0
            try:
                out.append(once(t))
            except Exception as e:        # a sample lost, the run goes on
                out.append({"t": round(t, 2), "error": str(e)[:300]})
            k = max(k + 1, int(time.monotonic() - t0) + 1)

    # ---- warm --------------------------------------------------------------
    def warm(self, s, prefetch, r):
        """Fills r as it goes: what was measured survives a later failure."""
        A, B, wctl = s["A"], s["B"], s["wctl"]
        args = ["migrate", "vm1", "--to", "cloud", "--mode", "warm", "--prefetch", prefetch,
                "--wait"]
        for opt, val in (("--rpo", self.a.rpo), ("--cache-size", self.a.cache_size),
                         ("--hydrate-rate", self.a.hydrate_rate)):
            if val:
                args += [opt, val]
        w0 = self.wan_stats(wctl)
        t_start = time.monotonic()
        p = self.ferry(A, "-o", "json", *args, check=False, timeout=self.a.timeout)
        cli_s = time.monotonic() - t_start
        try:
            m = json.loads(p.stdout)
        except ValueError:
            m = None
        if p.returncode != 0 or not m or m.get("state") != "warm":
            state = m.get("state") if m else "?"
            err = (m or {}).get("error") or p.stderr.strip() or p.stdout.strip()
            raise BenchError(f"warm migration (prefetch {prefetch}) did not reach 'warm': "
                             f"exit {p.returncode}, state {state}: {err}")
        mid = m["id"]
        w = m.get("warm") or {}
        if w.get("time_to_running_ms") is None:
            w = self.fj(A, "migration", "show", mid).get("warm") or {}
        ttr = w.get("time_to_running_ms")
        r.update(migration=mid, cli_time_to_running_s=cli_s,
                 time_to_running_s=ttr / 1000.0 if ttr is not None else None,
                 pause_ms=w.get("pause_ms"), hot_regions=w.get("hot_regions"),
                 data_sent_before_running=((m.get("progress") or {}).get("bytes") or {})
                 .get("data_sent"))

        prev = {"hits": None, "misses": None}

        def once(t):
            x = {"t": round(t, 2)}
            try:
                vm = self.vm_sample(B)
            except Exception as e:
                vm, x["vm_error"] = None, str(e)[:200]
            if vm:
                x.update(vm)
            try:
                mw = self.fj(B, "migration", "show", mid, timeout=20)
                x["figures_from"] = "destination"
            except Exception:
                mw = self.fj(A, "migration", "show", mid, timeout=20)
                x["figures_from"] = "source"
            x["state"] = mw.get("state")
            wf = mw.get("warm") or {}
            for k in ("hydrated_pct", "hit_ratio", "read_hits", "read_misses", "miss_p50_ms",
                      "miss_p90_ms", "miss_p99_ms", "miss_max_ms", "waiting", "oldest_wait_ms",
                      "wan_in_bytes", "wan_out_bytes", "fetched_bytes", "hydrated_bytes",
                      "unflushed_bytes", "local_bytes", "quota_bytes", "evictions",
                      "last_point", "points", "degraded"):
                if k in wf:
                    x[k] = wf[k]
            h, mm = wf.get("read_hits"), wf.get("read_misses")
            if h is not None and mm is not None and prev["hits"] is not None:
                dh, dm = h - prev["hits"], mm - prev["misses"]
                x["interval_reads"] = dh + dm
                x["interval_hit_ratio"] = dh / (dh + dm) if dh + dm > 0 else None
            if h is not None:
                prev["hits"], prev["misses"] = h, mm
            ws = self.wan_stats(wctl)
            x["wan_up_bytes"] = ws["bytes_up"] - w0["bytes_up"]
            x["wan_down_bytes"] = ws["bytes_down"] - w0["bytes_down"]
            return x

        # the cumulative counters at the moment it runs, for the first interval
        try:
            first = self.fj(B, "migration", "show", mid)
            fw = first.get("warm") or {}
            prev["hits"], prev["misses"] = fw.get("read_hits"), fw.get("read_misses")
        except Exception:
            pass
        samples, stop = [], threading.Event()
        t0 = time.monotonic()
        th = threading.Thread(target=self.sampler, args=(stop, samples, t0, once), daemon=True)
        th.start()
        time.sleep(self.a.duration + 0.3)
        stop.set()
        th.join(60)
        end = self.fj(A, "migration", "show", mid)     # the source's view (last push)
        try:
            endd = self.fj(B, "migration", "show", mid)
        except Exception:
            endd = end
        ws = self.wan_stats(wctl)
        r["wan_up_bytes"] = ws["bytes_up"] - w0["bytes_up"]
        r["wan_down_bytes"] = ws["bytes_down"] - w0["bytes_down"]
        r["wan_bytes"] = r["wan_up_bytes"] + r["wan_down_bytes"]
        r["state_at_end"] = end.get("state")
        r["warm_end"] = endd.get("warm")
        r["warm_end_at_source"] = end.get("warm")
        r["samples"] = samples
        self.summarise(r, samples, first_window=10)
        fe = endd.get("warm") or {}
        r.update(hit_ratio_end=fe.get("hit_ratio", r.get("hit_ratio_end")),
                 hydrated_pct_end=fe.get("hydrated_pct", r.get("hydrated_pct_end")),
                 miss_p50_ms=fe.get("miss_p50_ms"), miss_p99_ms=fe.get("miss_p99_ms"),
                 read_hits=fe.get("read_hits"), read_misses=fe.get("read_misses"),
                 evictions=fe.get("evictions"), cache_wan_in_bytes=fe.get("wan_in_bytes"),
                 cache_wan_out_bytes=fe.get("wan_out_bytes"))
        if end.get("state") != "warm":
            raise BenchError(f"the warm migration left state 'warm' during the window: "
                             f"{end.get('state')}: {end.get('error')}")
        # the destination VM's log goes with it at migrate-back: a copy
        con = Path(r["dir"]) / "cloud" / "data" / "vms" / "vm1" / "console.log"
        if con.exists():
            shutil.copy(con, Path(r["dir"]) / "cloud-vm1-console.log")
        # back to the source, and its data checked there
        # (asked again once if it fails: ferry says the operator may)
        r["migrate_back_attempts"] = []
        wb0 = self.wan_stats(wctl)
        for attempt in (1, 2):
            t1 = time.monotonic()
            b = self.ferry(A, "-o", "json", "migrate-back", "vm1", check=False,
                           timeout=self.a.timeout)
            took = time.monotonic() - t1
            mb = self.fj(A, "migration", "show", mid)
            r["state"] = mb.get("state")
            ok = b.returncode == 0 and mb.get("state") == "returned"
            why = "" if ok else (b.stderr.strip() or b.stdout.strip() or mb.get("error") or "")
            r["migrate_back_attempts"].append({"exit": b.returncode, "s": round(took, 2),
                                               "state_after": mb.get("state"),
                                               "phase_after": (mb.get("progress") or {})
                                               .get("phase"), "error": why[:500]})
            print(f"#   migrate-back #{attempt}: exit {b.returncode} after {took:.1f} s, state "
                  f"{mb.get('state')}{': ' + why[:300] if why else ''}", file=sys.stderr)
            if ok:
                r["migrate_back_s"] = took
                wb1 = self.wan_stats(wctl)
                r["migrate_back_wan_bytes"] = (wb1["bytes_up"] - wb0["bytes_up"]
                                               + wb1["bytes_down"] - wb0["bytes_down"])
                break
            time.sleep(2)
        if r["state"] != "returned":
            a0 = r["migrate_back_attempts"][0]
            raise BenchError(f"migrate-back: exit {a0['exit']} after {a0['s']:.0f} s, state "
                             f"{a0['state_after']}: {a0['error']}; asked again: "
                             f"{r['migrate_back_attempts'][-1]['error'] or 'ok'}")
        self.note_vms(A)
        r.update(self.verify(A, "source"))
        return r

    # ---- live --------------------------------------------------------------
    def live(self, s, r):
        A, B, wctl = s["A"], s["B"], s["wctl"]
        w0 = self.wan_stats(wctl)

        def once(t):
            x = {"t": round(t, 2)}
            for site, api in (("source", A), ("destination", B)):
                try:
                    vm = self.vm_sample(api)
                except Exception:
                    vm = None
                if vm:
                    x.update(vm)
                    x["vm_at"] = site
                    break
            ws = self.wan_stats(wctl)
            x["wan_up_bytes"] = ws["bytes_up"] - w0["bytes_up"]
            x["wan_down_bytes"] = ws["bytes_down"] - w0["bytes_down"]
            return x

        samples, stop = [], threading.Event()
        wall0 = time.time()
        t0 = time.monotonic()
        th = threading.Thread(target=self.sampler, args=(stop, samples, t0, once), daemon=True)
        th.start()
        extra = ["--max-downtime", self.a.max_downtime] if self.a.max_downtime else []
        cmd = [str(self.build / "ferry"), "--api", A, "-o", "json", "migrate", "vm1", "--to",
               "cloud", "--wait", *extra]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Watched meanwhile: a migration that never converges is given up (and
            # cancelled) after --converge-timeout rather than at --timeout.
            mid, conv_since, last_check, last = None, None, 0.0, {}
            while p.poll() is None:
                time.sleep(0.2)
                now = time.monotonic()
                if now - t0 > self.a.timeout:
                    raise BenchError(f"live migration did not end within {self.a.timeout:.0f} s")
                if now - last_check < 5:
                    continue
                last_check = now
                try:
                    ms = self.fj(A, "migration", "list", timeout=20)["migrations"]
                    last = ms[-1] if ms else {}
                    mid = last.get("id", mid)
                except Exception:
                    continue
                phase = (last.get("progress") or {}).get("phase")
                if phase != "converging":
                    conv_since = None
                    continue
                conv_since = conv_since or now
                if now - conv_since > self.a.converge_timeout:
                    r["migration"] = mid
                    verdict = (last.get("progress") or {}).get("verdict")
                    try:
                        self.ferry(A, "migration", "cancel", mid, check=False, timeout=60)
                    except Exception:
                        pass
                    raise BenchError(
                        f"live migration {mid} still converging after "
                        f"{self.a.converge_timeout:.0f} s ({verdict}); cancelled. A larger "
                        f"--max-downtime (ferry's default is 500ms) may let it converge")
            out, err = p.communicate(timeout=30)
        finally:
            cli_s = time.monotonic() - t0
            stop.set()
            th.join(60)
            if p.poll() is None:
                p.kill()
                p.wait()
        p = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        try:
            m = json.loads(p.stdout)
        except ValueError:
            m = None
        ws = self.wan_stats(wctl)
        r["samples"] = samples
        r["wan_up_bytes"] = ws["bytes_up"] - w0["bytes_up"]
        r["wan_down_bytes"] = ws["bytes_down"] - w0["bytes_down"]
        r["wan_bytes"] = r["wan_up_bytes"] + r["wan_down_bytes"]
        if p.returncode != 0 or not m or m.get("state") != "completed":
            state = m.get("state") if m else "?"
            err = (m or {}).get("error") or p.stderr.strip() or p.stdout.strip()
            raise BenchError(f"live migration: exit {p.returncode}, state {state}: {err}")
        prog = m.get("progress") or {}
        cut = prog.get("cutover") or {}
        r.update(migration=m["id"], state=m["state"], cli_time_to_running_s=cli_s,
                 pause_ms=cut.get("downtime_ms"),
                 data_sent=(prog.get("bytes") or {}).get("data_sent"),
                 resent=(prog.get("bytes") or {}).get("resent"))
        if cut.get("started_ns"):
            r["time_to_running_s"] = (cut["started_ns"] / 1e9 - wall0
                                      + (cut.get("downtime_ms") or 0) / 1000.0)
        else:
            r["time_to_running_s"] = cli_s
        self.summarise(r, samples, first_window=10)
        self.note_vms(B)
        r.update(self.verify(B, "destination"))
        return r

    def verify(self, api, where):
        p = self.ferry(api, "-o", "json", "vm", "verify", "vm1", check=False, timeout=600)
        try:
            rep = json.loads(p.stdout)
        except ValueError:
            rep = {}
        ok = rep.get("ok") is True
        out = {"verify_at": where, "verify_ok": ok}
        if not ok:
            out["verify_report"] = rep or (p.stderr.strip() or p.stdout.strip())[:2000]
        return out

    @staticmethod
    def summarise(r, samples, first_window):
        good = [x for x in samples if "error" not in x]
        first = [x for x in good if x["t"] <= first_window + 0.5]
        r["sample_errors"] = len(samples) - len(good)
        r["vm_iops_first10"] = mean(x.get("iops") for x in first)
        r["vm_iops_window"] = mean(x.get("iops") for x in good)
        r["vm_read_p50_ms_first10"] = median(x.get("read_p50_ms") for x in first)
        r["vm_read_p99_ms_first10"] = peak(x.get("read_p99_ms") for x in first)
        r["vm_read_p50_ms_window"] = median(x.get("read_p50_ms") for x in good)
        r["vm_read_p99_ms_window"] = peak(x.get("read_p99_ms") for x in good)
        r["vm_not_running_samples"] = sum(1 for x in good if x.get("iops") is None)
        errs = [x["read_errors"] for x in good if x.get("read_errors") is not None]
        if errs:
            r["vm_read_errors_window"] = errs[-1] - r.get("vm_read_errors_before", 0)
        hr = [x for x in good if x.get("hit_ratio") is not None]
        if hr:
            at10 = [x for x in hr if x["t"] <= first_window + 0.5] or hr[:1]
            r["hit_ratio_10s"] = at10[-1]["hit_ratio"]
            r["interval_hit_ratio_10s"] = at10[-1].get("interval_hit_ratio")
            r["hit_ratio_end"] = hr[-1]["hit_ratio"]
            r["interval_hit_ratio_end"] = hr[-1].get("interval_hit_ratio")
            r["hydrated_pct_10s"] = at10[-1].get("hydrated_pct")
            r["hydrated_pct_end"] = hr[-1].get("hydrated_pct")

    # ---- one method on a fresh pair of sites -------------------------------
    def method(self, ri, key, rate, size, fill):
        d = self.tmp / f"row{ri}-{key}"
        r = {"method": METHODS[key], "rate": rate, "size": size, "fill": fill,
             "delay": self.a.delay, "workload": self.a.workload, "dir": str(d)}
        s = None
        try:
            s = self.setup(d, rate, size, fill)
            r["fill_s"] = s["fill_s"]
            r.update(self.warmup(s))
            print(f"#   {METHODS[key]}: migrating", file=sys.stderr)
            if key in ("hot", "none"):
                self.warm(s, key, r)
            else:
                self.live(s, r)
            if not r.get("verify_ok"):
                self.failed = True
                v = r.get("verify_report") or {}
                kinds = ", ".join(f"{v[k]} {k}" for k in ("lost", "newer", "misplaced",
                                                          "foreign", "unexpected",
                                                          "read_io_errors")
                                  if isinstance(v, dict) and v.get(k))
                r["error"] = f"vm verify at the {r.get('verify_at')} FAILED: {kinds or v}"
            if r.get("vm_read_errors_window"):
                self.failed = True
                r.setdefault("error", "")
                r["error"] = (r["error"] + "; " if r["error"] else "") + (
                    f"the VM read {r['vm_read_errors_window']} bad blocks during the window")
            if r.get("error"):
                print(f"#   {METHODS[key]}: FAILED: {r['error']}", file=sys.stderr)
        except Exception as e:
            self.failed = True
            r["error"] = str(e)
            if s and not r.get("migration"):
                try:
                    ms = self.fj(s["A"], "migration", "list", timeout=20)["migrations"]
                    if ms:
                        r["migration"] = ms[-1]["id"]
                except Exception:
                    pass
            if s and r.get("migration"):
                for site, api in (("source", s["A"]), ("destination", s["B"])):
                    try:
                        mm = self.fj(api, "migration", "show", r["migration"], timeout=20)
                        r[f"state_{site}"] = mm.get("state")
                        r[f"phase_{site}"] = (mm.get("progress") or {}).get("phase")
                        r[f"error_{site}"] = mm.get("error")
                        r[f"verdict_{site}"] = (mm.get("progress") or {}).get("verdict")
                    except Exception as e2:
                        r[f"state_{site}"] = f"? ({e2})"[:200]
                print(f"#   migration {r['migration']}: source {r.get('state_source')} "
                      f"({r.get('phase_source')}), destination {r.get('state_destination')} "
                      f"({r.get('phase_destination')}); {r.get('verdict_source') or ''}",
                      file=sys.stderr)
            logs = {}
            for site in ("onprem", "cloud"):
                logs[site] = self.tail(d / site / "ferryd.log", 40)
            r["log_tail"] = logs
            print(f"#   {METHODS[key]}: FAILED: {e}", file=sys.stderr)
            for site, t in logs.items():
                print(f"#   --- {d / site / 'ferryd.log'} (last lines) ---\n{t}", file=sys.stderr)
        finally:
            if s:
                r["hwm_src_mib"] = hwm_kib(s["pa"].pid) / 1024
                r["hwm_dst_mib"] = hwm_kib(s["pb"].pid) / 1024
                self.kill_vms((s["A"], s["B"]))
                for p in (s["pw"], s["pb"], s["pa"]):
                    self.procs.stop(p)
            self.kill_vms()
            self.procs.stop_all()
            if "error" not in r and self.a.keep != "always":
                shutil.rmtree(d, ignore_errors=True)
        return r

    def run(self):
        results = []
        try:
            for ri, row in enumerate(self.a.rows.split(",")):
                try:
                    rate, size, fill = row.split(":")
                    fill = float(fill)
                except ValueError:
                    raise BenchError(f"bad row '{row}': want RATE:DISK_SIZE:FILL_PERCENT")
                print(f"# {rate}, RTT {self.rtt_ms():g} ms, {size} disk, {fill:g}% filled",
                      file=sys.stderr)
                for key in self.a.methods.split(","):
                    results.append(self.method(ri, key, rate, size, fill))
        finally:
            self.procs.stop_all()
            self.kill_vms()
            keep = self.a.keep == "always" or (self.a.keep and self.failed)
            if keep:
                print(f"# temp dir kept: {self.tmp}", file=sys.stderr)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return results

    def rtt_ms(self):
        v = self.a.delay.strip().lower()
        for unit, f in (("ms", 1.0), ("us", 1e-3), ("ns", 1e-6), ("min", 60000.0), ("s", 1000.0)):
            if v.endswith(unit):
                return 2 * float(v[: -len(unit)]) * f
        return 2 * float(v) * 1000.0 if v not in ("", "0") else 0.0


# ---- report -----------------------------------------------------------------
def f(v, fmt="{:.0f}", none="-"):
    return none if v is None else fmt.format(v)


def mib(v):
    return "-" if v is None else f"{v / (1 << 20):.0f} MiB"


def hr(cum, ivl):
    if cum is None:
        return "-"
    return f"{cum:.3f}" + (f" ({ivl:.3f})" if ivl is not None else "")


def table(results, delay, rtt):
    out = []
    rows = []
    for r in results:
        key = (r["rate"], r["size"], r["fill"])
        if key not in rows:
            rows.append(key)
    for key in rows:
        rate, size, fill = key
        out.append(f"\n### {rate}, {rtt:g} ms RTT ({delay} each way), {size} disk, {fill:g}% "
                   f"filled\n")
        out.append("| method | time to running (s) | downtime / pause (ms) | VM IOPS before / "
                   "first 10 s / window | VM read p50 / p99 ms, first 10 s | hit ratio at 10 s "
                   "/ end | hydrated % end | miss p50 / p99 (ms) | WAN bytes | verify |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            if (r["rate"], r["size"], r["fill"]) != key:
                continue
            if "time_to_running_s" not in r:
                out.append(f"| {r['method']} | FAILED: {r.get('error', '?')[:200]} | | | | | | | | |")
                continue
            ttr = f"{r['time_to_running_s']:.2f}" if r.get("time_to_running_s") is not None else "-"
            ttr += f" (CLI {r['cli_time_to_running_s']:.1f})"
            iops = (f"{f(r.get('vm_iops_before'))} / {f(r.get('vm_iops_first10'))} / "
                    f"{f(r.get('vm_iops_window'))}")
            lat = (f"{f(r.get('vm_read_p50_ms_first10'), '{:.2f}')} / "
                   f"{f(r.get('vm_read_p99_ms_first10'), '{:.1f}')}")
            if r["method"] == "live":
                hits = hyd = miss = "-"
            else:
                hits = (f"{hr(r.get('hit_ratio_10s'), r.get('interval_hit_ratio_10s'))} / "
                        f"{hr(r.get('hit_ratio_end'), r.get('interval_hit_ratio_end'))}")
                hyd = f(r.get("hydrated_pct_end"), "{:.1f}")
                miss = (f"{f(r.get('miss_p50_ms'), '{:.1f}')} / "
                        f"{f(r.get('miss_p99_ms'), '{:.1f}')}")
            ver = "ok" if r.get("verify_ok") else ("FAILED" if "verify_ok" in r else "not run")
            if len(r.get("migrate_back_attempts") or []) > 1 and r.get("state") == "returned":
                ver += " (migrate-back succeeded only when asked again)"
            if r.get("error", "").startswith("migrate-back"):
                ver += (f" (migrate-back failed: {r['migrate_back_attempts'][0]['error'][:80]}; "
                        f"stuck in '{r.get('state')}')")
            elif r.get("error"):
                ver += f" ({r['error'][:160]})"
            out.append(f"| {r['method']} | {ttr} | {f(r.get('pause_ms'))} | {iops} | {lat} | "
                       f"{hits} | {hyd} | {miss} | {mib(r.get('wan_bytes'))} | {ver} |")
    out.append("\nTime to running: ferry's figure (warm: time_to_running_ms; live: migrate "
               "command to the VM resumed at the destination), then the CLI's wall time "
               "(`--wait` polls once a second). IOPS windows: warm from the VM running at the "
               "destination (window = --duration), live from the migrate command (window = "
               "the migration). VM read p99 is the worst second's. Hit ratio: cumulative "
               "(that second's, from the read_hits/read_misses deltas). Miss latency and "
               "hydrated % from the destination at the end of the window. WAN bytes: both "
               "directions through ferry-wan, migrate command to the end of the window. "
               "verify: `ferry vm verify` where the VM ends (warm: at the source after "
               "migrate-back; live: at the destination).")
    return "\n".join(out)


def build_info(a, build):
    """What was measured: the arguments, the tree and the binaries."""
    import hashlib
    meta = {"args": vars(a), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        meta["git_head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                          stdout=subprocess.PIPE, text=True,
                                          timeout=10).stdout.strip()
        meta["git_dirty_files"] = len(subprocess.run(
            ["git", "-C", str(ROOT), "status", "--short"], stdout=subprocess.PIPE, text=True,
            timeout=10).stdout.splitlines())
    except Exception:
        pass
    for b in ("ferryd", "ferry"):
        try:
            st = os.stat(build / b)
            meta[f"{b}_mtime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime))
            meta[f"{b}_md5"] = hashlib.md5((build / b).read_bytes()).hexdigest()
        except OSError:
            pass
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.environ.get("FERRY_BUILD", str(ROOT / "build")))
    ap.add_argument("--rows", default="100mbit:4G:25,1gbit:4G:25")
    ap.add_argument("--delay", default="15ms", help="one-way delay (RTT = 2 x this)")
    ap.add_argument("--workload", default="write=30,bs=4k,iops=800,zipf=0.9,qd=8")
    ap.add_argument("--duration", type=float, default=60,
                    help="seconds sampled once the VM runs at the destination (warm)")
    ap.add_argument("--warmup", type=float, default=10,
                    help="seconds the VM runs at the source before the migration")
    ap.add_argument("--methods", default="hot,none,live",
                    help="comma-separated: hot, none (warm prefetch), live")
    ap.add_argument("--rpo", help="warm --rpo (ferry's default if unset)")
    ap.add_argument("--cache-size", help="warm --cache-size (ferry's default if unset)")
    ap.add_argument("--hydrate-rate", help="warm --hydrate-rate (ferry's default if unset)")
    ap.add_argument("--max-downtime", help="live --max-downtime (ferry's default, 500ms, "
                    "if unset)")
    ap.add_argument("--converge-timeout", type=float, default=300,
                    help="live: give up (and cancel) after this long in phase 'converging'")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="limit for one migrate --wait / migrate-back, seconds")
    ap.add_argument("--log-level", default="info", help="ferryd's --log-level")
    ap.add_argument("--json", help="write every figure and the per-second series here")
    ap.add_argument("--keep", nargs="?", const="failure", choices=("failure", "always"),
                    help="keep the temp dir (with the ferryd logs) when something failed, "
                         "or always")
    a = ap.parse_args()
    for k in a.methods.split(","):
        if k not in METHODS:
            ap.error(f"unknown method '{k}' (hot, none, live)")
    build = Path(a.build)
    for b in ("ferry", "ferryd", "ferry-wan", "ferry-simvm"):
        if not os.access(build / b, os.X_OK):
            sys.exit(f"warm_bench: {build / b} is missing: build first "
                     f"(scripts/build.sh release {a.build})")
    meta = build_info(a, build)
    bench = Bench(a)

    def on_signal(sig, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    res = bench.run()
    print(f"\nwarm vs live migration over ferry-wan, delay {a.delay} each way, VM workload "
          f"{a.workload}, {a.duration:g} s window")
    print(table(res, a.delay, bench.rtt_ms()))
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "results": res}, indent=2))
    sys.exit(1 if bench.failed else 0)


if __name__ == "__main__":
    main()
