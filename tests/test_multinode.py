"""Several nodes, simulated on one machine (issue 22 item 1): two ``torchrun --nnodes 2`` launches
with a c10d rendezvous on 127.0.0.1, CPU and gloo.

(a) Each launch has its own ``--out-dir`` and ``--data-dir`` (standing for node-local disks): every
    node's first rank prepares the tokenizer and token files in its own directory, the plan says
    so, and the loss curve equals one node running both ranks (same global batch).
    Nodes whose texts differ stop with an error instead of training on diverging data.
(b) Both launches share the directories: the data is prepared once, and the plan says so.
(c) ``flm.distributed.directory_owners`` on three spawned ranks, two of them sharing a directory;
    the downloads into a shared ``--data-dir`` happen once.

Rendezvous order decides which launch gets global rank 0, so the tests find rank 0's run
directory by its files. Every subprocess runs under a timeout, on a free port.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from helpers import train_argv
from test_first_hour_download import remote  # noqa: F401 (a fixture)

pytestmark = pytest.mark.distributed

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

TIMEOUT = 240
STEPS = ("--max-iters", "4", "--eval-interval", "0", "--max-new-tokens", "0", "--log-interval", "1")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(argvs: list[list[str]], *, ok: bool = True) -> str:
    """Run ``flm`` on two simulated nodes at once, one argv each; return their joint output
    (both exit 0 if ``ok``, else both fail)."""
    port = _free_port()
    launch = TORCHRUN + [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=flm-test",
        "-m",
        "flm",
    ]
    procs = [
        subprocess.Popen(launch + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for argv in argvs
    ]
    outputs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outputs.append(out)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    joint = "\n".join(outputs)
    assert (codes == [0, 0]) if ok else all(codes), joint[-4000:]
    return joint


def _losses(run) -> np.ndarray:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return np.array([r["train_loss"] for r in rows if r.get("train_loss") is not None])


def _rank0_dir(dirs):
    """The run directory global rank 0 wrote (rendezvous order decides which launch it was)."""
    written = [d for d in dirs if (d / "results.json").exists()]
    assert len(written) == 1, [sorted(p.name for p in d.iterdir()) for d in dirs]
    return written[0]


@pytest.fixture(scope="module")
def one_node(texts, tmp_path_factory):
    """The same run on one node with both ranks: its loss curve is the reference."""
    out = tmp_path_factory.mktemp("one") / "run"
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", "-m", "flm"] + train_argv(texts, out, *STEPS)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return _losses(out)


def test_two_nodes_with_node_local_directories_prepare_data_on_each(texts, tmp_path, one_node):
    nodes = [tmp_path / f"node{i}" for i in (0, 1)]
    argvs = [train_argv(texts, n / "run", *STEPS, "--data-dir", str(n / "data")) for n in nodes]
    output = _two_nodes(argvs)
    assert output.count("plan: preset tiny") == 1, output
    assert "data: prepared once per node (node-local directories" in output, output
    runs = [n / "run" for n in nodes]
    for run in runs:  # each node's first rank wrote the same tokenizer and token files
        assert (run / "vocab.json").is_file() and (run / "train.tokens").is_file()
        assert not list(run.glob(".flm-probe*")), sorted(p.name for p in run.iterdir())
    assert (runs[0] / "vocab.json").read_bytes() == (runs[1] / "vocab.json").read_bytes()
    assert (runs[0] / "train.tokens").read_bytes() == (runs[1] / "train.tokens").read_bytes()
    main = _rank0_dir(runs)
    other = runs[1 - runs.index(main)]
    assert not (other / "metrics.jsonl").exists() and not list(other.glob("*.safetensors"))
    losses = _losses(main)
    assert len(losses) == 4
    np.testing.assert_allclose(losses, one_node, rtol=1e-5)


def test_two_nodes_sharing_a_directory_prepare_data_once(texts, tmp_path, one_node):
    run, data = tmp_path / "shared" / "run", tmp_path / "shared" / "data"
    argv = train_argv(texts, run, *STEPS, "--data-dir", str(data))
    output = _two_nodes([argv, argv])
    assert output.count("plan: preset tiny") == 1, output
    assert "data: prepared once (shared file system" in output, output
    assert output.count("tokenizer: trained") == 1, output  # one rank trained it, in the one directory
    assert not list(run.glob(".flm-probe*"))
    np.testing.assert_allclose(_losses(run), one_node, rtol=1e-5)


def test_two_nodes_whose_data_differs_stop_with_an_error(texts, tmp_path):
    """Node-local data is prepared apart: a node given another text makes another tokenizer, and
    every rank says so instead of training on diverging data."""
    train, valid = texts
    other = tmp_path / "other.txt"
    other.write_text(train.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    argvs = [
        train_argv((train, valid), tmp_path / "node0" / "run", *STEPS),
        train_argv((other, valid), tmp_path / "node1" / "run", *STEPS),
    ]
    output = _two_nodes(argvs, ok=False)
    assert "the tokenizer or the token files differs between rank 0 and rank(s) 1" in output, output[-4000:]
    assert not any((tmp_path / n / "run" / "metrics.jsonl").exists() for n in ("node0", "node1"))


def _owners_worker(rank: int, port: int, dirs: list, result: str) -> None:
    import torch

    from flm import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(dirs))
    try:
        owners = distributed.directory_owners(dirs[rank])
        try:
            distributed.check_same("same" if rank < 2 else "other", "the value")
            differs = ""
        except ValueError as err:
            differs = str(err)
        if rank == 2:
            with open(result, "w") as f:
                json.dump({"owners": owners, "differs": differs}, f)
    finally:
        dist.destroy_process_group()


def test_directory_owners_groups_the_ranks_that_see_one_directory(tmp_path):
    """Ranks 0 and 1 share a directory (one through a link), rank 2 has its own: each directory's
    first rank owns it, the probes are gone, and ``check_same`` names the rank that differs."""
    import torch.multiprocessing as mp

    shared, alone = tmp_path / "shared", tmp_path / "alone"
    shared.mkdir()
    (tmp_path / "link").symlink_to(shared)
    dirs = [str(shared), str(tmp_path / "link"), str(alone)]
    result = tmp_path / "result.json"
    mp.spawn(_owners_worker, args=(_free_port(), dirs, str(result)), nprocs=3, join=True)
    got = json.loads(result.read_text())
    assert got["owners"] == [0, 0, 2]
    assert "the value differs between rank 0 and rank(s) 2" in got["differs"]
    assert not list(shared.iterdir()) and not list(alone.iterdir())


def _download_worker(rank: int, port: int, dirs: list, url: str, pins: dict, result: str) -> None:
    import dataclasses
    from pathlib import Path
    from types import MappingProxyType

    import torch

    import flm.cli.train as cli_train
    import flm.cli.train_data as cli_data
    import flm.download as download_mod
    from flm.config import RunConfig
    from flm.data import DATASETS
    from flm.distributed import DistInfo

    os.environ["FLM_DATA_BASE_URL"] = url
    pinned = {s: download_mod.FilePin(size=n, sha256=h) for s, (n, h) in pins.items()}
    table = MappingProxyType({**DATASETS, "tinystories": dataclasses.replace(DATASETS["tinystories"], pins=pinned)})
    download_mod.DATASETS = cli_train.DATASETS = cli_data.DATASETS = table
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(dirs))
    try:
        cfg = RunConfig.resolve(
            "tiny", {"data": {"dataset": "tinystories", "data_dir": dirs[rank]}, "train": {"device": "cpu"}}
        )
        plan = cli_train.make_plan(cfg, Path(result).parent / f"run{rank}", resume=False, overwrite=False)
        planned = bool(plan.downloads)
        cli_data.download_once(plan, DistInfo(rank, len(dirs), rank, "cpu"))
        texts = sorted(Path(p).read_bytes().hex()[:16] for p, _ in plan.texts.values())
        with open(f"{result}.{rank}", "w") as f:
            json.dump({"planned": planned, "texts": texts}, f)
    finally:
        dist.destroy_process_group()


def test_a_shared_data_dir_is_downloaded_into_once(remote, tmp_path):  # noqa: F811 (the imported fixture)
    """Node-local run directories with one shared ``--data-dir`` (ranks 0 and 1, rank 2 has its
    own): each data directory is downloaded into by one rank while the others wait, so two nodes
    never write one ``.part`` at once: the server sees the requests of two downloads, not three."""
    import hashlib

    import torch.multiprocessing as mp

    srv, blobs = remote
    pins = {s: (len(b), hashlib.sha256(b).hexdigest()) for s, b in blobs.items()}
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    shared.mkdir()
    (tmp_path / "link").symlink_to(shared)
    dirs = [str(shared), str(tmp_path / "link"), str(alone)]
    result = tmp_path / "result"
    mp.spawn(_download_worker, args=(_free_port(), dirs, srv.url, pins, str(result)), nprocs=3, join=True)
    got = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(3)]
    assert all(g["planned"] for g in got)  # every rank planned the download
    assert got[0]["texts"] == got[1]["texts"] == got[2]["texts"]
    per_directory = len(srv.requests) / 2
    assert per_directory == int(per_directory) and per_directory >= 1, srv.requests
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in alone.iterdir())


def test_shard_refuses_node_local_run_directories(texts, tmp_path):
    """``--shard`` writes every rank's shard of a checkpoint into one directory: with node-local
    run directories every rank stops with one error line before preparing or writing anything."""
    argvs = [train_argv(texts, tmp_path / f"node{i}" / "run", *STEPS, "--shard") for i in range(2)]
    output = _two_nodes(argvs, ok=False)
    assert "error: --shard: the ranks see 2 different" in output, output[-4000:]
    assert "/flm/cli/" not in output  # no traceback through flm's code (torchrun prints its own)
    assert not any((tmp_path / n / "run" / "vocab.json").exists() for n in ("node0", "node1"))
