#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into fuzz/corpus/.

The fuzzers grow the corpora from these; what they add is kept in the repo
too. Run it again after changing a seed; it only adds or replaces the
files named seed-*.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "seed-" + name), "wb") as f:
        f.write(data)


def http(method, path, body=None):
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
    if body is None:
        return (head + "\r\n").encode()
    data = json.dumps(body).encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


BUCKET = {"size": 1000, "one_time_burst": 0, "refill_time": 100}
API = [
    ("GET", "/", None),
    ("GET", "/version", None),
    ("GET", "/vm/config", None),
    ("GET", "/machine-config", None),
    ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "smt": False,
                                "track_dirty_pages": False, "huge_pages": "None"}),
    ("PATCH", "/machine-config", {"vcpu_count": 1}),
    ("PUT", "/boot-source", {"kernel_image_path": "/vmlinux", "initrd_path": "/initrd",
                             "boot_args": "console=ttyS0 reboot=k panic=1"}),
    ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4",
                               "is_root_device": True, "is_read_only": False,
                               "cache_type": "Unsafe", "io_engine": "Sync",
                               "rate_limiter": {"bandwidth": BUCKET, "ops": BUCKET}}),
    ("PUT", "/drives/data", {"drive_id": "data", "socket": "/tmp/blk.sock",
                             "is_root_device": False}),
    ("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/other.ext4"}),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                         "guest_mac": "06:00:ac:10:00:02",
                                         "rx_rate_limiter": {"bandwidth": BUCKET},
                                         "tx_rate_limiter": {"ops": BUCKET}}),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": BUCKET}}),
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PATCH", "/vm", {"state": "Resumed"}),
    ("PUT", "/logger", {"log_path": "/tmp/log", "level": "Debug", "show_level": True,
                        "show_log_origin": True}),
    ("PUT", "/metrics", {"metrics_path": "/tmp/metrics"}),
    ("PUT", "/serial", {"serial_out_path": "/tmp/serial"}),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
    ("PUT", "/balloon", {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 1}),
    ("PUT", "/mmds", {"latest": {"meta-data": {"ami-id": "x"}}}),
    ("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}),
    ("PUT", "/entropy", {"rate_limiter": {"bandwidth": BUCKET}}),
    ("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}),
    ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                                                                      "backend_path": "/m"}}),
]


def api_seeds():
    for i, (method, path, body) in enumerate(API):
        write("api_request", f"{i:02}-{method}-{path.strip('/').replace('/', '-') or 'root'}",
              http(method, path, body))


def config_seeds():
    full = {
        "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4",
                    "is_root_device": True, "is_read_only": True}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "guest_mac": "06:00:ac:10:00:02"}],
        "logger": {"log_path": "/tmp/log", "level": "Info"},
        "metrics": {"metrics_path": "/tmp/metrics"},
        "serial": {"serial_out_path": "/tmp/serial"},
    }
    write("config_file", "full", json.dumps(full, indent=1).encode())
    write("config_file", "minimal", json.dumps({"boot-source": {"kernel_image_path": "/proc/self/exe"}}).encode())


def launch_seeds():
    blk = {"kind": "blk", "device_id": "rootfs", "args": ["--readonly", "--queues", "2"],
           "tap": None, "tap_queue_pairs": 0}
    net = {"kind": "net", "device_id": "eth0", "args": ["--mac", "06:00:ac:10:00:02"],
           "tap": "tap0", "tap_queue_pairs": 1}
    write("launch_request", "blk", bytes([2]) + json.dumps(blk).encode())
    write("launch_request", "net", bytes([1]) + json.dumps(net).encode())


# vhost-user requests (frontend to backend) and the header flag of version 1.
GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_MEM_TABLE, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 5, 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, GET_INFLIGHT_FD, SET_INFLIGHT_FD, GET_MAX_MEM_SLOTS, ADD_MEM_REG = 24, 31, 32, 36, 37
VERSION = 0x1
NEED_REPLY = 0x8


def msg(request, payload=b"", flags=VERSION):
    return struct.pack("=III", request, flags, len(payload)) + payload


def u64(v):
    return struct.pack("=Q", v)


def region(gpa, size, uaddr, offset):
    return struct.pack("=QQQQ", gpa, size, uaddr, offset)


def handshake(features, protocol_features, queues):
    out = msg(GET_FEATURES) + msg(SET_FEATURES, u64(features))
    out += msg(GET_PROTOCOL_FEATURES) + msg(SET_PROTOCOL_FEATURES, u64(protocol_features))
    out += msg(SET_OWNER) + msg(GET_QUEUE_NUM) + msg(GET_MAX_MEM_SLOTS)
    out += msg(GET_CONFIG, struct.pack("=III", 0, 60, 0) + bytes(60))
    out += msg(SET_MEM_TABLE, struct.pack("=II", 1, 0) + region(0, 0x10000, 0x7f0000000000, 0))
    out += msg(GET_INFLIGHT_FD, struct.pack("=QQHH", 0, 0, queues, 256))
    out += msg(SET_INFLIGHT_FD, struct.pack("=QQHH", 0x3000, 0, queues, 256))
    for q in range(queues):
        out += msg(SET_VRING_NUM, struct.pack("=II", q, 256))
        out += msg(SET_VRING_ADDR, struct.pack("=IIQQQQ", q, 0, 0x7f0000000000,
                                               0x7f0000001000, 0x7f0000002000, 0))
        out += msg(SET_VRING_BASE, struct.pack("=II", q, 0))
        out += msg(SET_VRING_KICK, u64(q))
        out += msg(SET_VRING_CALL, u64(q))
        out += msg(SET_VRING_ENABLE, struct.pack("=II", q, 1), VERSION | NEED_REPLY)
    out += msg(ADD_MEM_REG, u64(0) + region(0x100000, 0x1000, 0x7f0000100000, 0), VERSION | NEED_REPLY)
    for q in range(queues):
        out += msg(GET_VRING_BASE, struct.pack("=II", q, 0))
    return out


def vhost_user_seeds():
    version_1, protocol, event_idx = 1 << 32, 1 << 30, 1 << 29
    # Protocol features: MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD, CONFIGURE_MEM_SLOTS.
    pf = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 12) | (1 << 15)
    write("vhost_user_blk", "handshake", handshake(version_1 | protocol | event_idx, pf, 2))
    write("vhost_user_blk", "no-protocol-features", handshake(version_1, 0, 1))
    write("vhost_user_net", "handshake", handshake(version_1 | protocol | event_idx | (1 << 15), pf, 2))


if __name__ == "__main__":
    api_seeds()
    config_seeds()
    launch_seeds()
    vhost_user_seeds()
