"""``flm train``'s data stages: download (once per data directory under torchrun), the tokenizer
(cached or trained in memory), the checks that need it, then — everything checked — the writes
into the run directory (tokenizer, token files, ``config.json``). :func:`check_data` writes
nothing to the run directory, so a failed check leaves it as it was; :func:`write_data` runs under
the run's lock.

Source: CS336 assignment 1 handout §2 (BPE), §5.1 (data); ``shared/spec/training_pipeline_notes.md``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from flm import distributed, manifest
from flm._io import atomic_write_json, remove_orphan_temps
from flm.cli.common import UsageError, format_bytes, log
from flm.cli.plan import Plan
from flm.config import RunConfig
from flm.download import DATASETS, DownloadUnavailable, download, download_prefix
from flm.runs import cached_tokenizer, count_tokens, prepare_tokens, save_tokenizer, tokenizer_stamp, train_tokenizer
from flm.sharded_checkpoint import read_any_header
from flm.tokenizer import EOS_TOKEN, Tokenizer

__all__ = [
    "DRY_RUN_TOKENIZER_BYTES",
    "check_data",
    "data_line",
    "download_once",
    "dry_run_checks",
    "without_download",
    "write_data",
]


def data_line(directories: int, nodes: int, out: Path) -> str:
    """The plan's line on where a multi-process run prepares its data.

    Args:
        directories: distinct run directories the ranks see (:func:`flm.distributed.directory_owners`).
        nodes: nodes in the job (:func:`flm.distributed.node_count`).
        out: rank 0's run directory.

    Returns:
        E.g. ``"  data: prepared once (shared file system: every rank sees <out>)"``.
    """
    if directories == 1:
        return f"  data: prepared once (shared file system: every rank sees {out})"
    if directories == nodes:
        return (
            "  data: prepared once per node (node-local directories: each node's first rank writes its own --out-dir)"
        )
    return f"  data: prepared once per run directory ({directories} directories on {nodes} nodes)"


def without_download(cfg: RunConfig) -> str:
    """What works when the data set cannot be downloaded (offline), as the tail of an error line:
    the ``--train-text``/``--valid-text`` flags, or the exact paths flm looks at for copies of the
    data set's files downloaded elsewhere."""
    info = DATASETS[cfg.data.dataset]
    paths = " and ".join(str(Path(cfg.data.data_dir) / info.local_name(s)) for s in ("train", "valid"))
    unzip = " (gunzipped)" if info.gzip else ""
    return (
        f"; without the download: pass --train-text FILE --valid-text FILE (any UTF-8 text, documents separated "
        f"by {EOS_TOKEN}), or put copies of the files{unzip} downloaded elsewhere at {paths}"
    )


# --dry-run trains the tokenizer in memory (for the checks that need it) on up to this many bytes.
DRY_RUN_TOKENIZER_BYTES = 4 << 20


def dry_run_checks(plan: Plan) -> list[str]:
    """The checks of :func:`check_data` that a dry run can afford, writing nothing; the plan's
    closing lines.

    The tokenizer is trained in memory (or taken from the run directory's cache) and every text
    checked to hold one window, when the data is on disk and the training text used is at most
    :data:`DRY_RUN_TOKENIZER_BYTES`; otherwise the lines say what was not run.

    Returns:
        Lines to print after the plan.

    Raises:
        UsageError: as :func:`check_data`.
    """
    cfg = plan.config
    if plan.downloads:
        return ["dry run: every check that needs no download passed; nothing was written"]
    if not plan.texts:
        ds, base = DATASETS[cfg.data.dataset], Path(cfg.data.data_dir)
        plan.texts = {
            "train": (str(base / ds.local_name("train")), cfg.data.train_bytes),
            "valid": (str(base / ds.local_name("valid")), None),
        }
    train_text, max_bytes = plan.texts["train"]
    cached = cached_tokenizer(plan.out_dir, tokenizer_stamp(train_text, cfg.model.vocab_size, max_bytes))
    if cached is None and (plan.train_text_bytes or 0) > DRY_RUN_TOKENIZER_BYTES:
        return [
            f"dry run: the checks passed, except those that need the tokenizer (training it on "
            f"{format_bytes(plan.train_text_bytes or 0)} takes a while: the real run does it first, before "
            "writing anything); nothing was written"
        ]
    check_data(plan)
    return ["dry run: every check passed; nothing was written"]


def _download(plan: Plan) -> None:
    """Fetch the plan's downloads into the data directory (files already there are skipped) and
    set ``plan.texts`` to them.

    Raises:
        DownloadUnavailable: the server could not be reached (with what works offline).
    """
    cfg = plan.config
    ds = cfg.data.dataset
    whole = [s for s in DATASETS[ds].files if s not in plan.prefixes]
    try:
        paths = download(ds, cfg.data.data_dir, progress=True, splits=whole)
        for split, nbytes in plan.prefixes.items():
            paths[split] = download_prefix(ds, cfg.data.data_dir, split, nbytes, progress=True)
    except DownloadUnavailable as err:
        raise DownloadUnavailable(err.file, err.url, err.reason + without_download(cfg)) from None
    plan.texts = {"train": (str(paths["train"]), cfg.data.train_bytes), "valid": (str(paths["valid"]), None)}


