"""`rqae train --nproc N`: one training run in N processes, launched through torchrun.

The launcher pickles the `TrainConfig` it was given and starts
`torchrun --standalone --nproc-per-node N -m rqae_pipeline.launch CONFIG`; each rank runs
`train.train` on it, which joins the process group from torchrun's environment
(`distributed.py`). `--standalone` picks a free rendezvous port on this machine.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from rqae_pipeline import RQAEError
from rqae_pipeline.train import TrainConfig, train

EXIT_INTERRUPTED = 130


def torchrun_command(nproc: int, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "rqae_pipeline.launch", str(config_file)]


def launch_training(cfg: TrainConfig, nproc: int) -> int:
    """Run `cfg` in `nproc` processes; torchrun's exit status (0 when every rank finished)."""
    if nproc < 1:
        raise RQAEError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise RQAEError("already running under torchrun; drop --nproc")
    with tempfile.TemporaryDirectory(prefix="rqae-train-") as tmp:
        config_file = Path(tmp) / "config.pkl"
        config_file.write_bytes(pickle.dumps(cfg))
        # torchrun sets OMP_NUM_THREADS=1 for every rank unless it is set: one torch thread per rank
        return subprocess.run(torchrun_command(nproc, config_file)).returncode


def _rank_main(config_file: str) -> int:
    cfg = pickle.loads(Path(config_file).read_bytes())
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        result = train(cfg, progress=rank0)
    except RQAEError as e:
        print(f"error: {e}" + ("" if rank0 else f" (rank {os.environ.get('RANK')})"), file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
