#!/usr/bin/env python3
"""Run a command inside a multi-node Linux guest, on this machine's files.

    python build/numa_vm.py --nodes 2 -- numactl --hardware
    python build/numa_vm.py --nodes 3 --cpus-per-node 2,2,0 --mem-per-node 1G,1G,512M \\
        --distance 0-1=20 --distance 0-2=40 -- python -P -m pytest -m numa_guest

The guest is QEMU (TCG: nested KVM hangs at boot on our machines; ``--accel
kvm`` where it works) running a Debian kernel (``apt-get download``, unpacked,
never installed) from a busybox initramfs. It mounts this machine's root
filesystem read-only over 9p, chroots into it, and runs COMMAND in the current
directory with the current environment, so the same virtualenv and the same
files are used. A writable scratch directory (``$NUMA_VM_SCRATCH``, the same
path on both sides) carries results back; ``$TMPDIR`` in the guest is a tmpfs
(``/run/tmp``), and the host's ``/tmp`` stays visible, read-only.

COMMAND's stdout and stderr are streamed back separately (two extra serial
ports) and its exit code is this program's. Failures of the guest itself (a
kernel panic, a failed mount, a time-out) exit 125 (124 for the time-out) and
print the guest console's last lines. Everything it needs is fetched once and
cached in ``~/.cache/numa-llama/guest`` (``NUMA_LLAMA_CACHE``).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from upstream import cache_dir  # noqa: E402

# Loaded in this order: each needs the ones before it (design.md).
MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
]
# host tool -> the Debian package that provides it (numactl: what people run in a guest first)
HOST_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "numactl": "numactl",
    "strace": "strace",  # the guest tests count the system calls of a decode
}
KERNEL_META = "linux-image-amd64"
EXIT_TIMEOUT, EXIT_GUEST_FAILED = 124, 125

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "NUMA_VM_FAIL: $*"; echo "NUMA_VM_EXIT=125"; sync; poweroff -f; }
# the loopback interface, for servers and their clients inside the guest (the guest has no other network device)
ip link set lo up || fail "cannot bring up the loopback interface"
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^numa_vm\.$1=//p"; }
for m in $(cat /modules.order); do
    insmod "/modules/$m.ko" || fail "insmod $m"
done
scratch=$(arg scratch)
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /newroot \
    || fail "cannot mount the host's root filesystem (9p)"
mount -t proc proc /newroot/proc || fail "mount /proc"
mount -t sysfs sys /newroot/sys || fail "mount /sys"
mount -t devtmpfs dev /newroot/dev || fail "mount /dev"
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm || fail "mount /dev/shm"
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs run /newroot/run || fail "mount /run"
mkdir -p /newroot/run/tmp
mkdir -p "/newroot$scratch" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 scratch "/newroot$scratch" \
    || fail "cannot mount the scratch directory $scratch (9p)"
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
echo "NUMA_VM_READY"
chroot /newroot /bin/sh "$scratch/run.sh" > /dev/ttyS1 2> /dev/ttyS2
echo "NUMA_VM_EXIT=$?"
sync
poweroff -f
"""


class VMError(RuntimeError):
    """The guest could not be prepared; the message says what is missing."""


def log(msg: str) -> None:
    print(f"numa_vm: {msg}", file=sys.stderr, flush=True)


# -- topology ------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``1.5G``, ``1024`` (MiB) -> MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 1G)")
    scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    mib = int(float(m.group(1)) * scale)
    if mib < 64:
        raise ValueError(f"{text!r}: a node needs at least 64 MiB")
    return mib