def download_once(plan: Plan, info: distributed.DistInfo) -> None:
    """Under torchrun, fetch the downloads once per data directory, before any rank prepares data.

    Run directories and data directories may be shared differently (node-local run directories
    with one shared ``--data-dir``), so the first rank to see each data directory downloads into
    it while the others wait (a collective): two nodes never write one ``.part`` at once, and the
    preparing ranks then find the files in place (:func:`flm.data.download` skips them).

    Args:
        plan: this rank's checked plan (``plan.downloads``: what it still needs).
        info: this process's place in the job (single-process: nothing happens here).

    Raises:
        DownloadUnavailable: as :func:`check_data`.
    """
    if not info.enabled:
        return
    wants = torch.tensor([bool(plan.downloads)], dtype=torch.uint8)
    if not any(int(w[0]) for w in distributed.all_gather_bytes(wants)):
        return  # no rank downloads: no data directory is created or probed
    owners = distributed.directory_owners(plan.config.data.data_dir)
    if owners[info.rank] == info.rank and plan.downloads:
        _download(plan)
    distributed.barrier()


def check_data(plan: Plan) -> tuple[Tokenizer, dict[str, Any] | None]:
    """The data stages that write nothing to the run directory: download (into the data
    directory), the tokenizer (trained in memory unless cached), and the checks that need it.

    Returns:
        ``(tokenizer, stamp)``; the stamp is ``None`` when the tokenizer came from the cache.

    Raises:
        UsageError: a text that encodes to fewer than ``context_length + 1`` tokens, or a resumed
            checkpoint made with another tokenizer.
    """
    cfg = plan.config
    if plan.downloads:
        _download(plan)
    elif not plan.texts:
        ds, base = DATASETS[cfg.data.dataset], Path(cfg.data.data_dir)
        plan.texts = {
            "train": (str(base / ds.local_name("train")), cfg.data.train_bytes),
            "valid": (str(base / ds.local_name("valid")), None),
        }
    tokenizer, new_stamp = _tokenizer_for(plan)
    if plan.resume_from is not None:
        saved = (read_any_header(plan.resume_from[0]).get("metadata") or {}).get("tokenizer_fingerprint")
        if saved and saved != tokenizer.fingerprint():
            raise UsageError(f"--resume: {plan.resume_from[0].name} was trained with another tokenizer ({saved[:12]}…)")
    need = cfg.model.context_length + 1
    for split, (path, _) in plan.texts.items():
        if count_tokens(tokenizer, path, at_least=need) < need:
            raise UsageError(f"the {split} text {path} encodes to fewer than context_length + 1 = {need} tokens")
    return tokenizer, new_stamp


def write_data(plan: Plan, tokenizer: Tokenizer, new_stamp: dict[str, Any] | None) -> tuple[Tokenizer, dict[str, Any]]:
    """Everything checked, the run directory is written (under its lock): orphan temp files and
    ``--overwrite``'s files go, then the tokenizer, the token files and ``config.json``.

    Returns:
        ``(tokenizer, {"train": memmap, "valid": memmap})``.
    """
    cfg, out = plan.config, plan.out_dir
    for p in remove_orphan_temps(out):
        log(f"removed {p.name}, left by an interrupted write")
    manifest.claim(out, log=log)
    for p in plan.remove:
        manifest.remove(p)  # flm's own files only (checked by the plan; refused again if changed since)
    if new_stamp is not None:
        save_tokenizer(out, tokenizer, new_stamp)
    tokens = prepare_tokens(out, tokenizer, plan.texts, num_workers=cfg.data.num_workers, log=log)
    # Data paths relative to the run directory (absolute as a fallback): --resume from anywhere.
    saved = cfg.to_dict(run_dir=out)
    atomic_write_json(out / "config.json", {**saved, **({"auto": plan.auto} if plan.auto else {})})
    return tokenizer, tokens


def _tokenizer_for(plan: Plan) -> tuple[Tokenizer, dict[str, Any] | None]:
    """The run's tokenizer: the cached one when its stamp matches, else trained in memory."""
    cfg, out = plan.config, plan.out_dir
    train_text, max_bytes = plan.texts["train"]
    stamp = tokenizer_stamp(train_text, cfg.model.vocab_size, max_bytes)
    cached = cached_tokenizer(out, stamp)
    if cached is not None:
        log("tokenizer: cached")
        return cached, None
    if plan.resume_from is not None:
        raise UsageError(
            f"--resume: the tokenizer would be retrained (the training text, --train-bytes or --vocab-size changed), "
            f"but {plan.resume_from[0].name} was trained with the one in {out}; keep the inputs, or start over"
        )
    t0 = time.perf_counter()
    tok = train_tokenizer(
        train_text, cfg.model.vocab_size, train_bytes=max_bytes, num_workers=cfg.data.num_workers, progress=None
    )
    log(
        f"tokenizer: trained {tok.vocab_size:,} tokens in {time.perf_counter() - t0:.1f}s (in memory, written after the checks)"
    )
    return tok, stamp
