# The file-system workloads of issue 6, run inside a sandbox against one directory; prints one
# JSON object of milliseconds. Used by benches/fs.mjs and the Rust benchmark in
# src/sandbox/linux/fuse_tests.rs, so both measure the same thing.
#   python3 fs_workload.py <dir> <100 MiB file> <node_modules tarball>
import json
import os
import subprocess
import sys
import time

root, big, tarball = sys.argv[1:4]
ms = {}


def timed(name, fn):
    start = time.perf_counter()
    fn()
    ms[name] = (time.perf_counter() - start) * 1000


def create():
    for d in range(10):
        dir_ = os.path.join(root, f"c{d}")
        os.mkdir(dir_)
        for i in range(1000):
            with open(os.path.join(dir_, f"f{i}"), "wb") as f:
                f.write(b"x" * 64)


def stat_all():
    for d in range(10):
        for i in range(1000):
            os.lstat(os.path.join(root, f"c{d}", f"f{i}"))


def read_big():
    total = 0
    with open(big, "rb", buffering=0) as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    assert total == 100 << 20, total


def unpack():
    subprocess.run(["tar", "-xf", tarball, "-C", root], check=True)


timed("create", create)
timed("stat_warm", stat_all)
time.sleep(1.1)  # let FUSE's 1 s entry/attribute cache expire: every stat reaches the server
timed("stat", stat_all)
timed("read", read_big)
timed("unpack", unpack)
print(json.dumps(ms))
