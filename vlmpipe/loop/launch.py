"""``python -m vlmpipe.loop.launch [--node] [--rdzv-endpoint HOST:PORT] stages/STAGE.py``: run a GPU stage
with as many processes as the ``launch`` params say.

dvc.yaml runs every GPU stage through this, so ``dvc exp run -S launch.nproc_per_node=4`` trains on
four GPUs, and ``launch.nproc_per_node`` / ``launch.nnodes`` are stage params that dvc.lock records.

- 1 process on 1 machine (the default): the script replaces this process (``exec``), exactly as
  ``python stages/STAGE.py`` would run, with this checkout first on ``PYTHONPATH``; nothing of torch is
  imported here.
- N processes on 1 machine: torchrun (``torch.distributed.run``) with ``--standalone``.
- M machines: this machine's torchrun joins a c10d rendezvous at ``launch.rdzv_endpoint`` (its id is
  the stage name), waiting at most ``launch.rdzv_timeout`` seconds for the endpoint and the other
  machines. With ``launch.fanout: srun`` (inside a SLURM allocation) the launcher starts one
  ``--node`` launcher per machine through srun; with ``none`` the other machines run
  ``python -m vlmpipe.loop.launch --node stages/STAGE.py`` themselves (deploy/ has recipes).
  Every machine must see the same repository (a shared filesystem): each rank reads the data and
  rank 0 writes the outputs.

Failures are one line: bad launch params before anything starts; a rendezvous that times out or
cannot be reached names ``launch.rdzv_endpoint``; a rank that fails has already said why (its own
one-line error or traceback), and the launcher exits with its code.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from vlmpipe.core.errors import UserError, stage_entry
from vlmpipe.core.params import LaunchParams, check_endpoint

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository this vlmpipe package sits in


def _route_source(host: str, port: int) -> str | None:
    """This machine's address on the route to ``host`` (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return None


def _is_own_address(host: str) -> bool:
    """``host`` is an address of one of this machine's interfaces (binding to it works)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return True
    except OSError:
        return False


def torchrun_args(launch: LaunchParams, script: str, rest: list[str], endpoint: str) -> list[str]:
    """torch.distributed.run's arguments for this machine's share of the launch."""
    args = ["--nproc-per-node", str(launch.nproc_per_node), "--max-restarts", "0"]
    if launch.nnodes == 1:
        args += ["--standalone"]
    else:
        t = launch.rdzv_timeout
        # join_timeout: how long to wait for the other machines; read_timeout: for the store at the
        # endpoint to answer (torch's defaults, 600 s and 60 s, leave a user waiting ten minutes).
        conf = f"join_timeout={t},read_timeout={t},timeout={t}"
        host, _, port = endpoint.rpartition(":")
        # torch guesses whether this machine hosts the store from its hostname's addresses and misses
        # a second interface's (a cluster network, a namespace): say so when the endpoint is ours.
        # Loopback is left to torch, which then lets one launcher per machine host (tests run two).
        if host not in ("localhost", "127.0.0.1") and _is_own_address(host):
            conf += ",is_host=1"
        args += ["--nnodes", str(launch.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                 "--rdzv-id", Path(script).stem, "--rdzv-conf", conf]
        # The address the other machines reach this one at (the ranks' MASTER_ADDR when rank 0 is here):
        # the one on the route to the endpoint, not whatever the hostname resolves to.
        local = _route_source(host, int(port))
        if local:
            args += ["--local-addr", local]
    return [*args, script, *rest]


def _run_torchrun(args: list[str], endpoint: str, timeout: int) -> int:
    # c10d's C++ store prints a stack dump per failed connection attempt; the launcher says it in one
    # line instead. Read once when torch loads, and taken back before the ranks start (theirs stay).
    before = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch  # noqa: F401
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    if before is None:
        os.environ.pop("TORCH_CPP_LOG_LEVEL")
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = before
    # The elastic agent logs every rendezvous step and, on failure, a traceback per rank; the
    # ranks' own messages (stderr, inherited) already say what went wrong.
    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        print(f"launch: rank {rank} exited with code {failure.exitcode} (its message is above)", file=sys.stderr)
        return code
    except (RendezvousError, TimeoutError, ConnectionError) as e:
        detail = (str(e).splitlines() or [""])[0]
        why = type(e).__name__ + (f": {detail[:200]}" if detail and detail != type(e).__name__ else "")
        raise UserError(f"launch.rdzv_endpoint: the rendezvous at {endpoint} did not complete within "
                        f"launch.rdzv_timeout = {timeout} s ({why}); are the other "
                        f"machines' launchers running and is the address reachable?") from None
    return 0


@stage_entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmpipe.loop.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--node", action="store_true",
                    help="run only this machine's share (on the other machines, in pods, under srun)")
    ap.add_argument("--rdzv-endpoint", default=os.environ.get("VLMPIPE_RDZV_ENDPOINT", ""),
                    help="host:port in place of launch.rdzv_endpoint (also $VLMPIPE_RDZV_ENDPOINT: the endpoint "
                         "is where this run's first machine is, not a result-changing param)")
    ap.add_argument("script", help="the stage script, e.g. stages/train_siglip.py")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if not Path(a.script).is_file():
        raise UserError(f"{a.script}: stage script not found (run from the repository root)")
    # The whole file checked (counts, endpoint, every training stage's batch against the world size)
    # before any process starts; only launch's own section decides anything here.
    from vlmpipe.ops.preflight import load_all

    launch = load_all().launch
    if a.rdzv_endpoint:
        if launch.nnodes > 1:
            check_endpoint(a.rdzv_endpoint, "--rdzv-endpoint")
        launch = LaunchParams(**{**vars(launch), "rdzv_endpoint": a.rdzv_endpoint})
    # The stage's processes import the vlmpipe this launcher came from (the checkout DVC runs in, put
    # first on sys.path by `python -m`), not the editable install's: a queued or --temp experiment
    # runs in a copy of the repository and must run the copy's code.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    if launch.world_size == 1:
        os.execv(sys.executable, [sys.executable, a.script, *a.args])
    if launch.nnodes > 1 and launch.fanout == "srun" and not a.node:
        srun = shutil.which("srun")
        if srun is None or "SLURM_JOB_ID" not in os.environ:
            raise UserError("launch.fanout: 'srun' needs SLURM's srun inside an allocation (sbatch/salloc); "
                            "set launch.fanout: none and start the other machines yourself")
        cmd = [srun, f"--nodes={launch.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable,
               "-m", "vlmpipe.loop.launch", "--node", "--rdzv-endpoint", launch.rdzv_endpoint, a.script, *a.args]
        os.execv(srun, cmd)
    return _run_torchrun(torchrun_args(launch, a.script, a.args, launch.rdzv_endpoint), launch.rdzv_endpoint,
                         launch.rdzv_timeout)


if __name__ == "__main__":
    raise SystemExit(main())
