#!/usr/bin/python3
"""Writes the seed corpus of fuzz_proto (fuzz/corpus/proto): one valid
instance of every message the session protocol parses, as fuzz_proto reads
them (a type byte, then the payload).  Run from anywhere."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "proto")

DATA, CTRL, BLOB, HASHES, ACK, HELLO, HELLO_OK, REPLY = 3, 4, 10, 11, 6, 1, 2, 5
TUNNEL_OPEN, QUERY = 13, 16
WARM_HELLO, WARM_REQ, WARM_REPLY, WARM_FETCH, WARM_FILL, WARM_MAP, WARM_WB = range(18, 25)

# A qemu VM as vm_spec_to_json describes it (the destination parses it with
# vm_spec_from_json).
QEMU_VM = {"name": "vm1", "driver": "qemu", "disks": ["vda"], "workload": "",
           "memory": 268435456, "cpus": 1, "machine": "q35", "cpu_model": "",
           "nics": [{"network": "lan", "model": "virtio-net-pci", "mac": "52:54:00:12:34:56"}],
           "kernel": "", "initrd": "", "append": ""}


def data(disk, kind, flags, off, length, payload=b""):
    return struct.pack("<IBBHQQ", disk, kind, flags, 0, off, length) + payload


seeds = {
    "data": bytes([DATA]) + data(0, 1, 1, 65536, 8, b"ABCDEFGH"),
    "zero": bytes([DATA]) + data(1, 2, 0, 0, 1 << 30),
    "blob": bytes([BLOB]) + struct.pack("<QQ", 0, 5) + b"state",
    "hashes": bytes([HASHES]) + struct.pack("<QIIQ", 7, 0, 2, 10) + struct.pack("<QQ", 1, 2),
    "ack": bytes([ACK]) + struct.pack("<Q", 42),
    "hello": bytes([HELLO]) + json.dumps({
        "protocol": 1, "session": "m-0123456789ab", "migration": "m-0123456789ab",
        "vm": "vm1", "source_site": "onprem",
        "disks": [{"name": "vda", "size": 1 << 30, "granularity": 65536}]}).encode(),
    "hello_ok": bytes([HELLO_OK]) + json.dumps({
        "session": "m-0123456789ab", "applied_seq": 9, "state": "receiving",
        "disks": [{"name": "vda", "bg_hwm": 1048576}]}).encode(),
    "ctrl_hash": bytes([CTRL]) + json.dumps(
        {"op": "hash", "req": 3, "disk": 0, "first": 0, "count": 1024}).encode(),
    "ctrl_hash_list": bytes([CTRL]) + json.dumps(
        {"op": "hash", "req": 3, "disk": 0, "regions": [5, 1, 99]}).encode(),
    "ctrl_state": bytes([CTRL]) + json.dumps(
        {"op": "vm_state", "req": 4, "size": 5, "xxh64": "0123456789abcdef"}).encode(),
    "ctrl_activate": bytes([CTRL]) + json.dumps(
        {"op": "activate", "req": 5, "vm": {"name": "vm1", "driver": "sim",
                                             "workload": "write=70", "disks": ["vda"]}}).encode(),
    "ctrl_flush": bytes([CTRL]) + json.dumps({"op": "flush", "req": 1}).encode(),
    "hello_cold": bytes([HELLO]) + json.dumps({
        "protocol": 1, "session": "m-0123456789ab", "migration": "m-0123456789ab",
        "vm": "vm1", "mode": "cold", "source_site": "onprem",
        "disks": [{"name": "vda", "size": 1 << 30, "granularity": 65536}]}).encode(),
    "ctrl_prepare_incoming": bytes([CTRL]) + json.dumps(
        {"op": "prepare_incoming", "req": 6, "vm": QEMU_VM}).encode(),
    "ctrl_activate_incoming": bytes([CTRL]) + json.dumps(
        {"op": "activate", "req": 7, "incoming": True, "vm": QEMU_VM}).encode(),
    "ctrl_incoming_status": bytes([CTRL]) + json.dumps(
        {"op": "incoming_status", "req": 8}).encode(),
    "ctrl_discard_incoming": bytes([CTRL]) + json.dumps(
        {"op": "discard_incoming", "req": 9}).encode(),
    "tunnel_open": bytes([TUNNEL_OPEN]) + json.dumps({"migration": "m-0123456789ab"}).encode(),
    "query_preflight": bytes([QUERY]) + json.dumps(
        {"op": "preflight", "mode": "live", "vm": QEMU_VM,
         "disks": [{"name": "vda", "size": 1 << 30, "allocated": 1 << 20}]}).encode(),
    "reply": bytes([REPLY]) + json.dumps({"req": 1, "ok": True, "applied_seq": 9}).encode(),
    "warm_hello": bytes([WARM_HELLO]) + json.dumps({
        "protocol": 1, "session": "m-0123456789ab", "migration": "m-0123456789ab",
        "vm": "vm1", "mode": "warm", "source_site": "onprem",
        "disks": [{"name": "vda", "size": 1 << 30, "granularity": 65536}],
        "warm": {"rpo_s": 1200, "quota": [1 << 30], "prefetch": "hot",
                 "hydrate_bps": 1 << 26, "degraded_after_s": 300}}).encode(),
    "warm_req_activate": bytes([WARM_REQ]) + json.dumps(
        {"op": "activate", "req": 2, "vm": {"name": "vm1", "driver": "sim", "disks": ["vda"]},
         "state_size": 5, "state_xxh64": "0123456789abcdef"}).encode(),
    "warm_req_wb_end": bytes([WARM_REQ]) + json.dumps(
        {"op": "wb_end", "req": 3, "point": 1, "size": 4096, "time_ns": 1}).encode(),
    "warm_reply": bytes([WARM_REPLY]) + json.dumps({"req": 3, "ok": True, "point": 1}).encode(),
    "warm_fetch": bytes([WARM_FETCH]) + struct.pack("<IIQ", 0, 16, 1024),
    "warm_fill_data": bytes([WARM_FILL]) + struct.pack("<IIQII", 0, 1, 7, 1, 0) + b"x" * 64,
    "warm_fill_zero": bytes([WARM_FILL]) + struct.pack("<IIQII", 0, 4, 8, 2, 0),
    "warm_fill_error": bytes([WARM_FILL]) + struct.pack("<IIQII", 0, 1, 9, 3, 5),
    "warm_map_holes": bytes([WARM_MAP]) + struct.pack("<IIQ", 0, 1, 0) + struct.pack("<QQ", 3, 0),
    "warm_map_hot": bytes([WARM_MAP]) + struct.pack("<IIQ", 0, 2, 0) + struct.pack("<QQQ", 5, 1, 9),
    "warm_wb": bytes([WARM_WB]) + struct.pack("<QQ", 1, 0) + b"FERRYWBJ" + bytes(56),
}

os.makedirs(OUT, exist_ok=True)
for name, blob in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(blob)
print(f"wrote {len(seeds)} seeds to {OUT}")
