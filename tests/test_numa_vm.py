"""build/numa_vm.py: the multi-node guest runner, booted for real (QEMU TCG, a Debian kernel)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from numa_vm import Topology, parse_size

RUNNER = [sys.executable, str(ROOT / "build" / "numa_vm.py")]


def vm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*RUNNER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT / "tests")


def test_topology_arguments() -> None:
    topo = Topology.build(3, "2,1,0", "1G,512M,256M", ["0-2=40"])
    args = " ".join(topo.qemu_args())
    assert "-smp 3 -m 1792M" in args
    assert "node,nodeid=0,memdev=m0,cpus=0-1" in args and "node,nodeid=1,memdev=m1,cpus=2-2" in args
    assert "node,nodeid=2,memdev=m2 " in args + " "  # memory only: no cpus=
    assert "dist,src=0,dst=2,val=40" in args and "dist,src=0,dst=1,val=20" in args  # QEMU wants every pair
    assert parse_size("1.5G") == 1536 and parse_size("512M") == 512


@pytest.mark.parametrize(
    "nodes,cpus,mem,dist,match",
    [
        (0, "1", "1G", [], "at least 1"),
        (2, "1,1,1", "1G", [], "give one value, or 2"),
        (2, "0", "1G", [], "at least one node needs a CPU"),
        (2, "1", "12K", [], "not a size|at least 64 MiB"),
        (2, "1", "1G", ["0-0=20"], "nodes must differ"),
        (2, "1", "1G", ["0-1"], "SRC-DST=VALUE"),
    ],
)
def test_bad_topology_is_refused(nodes, cpus, mem, dist, match) -> None:
    with pytest.raises(ValueError, match=match):
        Topology.build(nodes, cpus, mem, dist)


@pytest.mark.vm
def test_guest_has_the_topology_asked_for() -> None:
    """Unequal nodes, a memory-only node and a distance, read back from the guest's sysfs."""
    code = (
        "import json, pathlib\n"
        "root = pathlib.Path('/sys/devices/system/node')\n"
        "out = {}\n"
        "for d in sorted(root.glob('node[0-9]*')):\n"
        "    mem = [l for l in (d / 'meminfo').read_text().splitlines() if 'MemTotal' in l][0]\n"
        "    out[d.name] = {'cpus': (d / 'cpulist').read_text().strip(), 'mem_kb': int(mem.split()[-2]),\n"
        "                   'distance': (d / 'distance').read_text().split()}\n"
        "print(json.dumps(out))\n"
    )
    proc = vm(
        "--nodes",
        "3",
        "--cpus-per-node",
        "2,1,0",
        "--mem-per-node",
        "512M,384M,256M",
        "--distance",
        "0-2=40",
        "--",
        sys.executable,
        "-c",
        code,
    )
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)
    assert list(nodes) == ["node0", "node1", "node2"]
    assert [n["cpus"] for n in nodes.values()] == ["0-1", "2", ""]
    for n, mib in zip(nodes.values(), (512, 384, 256), strict=True):
        assert 0.7 * mib * 1024 < n["mem_kb"] <= mib * 1024  # the kernel keeps some for itself
    assert nodes["node0"]["distance"] == ["10", "20", "40"]


@pytest.mark.vm
def test_exit_code_streams_directory_environment_and_scratch_come_back(tmp_path) -> None:
    """One boot: the command runs in the current directory with the environment (quoting intact), its stdout and
    stderr come back apart and unchanged, and so does its exit code; the scratch directory is writable and comes
    back, $TMPDIR is writable, and the host's files are read-only."""
    cwd = tmp_path / "cwd"
    scratch = tmp_path / "scratch"
    cwd.mkdir()
    scratch.mkdir()
    shell = (
        "pwd; echo $MY_VAR; echo $NUMA_VM_NODES; printf 'out\\n1 2\\n'; printf 'err\\n' >&2; "
        'echo result > "$NUMA_VM_SCRATCH/r.txt" && touch "$TMPDIR/ok" && ! touch /etc/nope 2>/dev/null && exit 7'
    )
    proc = subprocess.run(
        [*RUNNER, "--nodes", "2", "--scratch", str(scratch), "--", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**__import__("os").environ, "MY_VAR": "it's 'quoted' $HOME"},
    )
    assert (proc.returncode, proc.stderr) == (7, "err\n"), proc.stderr
    assert proc.stdout.splitlines() == [str(cwd), "it's 'quoted' $HOME", "2", "out", "1 2"]
    assert (scratch / "r.txt").read_text() == "result\n"


@pytest.mark.vm
def test_missing_command_is_a_nonzero_exit() -> None:
    proc = vm("--nodes", "2", "--", "no-such-command-here")
    assert proc.returncode == 127
    assert "no-such-command-here: not found" in proc.stderr


@pytest.mark.vm
def test_time_limit_stops_the_guest() -> None:
    proc = vm("--nodes", "2", "--timeout", "25", "--", "sleep", "600", timeout=120)
    assert proc.returncode == 124
    assert "timed out after 25 s" in proc.stderr
