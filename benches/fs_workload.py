# The file-system workloads of `npm run bench fs`, run inside a sandbox against one mount by one
# lean process (the baseline is the file system, not the generator); prints one JSON object of
# milliseconds. Used by the Rust benchmark in src/sandbox/linux/fuse_tests.rs, which runs it on a
# FUSE mount with ACLs and on a bind mount in the same sandbox.
#   python3 fs_workload.py <work dir> <seed dir> <node_modules tarball>
# <seed dir> was filled by the host before the sandbox started (see `seed` below, mirrored in
# Rust): stat/c0..c9/f0..f999, tree/ (50 000 entries), repo/ (a git repository of 20 000 files),
# big.bin (100 MiB).
import json
import os
import subprocess
import sys
import time

work, seed, tarball = sys.argv[1:4]
ms = {}


def timed(name, fn):
    start = time.perf_counter()
    fn()
    ms[name] = (time.perf_counter() - start) * 1000


def create():
    for d in range(10):
        dir_ = os.path.join(work, f"c{d}")
        os.mkdir(dir_)
        for i in range(1000):
            fd = os.open(os.path.join(dir_, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 64)
            os.close(fd)


def stat_seeded():
    for d in range(10):
        for i in range(1000):
            os.lstat(os.path.join(seed, "stat", f"c{d}", f"f{i}"))


def find():
    # one lstat per entry (%s), as `find -size`, `du` or an indexer do
    out = subprocess.run(
        ["find", os.path.join(seed, "tree"), "-printf", "%s\n"],
        check=True,
        stdout=subprocess.PIPE,
    ).stdout
    assert out.count(b"\n") >= 50_000, out.count(b"\n")


def unpack():
    subprocess.run(["tar", "-xf", tarball, "-C", work], check=True)


def git_status():
    subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", os.path.join(seed, "repo"), "status", "--porcelain"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def read_big():
    total = 0
    with open(os.path.join(seed, "big.bin"), "rb", buffering=0) as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    assert total == 100 << 20, total


def write_big():
    chunk = b"\xab" * (1 << 20)
    with open(os.path.join(work, "written.bin"), "wb", buffering=0) as f:
        for _ in range(100):
            f.write(chunk)


timed("create", create)
timed("stat_cold", stat_seeded)  # first access through this mount
timed("stat_warm", stat_seeded)
timed("find", find)
timed("unpack", unpack)
git_status()  # the first run refreshes the index's stat data; agents run it again and again
timed("git_status", git_status)
timed("read", read_big)
timed("write", write_big)
print(json.dumps(ms))
