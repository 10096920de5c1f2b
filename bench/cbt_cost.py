#!/usr/bin/python3
"""cbt_cost: what changed-block tracking and heat cost per IO, in instructions
(valgrind --tool=callgrind counts them: repeatable, whatever else the machine
does, unlike wall-clock IOPS on a shared 2-CPU VM).  Not part of the tests.

  bench/cbt_cost.py [--build build] [--ios 20000]

For each workload (4 KiB random read and write, queue depth 1, over a unix
socket), ferryd runs under callgrind twice: with CBT and heat on (the
default) and with --no-cbt --no-heat.  fio's nbd engine does a fixed number
of IOs against a 1 GiB image; a run with no IO gives the fixed cost (start,
stop), which is subtracted.  Reported: instructions per IO in ferryd (all its
threads), and on/off.  Everything runs in a temp dir; every process it starts
is stopped by its pid.
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def total_ir(outdir):
    n = 0
    for f in glob.glob(str(outdir / "callgrind.out.*")):
        for line in open(f, errors="replace"):
            m = re.match(r"summary:\s+(\d+)", line) or re.match(r"totals:\s+(\d+)", line)
            if m:
                n += int(m.group(1))
                break
    return n


def run_one(build, tmp, image, cbt, rw, ios):
    tag = f"{'on' if cbt else 'off'}-{rw}-{ios}"
    d = tmp / tag
    d.mkdir()
    sock = d / "nbd.sock"
    args = ["valgrind", "--tool=callgrind", "--separate-threads=no",
            f"--callgrind-out-file={d}/callgrind.out.%p", str(build / "ferryd"),
            "--data-dir", str(d / "data"), "--api", "127.0.0.1:0", "--no-link",
            "--nbd", f"unix:{sock}", "--log-level", "warn"]
    if not cbt:
        args += ["--no-cbt", "--no-heat"]
    log = open(d / "ferryd.log", "w")
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        ready = d / "data" / "ferryd.json"
        for _ in range(1200):
            if ready.exists():
                break
            time.sleep(0.1)
        api = json.loads(ready.read_text())["api"]
        subprocess.run([str(build / "ferry"), "--api", api, "disk", "add", "bench", "--image",
                        str(image)], check=True, stdout=subprocess.DEVNULL)
        if ios:
            subprocess.run(["fio", "--name=c", "--ioengine=nbd",
                            f"--uri=nbd+unix:///bench?socket={sock}", f"--rw={rw}", "--bs=4k",
                            "--iodepth=1", f"--number_ios={ios}", "--size=1g", "--norandommap",
                            "--randrepeat=1", "--output-format=terse"],
                           check=True, stdout=subprocess.DEVNULL, timeout=1800)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(600)
        log.close()
    return total_ir(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.environ.get("FERRY_BUILD", str(ROOT / "build")))
    ap.add_argument("--ios", type=int, default=20000)
    a = ap.parse_args()
    for tool in ("valgrind", "fio"):
        if not shutil.which(tool):
            sys.exit(f"cbt_cost: {tool} is missing (scripts/setup.sh)")
    build = Path(a.build).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="ferry-cbtcost."))
    try:
        image = tmp / "disk.img"
        with open(image, "wb") as f:
            f.truncate(1 << 30)
        subprocess.run(["fio", "--name=fill", f"--filename={image}", "--rw=write", "--bs=1m",
                        "--size=1g", "--output-format=terse"], check=True,
                       stdout=subprocess.DEVNULL)
        print("| workload | ferryd instructions per IO, CBT+heat on | off | on / off |")
        print("|---|---|---|---|")
        for rw in ("randread", "randwrite"):
            per = {}
            for cbt in (True, False):
                base = run_one(build, tmp, image, cbt, rw, 0)
                full = run_one(build, tmp, image, cbt, rw, a.ios)
                per[cbt] = (full - base) / a.ios
            print(f"| {rw} 4k qd1, unix | {per[True]:,.0f} | {per[False]:,.0f} | "
                  f"{per[True] / per[False]:.3f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