@dataclass
class Topology:
    cpus: list[int]
    mem_mib: list[int]
    distances: dict[tuple[int, int], int] = field(default_factory=dict)

    @classmethod
    def build(cls, nodes: int, cpus: str, mem: str, distances: list[str]) -> Topology:
        if nodes < 1:
            raise ValueError("--nodes must be at least 1")

        def per_node(value: str, conv, what: str) -> list:
            items = [v for v in value.split(",") if v.strip()]
            if len(items) == 1:
                items = items * nodes
            if len(items) != nodes:
                raise ValueError(f"{what}: give one value, or {nodes} comma-separated values (got {value!r})")
            return [conv(v) for v in items]

        cpu_list = per_node(cpus, int, "--cpus-per-node")
        if any(c < 0 for c in cpu_list) or sum(cpu_list) < 1:
            raise ValueError("--cpus-per-node: counts must be >= 0 and at least one node needs a CPU")
        topo = cls(cpu_list, per_node(mem, parse_size, "--mem-per-node"))
        for spec in distances:
            m = re.fullmatch(r"(\d+)-(\d+)=(\d+)", spec.strip())
            if not m:
                raise ValueError(f"--distance {spec!r}: expected SRC-DST=VALUE, e.g. 0-1=20")
            src, dst, val = map(int, m.groups())
            if not (src < nodes and dst < nodes and src != dst and 10 < val <= 255):
                raise ValueError(f"--distance {spec!r}: nodes must differ and exist, 10 < value <= 255")
            topo.distances[(src, dst)] = topo.distances[(dst, src)] = val
        return topo

    def qemu_args(self) -> list[str]:
        args = ["-smp", str(sum(self.cpus)), "-m", f"{sum(self.mem_mib)}M"]
        first = 0
        for k, (ncpu, mib) in enumerate(zip(self.cpus, self.mem_mib, strict=True)):
            args += ["-object", f"memory-backend-ram,id=m{k},size={mib}M"]
            node = f"node,nodeid={k},memdev=m{k}"
            if ncpu:
                node += f",cpus={first}-{first + ncpu - 1}"
                first += ncpu
            args += ["-numa", node]
        if self.distances:  # QEMU wants every pair once any is given: the rest keep its default, 20
            n = len(self.cpus)
            for src in range(n):
                for dst in range(src + 1, n):
                    args += ["-numa", f"dist,src={src},dst={dst},val={self.distances.get((src, dst), 20)}"]
        return args


# -- the parts -----------------------------------------------------------------


def _static(path: str) -> bool:
    """True for a statically linked executable (the initramfs has no C library)."""
    proc = subprocess.run(["ldd", path], capture_output=True, text=True)
    return proc.returncode != 0 and "not a dynamic executable" in (proc.stdout + proc.stderr)


def ensure_host_packages() -> None:
    missing = sorted(
        {
            pkg
            for tool, pkg in HOST_PACKAGES.items()
            if not shutil.which(tool) or (tool == "busybox" and not _static(shutil.which(tool)))
        }
    )
    if not missing:
        return
    if os.geteuid() != 0:
        raise VMError(f"missing Debian packages {', '.join(missing)}: sudo apt-get install {' '.join(missing)}")
    log(f"installing {', '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise VMError(f"{' '.join(cmd)} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")


def _kernel_package() -> str:
    """The versioned image package the distribution's linux-image-amd64 points at."""
    proc = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True)
    found = re.findall(r"Depends: (linux-image-[\w.+-]+-amd64)", proc.stdout)
    if not found:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        proc = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True)
        found = re.findall(r"Depends: (linux-image-[\w.+-]+-amd64)", proc.stdout)
    if not found:
        raise VMError(f"apt-cache knows no {KERNEL_META}: run apt-get update, or check the Debian sources")
    return found[0]


def ensure_kernel(cache: Path) -> tuple[Path, Path]:
    """(vmlinuz, modules directory) of a Debian kernel, unpacked under ``cache``; never installed."""
    existing = sorted(cache.glob("linux-image-*/boot/vmlinuz-*"))
    if existing:
        vmlinuz = existing[-1]
        root = vmlinuz.parent.parent
        return vmlinuz, next(root.glob("lib/modules/*"))
    package = _kernel_package()
    log(f"fetching the guest kernel {package} (apt-get download; not installed)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise VMError(f"apt-get download {package} failed: {proc.stderr.strip()[-800:]}")
        dest = cache / package
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True)
    return ensure_kernel(cache)


