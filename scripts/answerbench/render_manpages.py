#!/usr/bin/env python3
"""Render a fixed list of Debian manual pages to plain text.

Usage:  python3 render_manpages.py OUTDIR [--jobs N]

Writes OUTDIR/<name>.<section>.txt (e.g. open.2.txt, ldd.1.txt) for every page
in PAGES, plus OUTDIR/MANIFEST.tsv (page, source file, sha256 of the text) and
OUTDIR/VERSIONS.txt (the Debian package versions used).

Source: the Debian packages `manpages` and `manpages-dev` (every page in PAGES
must be a regular file shipped by one of them), rendered with man-db + groff:

    LC_ALL=C.UTF-8 MANWIDTH=80 man --nh --nj -l FILE | col -bx

(--nh/--nj: no hyphenation, no justification, so sentences are not split into
word fragments and spacing is single; col -bx strips overstrikes and tabs.)
The output only depends on the package versions, so it is deterministic; the
versions are checked against the ones the questions were written for and a
warning is printed if they differ.

If something is missing the script stops with a message naming the apt-get
command that installs it.
"""

import argparse
import concurrent.futures as cf
import hashlib
import os
import shutil
import subprocess
import sys

PACKAGES = ["manpages", "manpages-dev", "man-db", "groff-base", "bsdextrautils"]  # col: bsdextrautils
# Versions the questions in questions.jsonl were written against (Debian 12).
EXPECTED = {
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "man-db": "2.11.2-2",
    "groff-base": "1.22.4-10",
    "bsdextrautils": "2.38.1-5+deb12u3",
}
INSTALL = "apt-get update && apt-get install -y manpages manpages-dev man-db groff-base bsdextrautils"

# 118 pages. Pages that questions.jsonl uses, plus distractors on the same
# topics (files/fds, processes/signals, sockets/networking, libc strings/time,
# login/config files, IPC, locales).
PAGES = """
getent.1 iconv.1 ldd.1 locale.1 localedef.1 memusage.1 mtrace.1 pldd.1 sprof.1

_exit.2 accept.2 access.2 alarm.2 bind.2 chmod.2 close.2 connect.2 dup.2
execve.2 fcntl.2 flock.2 fork.2 fsync.2 getpid.2 kill.2 link.2 listen.2
lseek.2 mkdir.2 mmap.2 nanosleep.2 nice.2 open.2 pipe.2 poll.2 read.2
reboot.2 rename.2 select.2 sendfile.2 sigaction.2 socket.2 stat.2 symlink.2
truncate.2 umask.2 unlink.2 vfork.2 wait.2 write.2

abort.3 assert.3 atexit.3 ctime.3 dlopen.3 errno.3 exit.3 fgetc.3 fnmatch.3
fopen.3 getenv.3 getline.3 getopt.3 glob.3 malloc.3 mkstemp.3 perror.3
popen.3 printf.3 pthread_create.3 rand.3 setenv.3 sleep.3 strerror.3
strftime.3 strtol.3 system.3 usleep.3

core.5 filesystems.5 group.5 host.conf.5 hosts.5 issue.5 motd.5 nologin.5
nsswitch.conf.5 resolv.conf.5 services.5 shells.5 tzfile.5 utmp.5

ascii.7 capabilities.7 credentials.7 environ.7 epoll.7 fifo.7 glob.7 hier.7
hostname.7 inotify.7 ip.7 mq_overview.7 path_resolution.7 pipe.7 pthreads.7
random.7 regex.7 sem_overview.7 signal-safety.7 signal.7 socket.7 tcp.7
time.7 udp.7 unix.7 utf-8.7
""".split()


def die(msg):
    sys.stderr.write("render_manpages.py: error: " + msg + "\n")
    sys.exit(2)


def package_versions():
    vers, missing = {}, []
    for p in PACKAGES:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", p], capture_output=True, text=True
        )
        if r.returncode != 0 or not r.stdout.startswith("install ok installed"):
            missing.append(p)
        else:
            vers[p] = r.stdout.split("\t", 1)[1]
    return vers, missing


def package_files():
    r = subprocess.run(
        ["dpkg-query", "-L", "manpages", "manpages-dev"], capture_output=True, text=True, check=True
    )
    return set(r.stdout.split())


def render(page):
    name, sec = page.rsplit(".", 1)
    src = f"/usr/share/man/man{sec}/{page}.gz"
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "MANWIDTH": "80",
        "MANPAGER": "cat",
        "PAGER": "cat",
        "HOME": "/nonexistent",
    }
    man = subprocess.run(["man", "--nh", "--nj", "-l", src], env=env, capture_output=True, timeout=120)
    if man.returncode != 0 or not man.stdout.strip():
        raise RuntimeError(
            f"man failed on {src} (rc={man.returncode}): " + man.stderr.decode("utf-8", "replace")[:500]
        )
    col = subprocess.run(
        ["col", "-bx"], input=man.stdout, env=env, capture_output=True, timeout=120, check=True
    )
    text = col.stdout.decode("utf-8")
    # Trailing blanks are not meaningful; keep everything else byte-for-byte.
    text = "\n".join(line.rstrip() for line in text.splitlines()).strip("\n") + "\n"
    return page, src, text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    vers, missing = package_versions()
    if missing:
        die("missing Debian package(s): " + ", ".join(missing) + f".\nInstall them with:\n    {INSTALL}")
    for tool in ("man", "col", "groff"):
        if shutil.which(tool) is None:
            die(f"'{tool}' not found on PATH.\nInstall it with:\n    {INSTALL}")
    owned = package_files()
    bad = []
    for page in PAGES:
        sec = page.rsplit(".", 1)[1]
        src = f"/usr/share/man/man{sec}/{page}.gz"
        if src not in owned:
            bad.append(f"{src} (not shipped by manpages/manpages-dev)")
        elif not os.path.isfile(src) or os.path.islink(src):
            bad.append(
                f"{src} (absent or a symlink: man pages may be excluded by "
                "a dpkg path-exclude rule, e.g. in /etc/dpkg/dpkg.cfg.d/)"
            )
    if bad:
        die(
            "cannot find these pages:\n    "
            + "\n    ".join(bad)
            + "\nReinstall with:\n    apt-get install -y --reinstall manpages manpages-dev"
        )
    for p, v in EXPECTED.items():
        if p in ("manpages", "manpages-dev", "man-db", "groff-base") and vers.get(p) != v:
            sys.stderr.write(
                f"warning: {p} is {vers.get(p)}, questions were written "
                f"against {v}; run check_questions.py to verify\n"
            )

    os.makedirs(args.outdir, exist_ok=True)
    results = {}
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        for page, src, text in ex.map(render, PAGES):
            results[page] = (src, text)
    manifest = []
    for page in sorted(results):
        src, text = results[page]
        with open(os.path.join(args.outdir, page + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
        manifest.append(f"{page}.txt\t{src}\t{hashlib.sha256(text.encode()).hexdigest()}")
    with open(os.path.join(args.outdir, "MANIFEST.tsv"), "w") as f:
        f.write("\n".join(manifest) + "\n")
    with open(os.path.join(args.outdir, "VERSIONS.txt"), "w") as f:
        for p in PACKAGES:
            f.write(f"{p}\t{vers[p]}\n")
        f.write("command\tLC_ALL=C.UTF-8 MANWIDTH=80 man --nh --nj -l FILE | col -bx\n")
    print(f"rendered {len(results)} pages to {args.outdir} " + " ".join(f"{p}={vers[p]}" for p in PACKAGES))


if __name__ == "__main__":
    main()
