"""`python -m vlmpipe.loop.launch`: the GPU stages' command in dvc.yaml.

Fast tests run the launcher on a stand-in script (it joins the process group, reports its rank and
the world, optionally fails) in a folder holding a params file; the slow ones start two launchers as two
machines. The tiny preset's DAG with two processes (`dvc exp run -S launch.nproc_per_node=2`) runs in
test_experiments.py, folded into the lr experiment.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import servers

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
else:
    rank = 0
line = json.dumps({"rank": rank, "world": world, "local_rank": os.environ.get("LOCAL_RANK"),
                   "args": sys.argv[1:], "node": os.environ.get("SLURM_NODEID")})
os.write(1, (line + chr(10)).encode())  # one write: ranks share the pipe
if os.environ.get("FAIL_RANK") == str(rank):
    print("error: rank-specific one-line message", file=sys.stderr)
    sys.exit(3)
if os.environ.get("FAIL_RANK"):  # the others wait, as ranks do at their next collective, until stopped
    import time
    time.sleep(120)
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
"""


def _workdir(tmp_path: Path, **launch) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["launch"].update(launch)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "stage.py").write_text(SCRIPT)
    return tmp_path


def _launch(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlmpipe.loop.launch", *args, "stage.py", "--flag", "x"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _reports(out: str) -> list[dict]:
    return sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def test_one_process_runs_the_script_itself(tmp_path):
    r = _launch(_workdir(tmp_path))
    assert r.returncode == 0, r.stderr
    assert _reports(r.stdout) == [{"rank": 0, "world": 1, "local_rank": None, "args": ["--flag", "x"], "node": None}]
    r = _launch(tmp_path, env={"FAIL_RANK": "0"})
    assert r.returncode == 3 and r.stderr.strip() == "error: rank-specific one-line message"


@pytest.mark.slow  # torchrun, two processes
def test_two_processes_on_one_machine(tmp_path):
    r = _launch(_workdir(tmp_path, nproc_per_node=2))
    assert r.returncode == 0, r.stderr
    assert [(x["rank"], x["world"], x["local_rank"]) for x in _reports(r.stdout)] == [(0, 2, "0"), (1, 2, "1")]
    r = _launch(tmp_path, env={"FAIL_RANK": "1"})
    assert r.returncode == 3
    assert "error: rank-specific one-line message" in r.stderr
    assert "launch: rank 1 exited with code 3" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("launch, key", [
    ({"nproc_per_node": 0}, "launch.nproc_per_node"),
    ({"nnodes": 0}, "launch.nnodes"),
    ({"nproc_per_node": 3}, "siglip.train.batch_size"),  # 128 over 3 processes
    ({"nnodes": 2, "rdzv_endpoint": "no-port"}, "launch.rdzv_endpoint"),
    ({"fanout": "mpirun"}, "launch.fanout"),
])
def test_bad_launch_params_are_one_line_before_anything_starts(tmp_path, launch, key):
    t0 = time.monotonic()
    r = _launch(_workdir(tmp_path, **launch))
    assert r.returncode == 2 and time.monotonic() - t0 < 30
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and key in r.stderr, r.stderr


@pytest.mark.slow  # waits for a rendezvous timeout
def test_an_unreachable_rendezvous_is_one_line_within_the_timeout(tmp_path):
    """The second machine never comes: the first gives up after launch.rdzv_timeout, in one line."""
    _workdir(tmp_path, nnodes=2, rdzv_endpoint=f"127.0.0.1:{servers.free_port()}", rdzv_timeout=3)
    t0 = time.monotonic()
    r = _launch(tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 2 and took < 40, (took, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "launch.rdzv_endpoint" in lines[0] and "3 s" in lines[0], r.stderr
    assert r.stdout == ""  # no rank started


@pytest.mark.slow  # two launchers, four processes
def test_two_machines_meet_at_the_rendezvous(tmp_path):
    """Two launchers with --node, as on two machines, on loopback: one world of 2 x 2 processes."""
    _workdir(tmp_path, nproc_per_node=2, nnodes=2, rdzv_endpoint=f"127.0.0.1:{servers.free_port()}", rdzv_timeout=60)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlmpipe.loop.launch", "--node", "stage.py"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    reports = _reports("".join(o for o, _ in outs))
    assert [(x["rank"], x["world"]) for x in reports] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert sorted(x["local_rank"] for x in reports) == ["0", "0", "1", "1"]


@pytest.mark.slow  # two launchers through a fake srun
def test_srun_fanout_starts_one_launcher_per_machine(tmp_path):
    """launch.fanout: srun inside an allocation: the launcher hands itself to srun with --node, which
    starts it once per machine. A stand-in srun runs those copies on this machine, as SLURM would on
    each node (SLURM_NODEID set), and checks the arguments the launcher gave it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"""#!{sys.executable}
import subprocess, sys, os
args = sys.argv[1:]
opts = [a for a in args[:3]]
assert opts[0].startswith("--nodes=") and opts[1] == "--ntasks-per-node=1" and opts[2] == "--kill-on-bad-exit=1", args
nodes, cmd = int(opts[0].split("=")[1]), args[3:]
assert "--node" in cmd, cmd
procs = [subprocess.Popen(cmd, env={{**os.environ, "SLURM_NODEID": str(i)}}) for i in range(nodes)]
sys.exit(max(p.wait() for p in procs))
""")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "w").mkdir()
    work = _workdir(tmp_path / "w", nnodes=2, rdzv_endpoint=f"127.0.0.1:{servers.free_port()}", rdzv_timeout=60, fanout="srun")
    r = _launch(work, env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}, timeout=180)
    assert r.returncode == 0, r.stderr
    reports = _reports(r.stdout)
    assert [(x["rank"], x["world"]) for x in reports] == [(0, 2), (1, 2)]
    assert sorted(x["node"] for x in reports) == ["0", "1"] and reports[0]["args"] == ["--flag", "x"]
    # Outside an allocation the same params are one line, not a hang.
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    r = subprocess.run([sys.executable, "-m", "vlmpipe.loop.launch", "stage.py"], cwd=work,
                       env={**env, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:{env['PATH']}"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "launch.fanout" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _netns_pair():
    """Two network namespaces joined by a veth pair, 10.77.<n>.1 and .2: two machines with their own
    addresses and no loopback between them. None where this process may not create them."""
    import shutil as sh

    ip = sh.which("ip")
    if ip is None:
        return None
    tag = f"{os.getpid() % 10000}"
    a, b = f"vlm{tag}a", f"vlm{tag}b"
    net = f"10.77.{os.getpid() % 250}"
    cmds = [["netns", "add", a], ["netns", "add", b],
            ["link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"],
            ["link", "set", f"v{tag}a", "netns", a], ["link", "set", f"v{tag}b", "netns", b],
            ["-n", a, "addr", "add", f"{net}.1/24", "dev", f"v{tag}a"],
            ["-n", b, "addr", "add", f"{net}.2/24", "dev", f"v{tag}b"],
            ["-n", a, "link", "set", f"v{tag}a", "up"], ["-n", b, "link", "set", f"v{tag}b", "up"],
            ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"]]
    for c in cmds:
        if subprocess.run([ip, *c], capture_output=True).returncode != 0:
            for ns in (a, b):
                subprocess.run([ip, "netns", "del", ns], capture_output=True)
            return None
    return ip, (a, f"v{tag}a", f"{net}.1"), (b, f"v{tag}b", f"{net}.2")


@pytest.mark.slow  # two launchers in two network namespaces
def test_two_machines_with_their_own_addresses(tmp_path):
    """As above, but each launcher in its own network namespace (its own address, a veth link between
    them): the rendezvous endpoint is the first machine's address, not loopback."""
    pair = _netns_pair()
    if pair is None:
        pytest.skip("cannot create network namespaces here (needs root or CAP_NET_ADMIN and iproute2)")
    ip, (ns_a, if_a, addr_a), (ns_b, if_b, _) = pair
    try:
        _workdir(tmp_path, nnodes=2, rdzv_endpoint=f"{addr_a}:29411", rdzv_timeout=60)
        procs = []
        for ns, iface in ((ns_a, if_a), (ns_b, if_b)):
            # Gloo picks its interface by name: each machine's own link, as on a real cluster.
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": iface}
            procs.append(subprocess.Popen([ip, "netns", "exec", ns, sys.executable, "-m", "vlmpipe.loop.launch", "--node",
                                           "stage.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
        assert [(x["rank"], x["world"]) for x in _reports("".join(o for o, _ in outs))] == [(0, 2), (1, 2)]
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run([ip, "netns", "del", ns], capture_output=True)
