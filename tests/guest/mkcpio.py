#!/usr/bin/env python3
"""mkcpio.py STAGING OUT.cpio.gz: writes STAGING as a gzipped newc cpio
archive for the kernel's initramfs, plus /dev/console (char 5:1), which the
kernel opens as init's stdin/stdout/stderr before /init runs.

Written here instead of `find | cpio -o -H newc` so that the build needs no
root (mknod for /dev/console) and the archive is reproducible: entries
sorted, owner 0:0, mtime 0, gzip mtime 0.  Used by tests/guest/build.sh.
"""
import gzip
import os
import stat
import sys


def entry(out, ino, name, mode, data=b"", rdev=(0, 0), nlink=1):
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (
        ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
    out.write(hdr.encode() + nb)
    out.write(b"\0" * (-(110 + len(nb)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: mkcpio.py STAGING OUT.cpio.gz")
    root, dst = sys.argv[1], sys.argv[2]
    paths = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for n in sorted(dirs + files):
            paths.append(os.path.relpath(os.path.join(d, n), root))
    paths.sort()
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=9) as out:
        ino = 1
        for p in paths:
            full = os.path.join(root, p)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entry(out, ino, p, stat.S_IFDIR | mode, nlink=2)
            elif stat.S_ISLNK(st.st_mode):
                entry(out, ino, p, stat.S_IFLNK | 0o777, os.readlink(full).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as src:
                    entry(out, ino, p, stat.S_IFREG | mode, src.read())
            else:
                sys.exit(f"mkcpio: {full}: not a file, directory or symlink")
            ino += 1
        if "dev" not in paths:
            entry(out, ino, "dev", stat.S_IFDIR | 0o755, nlink=2)
            ino += 1
        entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        entry(out, 0, "TRAILER!!!", 0)
    os.replace(tmp, dst)


if __name__ == "__main__":
    main()
