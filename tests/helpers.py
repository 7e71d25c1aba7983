"""Builders shared by the tests: small harvest configs, store snapshots, CLI runners."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rqae_pipeline.harvest import HarvestConfig
from rqae_pipeline.store import ActivationStore

TINY = "tiny-random:0"
REPO = Path(__file__).resolve().parents[1]


def tiny_config(out: Path, **kw) -> HarvestConfig:
    """A harvest small enough for a test: 32-token contexts, shards of 4 contexts."""
    base = dict(out=out, model=TINY, hook="1", tokens=1024, context_length=32, batch_contexts=2,
                contexts_per_shard=4, contexts_per_chunk=2)
    base.update(kw)
    return HarvestConfig(**base)


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every committed row array of a store, as stored."""
    store = ActivationStore.open(path)
    return store.read_encoded(0, store.n_tokens)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a local store directory, the manifest's creation time masked: what two
    harvests with the same settings (one process, or 1, 2 or N dask workers) agree on."""
    files = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p == path / "zarr.json":
                meta = json.loads(data)
                meta["attributes"]["rqae"]["created"] = "<masked>"
                data = json.dumps(meta).encode()
            files[str(p.relative_to(path))] = data
    return files


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under `path` (to prove a failed command changed nothing)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def rqae_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rqae_pipeline.cli", *args]


# The `rqae` commands of the tests are real processes (their own pid, signals, exit status,
# kill -9), but forked from multiprocessing's fork server, which has imported the package and
# what its commands import once per test worker: a fresh interpreter spends ~10 s of CPU
# importing TransformerLens and its dependencies, more than most commands' work. A few tests
# still start `python -m rqae_pipeline.cli` itself (`rqae_cmd`), so that path stays tested.
_PRELOAD = ("rqae_pipeline.cli", "rqae_pipeline.harvest", "rqae_pipeline.harvest_dask", "rqae_pipeline.train",
            "rqae_pipeline.evaluate", "rqae_pipeline.compare", "rqae_pipeline.features", "rqae_pipeline.steer",
            "rqae_pipeline.dashboard", "rqae_pipeline.codes", "rqae_pipeline.token_search", "sae_lens", "datasets")


def _fork_server():
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


def start_fork_server() -> None:
    """Start the fork server now (conftest, at the session's start): preloaded modules that read
    the environment at import (huggingface_hub's cache paths) then see the session's, not that of
    whichever test first runs a command."""
    import multiprocessing.forkserver

    _fork_server()
    multiprocessing.forkserver.ensure_running()


def _rqae_child(args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """Run `rqae ARGS` in this forked process as the console script would, then exit with its status."""
    import atexit
    import traceback
    import warnings

    # as a terminal starts a command: Ctrl-C raises KeyboardInterrupt, whatever the disposition the
    # test runner had (a background `pytest &` starts with SIGINT ignored, and its children with it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    sys.argv = ["rqae", *args]
    from rqae_pipeline.cli import app

    code = 0
    try:
        app(args=list(args), prog_name="rqae")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
    except BaseException:  # as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedRqae:
    """The part of `subprocess.Popen`'s interface the tests use, for an `rqae` command forked by
    the fork server (a multiprocessing.Process: exit status -N when killed by signal N, as Popen's)."""

    def __init__(self, args: tuple[str, ...], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path):
        stderr.touch()
        self.args = args
        self.process = _fork_server().Process(target=_rqae_child, name="rqae",
                                              args=(list(args), env, str(cwd), str(stdout), str(stderr)))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(["rqae", *self.args], timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def command_env() -> dict[str, str]:
    """The environment of every `rqae` command a test starts (forked or a fresh interpreter)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def run_rqae(*args: str, timeout: int = 300, cwd: Path = REPO, **popen_kw) -> subprocess.CompletedProcess:
    """`rqae ARGS` run to its end in `cwd` (a forked process, see _PRELOAD): its exit status and
    output. With `subprocess.run` keywords (`preexec_fn=...`), a fresh `python -m rqae_pipeline.cli`."""
    import tempfile

    if popen_kw:
        return subprocess.run(rqae_cmd(*args), capture_output=True, text=True, timeout=timeout, env=command_env(),
                              cwd=cwd, **popen_kw)

    with tempfile.TemporaryDirectory(prefix="rqae-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = ForkedRqae(args, command_env(), cwd, out, err)
        try:
            code = proc.wait(timeout)
        finally:
            proc.kill()
        return subprocess.CompletedProcess(["rqae", *args], code, out.read_text(), err.read_text())


# Only keeps a wedged child from hanging the suite forever; no test's outcome depends on it.
HANG_GUARD_S = 900


def start_rqae(*args: str, stderr: Path, cwd: Path = REPO) -> ForkedRqae:
    """`rqae ARGS` in the background in `cwd`, as a terminal starts it (Ctrl-C raises
    KeyboardInterrupt whatever the test runner's own SIGINT disposition). Its stderr (progress
    bars included) goes to a file, where a pipe nobody reads could fill and stall it."""
    return ForkedRqae(args, command_env(), cwd, Path(os.devnull), stderr)


def wait_until(reached: Callable[[], bool], proc: subprocess.Popen, stderr: Path) -> None:
    """Poll until `reached()`; fails at once if `proc` ends first (it must still be running when
    the test acts on it)."""
    t0 = time.monotonic()
    while not reached():
        assert proc.poll() is None, f"rqae ended (exit {proc.returncode}) first:\n{stderr.read_text()[-2000:]}"
        if time.monotonic() - t0 > HANG_GUARD_S:
            proc.kill()
            raise AssertionError(f"rqae neither got there nor ended in {HANG_GUARD_S} s:\n{stderr.read_text()[-2000:]}")
        time.sleep(0.02)


def untrained_heldout_fvu(cfg) -> float:
    """The held-out FVU of a training run's model at step 0, built and initialised as `train`
    does: the baseline a trained model must beat."""
    from rqae_pipeline.models.registry import build_trainable
    from rqae_pipeline.train import evaluate, heldout_rows, heldout_split, train_batches

    store = ActivationStore.open(cfg.store)
    split = heldout_split(store, cfg.heldout_fraction)
    model = build_trainable(cfg.model, total_steps=cfg.total_steps, batch_size=cfg.batch_size, device="cpu",
                            seed=cfg.seed)
    model.init_from_data(next(train_batches(store, cfg, split, skip=0)))
    return evaluate(model, heldout_rows(store, cfg, split))["fvu"]


def raw_space_sae(store_path, out, hook, d_sae: int = 96):
    """A sae-lens TopK SAE on raw residuals, as Gemma Scope's are (no train.json beside it)."""
    import torch
    from sae_lens import SAE

    store = ActivationStore.open(store_path)
    raw = store.raw(store.read())
    torch.manual_seed(0)
    sae = SAE.from_dict({"architecture": "topk", "d_in": store.d, "d_sae": d_sae, "k": 16, "dtype": "float32",
                         "device": "cpu", "apply_b_dec_to_input": True,
                         "metadata": {"hook_name": hook, "model_name": store.spec.model}})
    with torch.no_grad():
        sae.W_dec.copy_(raw[torch.randperm(len(raw))[:d_sae]] - raw.mean(0))
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(raw.mean(0))
    sae.save_model(str(out))
    return out


def tiny_rqae(store_path: Path, out: Path, *, n_q: int = 8, seed: int = 0, init_rows: int = 2048) -> Path:
    """A seeded RQAE of n_q layers initialised from the store's first rows (not trained):
    enough structure for codes, search, features and steering tests."""
    import torch

    from rqae_pipeline.models.rqae import RQAE, RQAEConfig

    store = ActivationStore.open(store_path)
    torch.manual_seed(seed)
    model = RQAE(RQAEConfig(d_in=store.d, n_q=n_q))
    model.init_from_data(store.read(0, init_rows).acts)
    model.save(out)
    return out


def synthetic_store(path: Path, raw, *, gain=None, flags: np.ndarray | None = None, tokens: np.ndarray | None = None,
                    context_rows: int = 32) -> ActivationStore:
    """A float32 store of given raw residuals (n, d), written as a harvest writes them:
    rows raw / rms(raw) * gain ("final-norm" with a gain, else "rms"), contexts of
    `context_rows` rows (BOS not stored), token ids and flags as given (default zeros)."""
    from rqae_pipeline.codec import encode_acts
    from rqae_pipeline.store import StoreSpec

    n, d = raw.shape
    spec = StoreSpec(model="synthetic", hook="h", layer=0, d_model=d, corpus={"name": "synthetic"},
                     tokenizer="none", context_length=context_rows + 1, skip_bos=True,
                     normalisation="rms" if gain is None else "final-norm", dtype="float32",
                     contexts_per_shard=8, contexts_per_chunk=2, batch_contexts=2, outlier_factor=0.0)
    store = ActivationStore.create(path, spec, gain, {})
    scale = raw.float().pow(2).mean(1).sqrt()
    acts = raw.float() / scale[:, None] * (1.0 if gain is None else gain)
    rows = np.arange(n)
    store.write_rows(0, {**encode_acts(acts, "float32"), "scale": scale.numpy(),
                         "tokens": np.zeros(n, np.int32) if tokens is None else tokens.astype(np.int32),
                         "seq": rows // context_rows, "pos": (rows % context_rows + 1).astype(np.int16),
                         "flags": np.zeros(n, np.uint8) if flags is None else flags.astype(np.uint8)})
    store.commit(tokens=n, contexts=-(-n // context_rows), corpus_state=(0, 0), complete=True)
    return ActivationStore.open(path)
