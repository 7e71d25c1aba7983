"""`rqae train --nproc N`: one training run in N processes, launched through torchrun.

The launcher pickles the `TrainConfig` it was given and runs torchrun's own launcher
(`torch.distributed.run`, `--standalone`: a free rendezvous port on this machine) in a child
process, `python -m rqae_pipeline.launch --agent N CONFIG`; each rank runs `train.train` on
the config, joining the process group from torchrun's environment (`distributed.py`).

A failure is one `error:` line with the rank's exit status, as in one process: each rank
writes its error beside the config instead of printing it, the launcher prints the distinct
ones, and the agent's own logs and its `ChildFailedError` traceback (a summary of what the
ranks already said) are kept quiet.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rqae_pipeline import RQAEError

if TYPE_CHECKING:  # the agent process never trains: it does not import the training stack (~5 s)
    from rqae_pipeline.train import TrainConfig

EXIT_INTERRUPTED = 130


def agent_command(nproc: int, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "rqae_pipeline.launch", "--agent", str(nproc), str(config_file)]


def launch_training(cfg: TrainConfig, nproc: int) -> int:
    """Run `cfg` in `nproc` processes: 0 when every rank finished; else a failed rank's
    status (2: its error line, printed here; 130: interrupted)."""
    if nproc < 1:
        raise RQAEError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise RQAEError("already running under torchrun; drop --nproc")
    with tempfile.TemporaryDirectory(prefix="rqae-train-") as tmp:
        config_file = Path(tmp) / "config.pkl"
        config_file.write_bytes(pickle.dumps(cfg))
        code = _wait_through_ctrl_c(subprocess.Popen(agent_command(nproc, config_file)))
        for line in rank_errors(Path(tmp)):
            print(line, file=sys.stderr)  # noqa: T201
    return code


def _wait_through_ctrl_c(agent: subprocess.Popen) -> int:
    """The agent's exit status. Ctrl-C reaches the agent too (one process group), which passes
    it to the ranks and waits for them; `subprocess.run` would kill the agent 0.25 s later,
    and the ranks with it (PR_SET_PDEATHSIG), wherever they were."""
    while True:
        try:
            return agent.wait()
        except KeyboardInterrupt:
            continue


def rank_errors(folder: Path) -> list[str]:
    """The ranks' error lines, each distinct message once (rank-named where they differ)."""
    by_rank = {int(p.stem.split("-")[1]): p.read_text() for p in folder.glob("rank-*.error")}
    distinct = {message: rank for rank, message in sorted(by_rank.items(), reverse=True)}
    if len(distinct) == 1:
        return [f"error: {next(iter(distinct))}"]
    return [f"error: {message} (rank {rank})" for message, rank in sorted(distinct.items(), key=lambda m: m[1])]


def _agent_main(nproc: str, config_file: str) -> int:
    """torchrun's launcher; the first failed rank's exit status instead of its traceback."""
    # one torch thread per rank unless set (what torchrun does, without its banner); the
    # agent's logs only restate what the ranks report (LOGLEVEL: the loggers torchrun makes)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["LOGLEVEL"] = "CRITICAL"
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "rqae_pipeline.launch", config_file]))
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items(), key=lambda kv: kv[1].timestamp)]
        return next((c for c in codes if c > 0), 1)  # a rank killed by a signal reads as 1
    except (SignalException, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return 0


def _rank_main(config_file: str) -> int:
    from rqae_pipeline.train import train

    cfg = pickle.loads(Path(config_file).read_bytes())
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = train(cfg, progress=rank == 0)
    except RQAEError as e:
        (Path(config_file).parent / f"rank-{rank}.error").write_text(str(e))  # the launcher prints it
        return 2
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(_agent_main(*sys.argv[2:]) if sys.argv[1] == "--agent" else _rank_main(sys.argv[1]))