def ensure_initramfs(cache: Path, modules_dir: Path) -> Path:
    """busybox + the 9p/virtio modules + /init, as a gzipped newc cpio; cached by content."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    files = {}
    builtin = (modules_dir / "modules.builtin").read_text() if (modules_dir / "modules.builtin").exists() else ""
    order = []
    for name in MODULES:
        found = list(modules_dir.rglob(f"{name}.ko"))
        if found:
            files[f"modules/{name}.ko"] = found[0].read_bytes()
            order.append(name)
        elif f"/{name}.ko" not in builtin:
            raise VMError(f"kernel module {name} is neither in {modules_dir} nor built in")
    files["modules.order"] = ("\n".join(order) + "\n").encode()
    files["init"] = INIT.encode()
    files["bin/busybox"] = busybox.read_bytes()
    key = hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()[:16]
    out = cache / f"initramfs-{key}.cpio.gz"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
            (root / d).mkdir(parents=True)
        for rel, data in files.items():
            (root / rel).write_bytes(data)
        (root / "init").chmod(0o755)
        (root / "bin" / "busybox").chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input="\n".join(names).encode(), capture_output=True
        )
        if proc.returncode != 0:
            raise VMError(f"cpio failed: {proc.stderr.decode()[-500:]}")
        tmp_out = Path(tmp) / out.name
        tmp_out.write_bytes(gzip.compress(proc.stdout, compresslevel=6))
        tmp_out.replace(out)
    return out


# -- running -------------------------------------------------------------------

SKIP_ENV = {"PWD", "OLDPWD", "SHLVL", "_"}


def write_run_script(scratch: Path, cwd: Path, command: list[str], nodes: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SKIP_ENV and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)}
    env.update(
        NUMA_VM="1",
        NUMA_VM_NODES=str(nodes),
        NUMA_VM_SCRATCH=str(scratch),
        TMPDIR="/run/tmp",  # a tmpfs: the host's /tmp stays visible, read-only
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPYCACHEPREFIX=str(scratch / "pycache"),
        # the guests prove placement, not kernels: TCG runs the sse42 variant about 25x slower than the host, an
        # AVX2 one about 800x; the host verifies every variant (numa_llama/_variants.py). A caller's value wins.
        NUMA_LLAMA_CPU_VARIANT=os.environ.get("NUMA_LLAMA_CPU_VARIANT") or "sse42",
    )
    lines = ["# written by build/numa_vm.py"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(c) for c in command))
    (scratch / "run.sh").write_text("\n".join(lines) + "\n")


class _Pump(threading.Thread):
    """Accepts QEMU's connection on a unix socket and copies what the guest writes to ``sink``."""

    def __init__(self, path: Path, sink) -> None:
        super().__init__(daemon=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.sink = sink

    def run(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(65536):
                self.sink.write(data)
                self.sink.flush()

    def close(self) -> None:
        self.server.close()


def run(command: list[str], topo: Topology, *, timeout: float, scratch: Path | None, accel: str, verbose: bool) -> int:
    ensure_host_packages()
    cache = cache_dir() / "guest"
    cache.mkdir(parents=True, exist_ok=True)
    vmlinuz, modules_dir = ensure_kernel(cache)
    initramfs = ensure_initramfs(cache, modules_dir)
    with tempfile.TemporaryDirectory(prefix="numa-vm-") as tmp:
        work = Path(tmp)
        scratch_dir = Path(scratch).resolve() if scratch else work / "scratch"
        scratch_dir.mkdir(parents=True, exist_ok=True)
        if re.search(r"\s", str(scratch_dir)):
            raise VMError(f"the scratch directory may not contain spaces: {scratch_dir}")
        write_run_script(scratch_dir, Path.cwd(), command, len(topo.cpus))
        pumps = [_Pump(work / "stdout.sock", sys.stdout.buffer), _Pump(work / "stderr.sock", sys.stderr.buffer)]
        for p in pumps:
            p.start()
        accel_arg = "kvm" if accel == "kvm" else "tcg,thread=multi"
        qemu = [
            "qemu-system-x86_64",
            "-accel",
            accel_arg,
            "-cpu",
            "host" if accel == "kvm" else "max",
            *topo.qemu_args(),
            "-kernel",
            str(vmlinuz),
            "-initrd",
            str(initramfs),
            "-append",
            f"console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off numa_vm.scratch={scratch_dir}",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-chardev",
            f"socket,id=out,path={work / 'stdout.sock'}",
            "-serial",
            "chardev:out",
            "-chardev",
            f"socket,id=err,path={work / 'stderr.sock'}",
            "-serial",
            "chardev:err",
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={scratch_dir},mount_tag=scratch,security_model=none,multidevs=remap",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        console: collections.deque[str] = collections.deque(maxlen=40)
        marks: dict[str, str] = {}

        def read_console() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                console.append(line)
                m = re.match(r"NUMA_VM_(READY|EXIT|FAIL)(?:[=:] ?(.*))?$", line.strip())
                if m:
                    marks[m.group(1)] = m.group(2) or ""
                    if m.group(1) == "READY":
                        marks["READY_AT"] = f"{time.monotonic() - t0:.1f}"
                if verbose:
                    print(f"[guest] {line}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=read_console, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(5)
            log(f"timed out after {timeout:g} s; the guest was stopped. Its console's last lines:")
            _tail(console)
            return EXIT_TIMEOUT
        finally:
            for p in pumps:
                p.join(5)
                p.close()
        reader.join(5)
        if verbose and "READY_AT" in marks:
            log(f"guest ready after {marks['READY_AT']} s, finished after {time.monotonic() - t0:.1f} s")
        if "FAIL" in marks:
            log(f"the guest failed: {marks['FAIL']}. Its console's last lines:")
            _tail(console)
            return EXIT_GUEST_FAILED
        if "EXIT" not in marks:
            log(
                f"the guest stopped without running the command to its end (qemu exit {proc.returncode}). "
                "Its console's last lines:"
            )
            _tail(console)
            return EXIT_GUEST_FAILED
        return int(marks["EXIT"])


def _tail(lines: collections.deque[str]) -> None:
    for line in lines:
        print(f"  | {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="build/numa_vm.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=2, help="NUMA nodes (default 2)")
    ap.add_argument("--cpus-per-node", default="1", help="CPUs per node: N, or N0,N1,... (0: a memory-only node)")
    ap.add_argument("--mem-per-node", default="1G", help="memory per node: SIZE, or S0,S1,... (default 1G)")
    ap.add_argument(
        "--distance",
        action="append",
        default=[],
        metavar="SRC-DST=VAL",
        help="NUMA distance between two nodes (repeatable; default: QEMU's 10/20)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("NUMA_VM_TIMEOUT", 1800)),
        help="seconds before the guest is killed (default 1800, or $NUMA_VM_TIMEOUT)",
    )
    ap.add_argument("--scratch", help="writable directory shared with the guest (default: a temporary one)")
    ap.add_argument(
        "--accel",
        choices=["tcg", "kvm"],
        default="tcg",
        help="tcg (default; works everywhere) or kvm (where nested KVM works)",
    )
    ap.add_argument(
        "--or-host",
        action="store_true",
        help="run COMMAND directly when this machine itself has at least --nodes NUMA nodes",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="show the guest console and the boot time")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command: use -- COMMAND ARGS...")
    if args.or_host and len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) >= args.nodes:
        log(f"this machine has {args.nodes}+ NUMA nodes: running the command here, not in a guest")
        return subprocess.run(command).returncode
    try:
        topo = Topology.build(args.nodes, args.cpus_per_node, args.mem_per_node, args.distance)
        return run(command, topo, timeout=args.timeout, scratch=args.scratch, accel=args.accel, verbose=args.verbose)
    except (ValueError, VMError) as e:
        log(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
