"""flm replaces or deletes only files it can show it wrote, never through a link (issue 18, "Data lost").

Each test is one way a user's files were lost (cases 1–6 of the issue) or a resume raced another
one, run through the CLI's ``main`` as a user meets it, with the user's files checked byte for byte
afterwards. The runs are the tiny preset on generated text, a few steps each.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path

import pytest

from flm.checkpoint import list_checkpoints
from flm.cli import main


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = "the cat dog sat ran on a mat big small red blue tree house went saw and then happy day".split()
    out = []
    for i in range(n_words):
        out.append(rng.choice(words))
        if i % 12 == 11:
            out.append(".\n" if i % 60 == 59 else ".")
    return " ".join(out) + "\n"


@pytest.fixture(scope="module")
def gen_texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text(_text(3000, 0))
    valid.write_text(_text(600, 1))
    return train, valid


def argv(texts, out, *extra):
    """``F`` of the issue: ``flm train --preset tiny --train-text T --valid-text V``, kept short."""
    return [
        "train",
        "--preset",
        "tiny",
        "--train-text",
        str(texts[0]),
        "--valid-text",
        str(texts[1]),
        "--out-dir",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "1",
        "--max-iters",
        "4",
        "--eval-interval",
        "2",
        "--checkpoint-interval",
        "2",
        "--max-new-tokens",
        "4",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(gen_texts, tmp_path_factory):
    """RUN: a finished tiny run (4 steps, checkpoints at 2 and 4); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(argv(gen_texts, out)) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def tree_bytes(d: Path) -> dict[str, bytes | str]:
    """Every entry under ``d`` (links as their target), for byte-for-byte comparisons."""
    out: dict[str, bytes | str] = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.name == ".lock":
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def user_files(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("\\chapter{Work} years of it\n")
    (d / "data.bin").write_bytes(bytes(range(256)) * 4)
    return d


# --------------------------------------------------------------------------- case 1: a link inside


def test_1_a_link_in_the_run_dir_is_refused_and_never_followed(finished, gen_texts, tmp_path, capsys):
    """Regression: ``ln -s /elsewhere RUN/tensorboard; flm train F --out-dir RUN --overwrite``
    deleted every file inside /elsewhere, then failed with 'Cannot call rmtree on a symbolic link'."""
    elsewhere = user_files(tmp_path / "elsewhere")
    outside = tree_bytes(elsewhere)
    run = copy_run(finished, tmp_path / "run")
    (run / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    before = tree_bytes(run)
    assert main(argv(gen_texts, run, "--overwrite")) == 2
    err = one_line_error(capsys)
    assert "tensorboard (a symbolic link)" in err and "move them" in err
    assert tree_bytes(elsewhere) == outside and tree_bytes(run) == before


# ------------------------------------------------------------------- case 2: an experiment subdir


def test_2_an_experiment_never_deletes_a_users_file_in_its_subdirectories(gen_texts, tmp_path, capsys):
    """Regression: ``mkdir -p exp/baseline && echo work > exp/baseline/thesis.tex;
    flm experiment tie F --out-dir exp`` exited 0 and deleted thesis.tex."""
    exp = tmp_path / "exp"
    (exp / "baseline").mkdir(parents=True)
    (exp / "baseline" / "thesis.tex").write_text("work\n")
    before = tree_bytes(exp)
    cmd = ["experiment", "tie", *argv(gen_texts, exp, "--max-iters", "2")[1:]]
    assert main(cmd) == 2
    err = one_line_error(capsys)
    assert "baseline/thesis.tex" in err and "move them" in err
    assert tree_bytes(exp) == before


# ---------------------------------------------------- cases 3 and 4: the user's files at flm's names


@pytest.mark.parametrize(
    "files",
    [
        {"config.json": '{"model": {}, "train": {}}\n', "results.json": '{"val_loss": 1.5}\n'},  # case 3
        {"train.tokens": "\x00\x01" * 64},  # case 4
        {"valid.stamp.json": '{"mine": true}\n'},  # case 4
    ],
    ids=["config+results", "train.tokens", "valid.stamp"],
)
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_3_4_the_users_own_files_at_flms_names_are_never_replaced(gen_texts, tmp_path, capsys, files, overwrite):
    """Regression: a directory holding only the user's own config.json and results.json (or
    train.tokens, valid.stamp.json): ``flm train F --out-dir proj`` exited 0 and overwrote them."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name, text in files.items():
        (proj / name).write_text(text)
    before = tree_bytes(proj)
    assert main(argv(gen_texts, proj, *(["--overwrite"] if overwrite else []))) == 2
    err = one_line_error(capsys)
    assert all(name in err for name in files) and "which flm did not write" in err and "move them" in err
    assert tree_bytes(proj) == before


# --------------------------------------------------------- case 5: an unstamped tokenizer, --overwrite


def test_5_an_unstamped_tokenizer_is_refused_with_and_without_overwrite(gen_texts, tmp_path, capsys):
    """Regression: the user's own vocab.json/merges.txt were refused with 'pass --overwrite to start
    a run beside them (they are kept)', and with --overwrite both were replaced."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "vocab.json").write_text('{"a": 0, "b": 1}\n')
    (proj / "merges.txt").write_text("#version: 0.2\na b\n")
    before = tree_bytes(proj)
    for extra in ([], ["--overwrite"]):
        assert main(argv(gen_texts, proj, *extra)) == 2
        err = one_line_error(capsys)
        assert "merges.txt, vocab.json" in err and "with or without --overwrite" in err and "move them" in err
        assert "they are kept" not in err
        assert tree_bytes(proj) == before


# ------------------------------------------------- case 6: --resume with no loadable checkpoint


@pytest.mark.parametrize("damage", ["data", "garbage"])
def test_6_resume_with_no_loadable_checkpoint_refuses_and_changes_nothing(
    finished, gen_texts, tmp_path, capsys, damage
):
    """Regression: every ckpt_* corrupt, best.safetensors intact: ``--resume`` warned 'skipping …',
    started at step 0, exited 0, replaced the good best.safetensors and truncated metrics.jsonl.
    Flipped data bytes (the header, so the manifest's CRC, intact): none loads, nothing changes.
    A file overwritten with garbage is no longer one flm can show it wrote: refused by name."""
    run = copy_run(finished, tmp_path / "run")
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 2
    for p in ckpts:
        data = bytearray(p.read_bytes())
        data[-3] ^= 0xFF  # a flipped data byte (the checksum catches it)
        p.write_bytes(bytes(data))
    if damage == "garbage":
        ckpts[0].write_bytes(b"\x00" * 64)
    before = tree_bytes(run)
    code = main(argv(gen_texts, run, "--resume"))
    err = one_line_error(capsys)
    if damage == "data":
        assert code == 1 and "--resume: none of the 2 checkpoint(s)" in err and "nothing was changed" in err
        assert ckpts[0].name in err and ckpts[1].name in err and "checksum" in err
    else:
        assert code == 2 and f"holds {ckpts[0].name}, which flm did not write" in err
    assert tree_bytes(run) == before


def test_resume_without_any_checkpoint_refuses(gen_texts, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(argv(gen_texts, run, "--resume")) == 2
    assert "holds no checkpoint to resume from" in one_line_error(capsys)
    assert not run.exists() or not list(run.iterdir())


# ------------------------------------------------------- --resume while another one is training


def _hold_lock(path, ready, release):
    from flm._io import run_lock

    with run_lock(path):
        ready.set()
        release.wait(60)


def test_resume_takes_the_lock_before_listing_checkpoints(finished, gen_texts, tmp_path, capsys, monkeypatch):
    """Regression: ``--resume`` while another ``--resume`` trained listed the checkpoints unlocked,
    so the other's rotation could delete them first: 'load_checkpoint: cannot read …: No such file'.
    Now the lock comes first and the error says 'in use by pid N'."""
    import flm.runs

    run = copy_run(finished, tmp_path / "run")
    listed = []
    real = flm.runs.list_checkpoints
    monkeypatch.setattr(flm.runs, "list_checkpoints", lambda d: listed.append(d) or real(d))
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        before = tree_bytes(run)
        assert main(argv(gen_texts, run, "--resume")) == 1
        assert f"in use by pid {holder.pid}" in one_line_error(capsys)
        assert listed == [] and tree_bytes(run) == before
    finally:
        release.set()
        holder.join(60)


# ---------------------------------------------------------------------- the manifest itself


def test_an_older_run_dir_is_adopted_once_and_a_linked_run_dir_is_resolved(finished, gen_texts, tmp_path, capsys):
    """A run directory an flm without manifests wrote: its files are recorded once, with a message,
    the user's file beside them is not. The run directory is reached through a link
    (``runs -> /scratch``): resolved once, the run continues in the link's target."""
    from flm import manifest

    scratch = tmp_path / "scratch"
    run = copy_run(finished, scratch / "run")
    (run / manifest.MANIFEST_NAME).unlink()  # as an flm without manifests left it
    (run / "notes.txt").write_text("mine")
    (tmp_path / "runs").symlink_to(scratch, target_is_directory=True)
    assert main(argv(gen_texts, tmp_path / "runs" / "run", "--resume", "--max-iters", "6")) == 0
    out = capsys.readouterr().out
    assert f"is {run}" in out and "adopted" in out and "ckpt_0000004.safetensors" in out
    assert "notes.txt" not in out.split("adopted")[1]
    files = json.loads((run / manifest.MANIFEST_NAME).read_text())["files"]
    assert "notes.txt" not in files and "best.safetensors" in files and "ckpt_0000006.safetensors" in files
    assert (run / "notes.txt").read_text() == "mine" and (tmp_path / "runs").is_symlink()


def test_a_file_flm_wrote_then_the_user_replaced_is_refused(finished, gen_texts, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    (run / "results.json").write_text('{"my": "own analysis"}\n')
    before = tree_bytes(run)
    assert main(argv(gen_texts, run, "--overwrite")) == 2
    assert "results.json, which flm did not write (or which changed since)" in one_line_error(capsys)
    assert tree_bytes(run) == before


def test_manifest_rules(tmp_path):
    """Recorded files are flm's while unchanged (or copied without their times); links never are."""
    from flm import manifest
    from flm._io import atomic_write_text

    d = tmp_path / "d"
    manifest.claim(d)
    atomic_write_text(d / "a.txt", "flm")
    assert manifest.owned(d / "a.txt")
    st = os.stat(d / "a.txt")
    os.utime(d / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a copy that lost its time
    assert manifest.owned(d / "a.txt")
    (d / "a.txt").write_text("mine")
    assert not manifest.owned(d / "a.txt")
    with pytest.raises(manifest.ForeignFilesError, match="a.txt"):
        atomic_write_text(d / "a.txt", "flm again")
    assert (d / "a.txt").read_text() == "mine"
    (d / "link").symlink_to(tmp_path)
    assert not manifest.owned(d / "link")
    with pytest.raises(manifest.ForeignFilesError, match="symbolic link"):
        manifest.remove(d / "link")
    (d / "b.txt").write_text("unrecorded")
    assert not manifest.owned(d / "b.txt")


def _safetensors_bytes(header: bytes, pad: int = 0) -> bytes:
    """A safetensors file with no tensors: the 8-byte length, then ``header`` padded with ``pad`` spaces."""
    body = header + b" " * pad
    return len(body).to_bytes(8, "little") + body


FLM_HEADER = json.dumps({"__metadata__": {"flm": json.dumps({"format_version": 1, "step": 3})}}).encode()


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (_safetensors_bytes(FLM_HEADER), True),
        (_safetensors_bytes(FLM_HEADER, pad=1000), True),  # JSON whitespace is legal
        (_safetensors_bytes(b"[1, 2]"), False),  # JSON, but not an object
        (_safetensors_bytes(b'{"__metadata__": [1]}'), False),
        (_safetensors_bytes(b'{"__metadata__": {"flm": "{not json"}}'), False),
        (_safetensors_bytes(b'{"__metadata__": {"flm": "[1]"}}'), False),
        (_safetensors_bytes(b'{"__metadata__": {"other": "{}"}}'), False),
        (_safetensors_bytes(b"{not json"), False),
        ((10**12).to_bytes(8, "little") + FLM_HEADER, False),  # a length beyond the file
        (b"\x01\x02", False),  # shorter than the length prefix
        (b"", False),
    ],
    ids=[
        "flm",
        "padded",
        "list",
        "metadata-list",
        "flm-not-json",
        "flm-list",
        "no-flm",
        "bad-json",
        "long",
        "short",
        "empty",
    ],
)
def test_an_unrecorded_checkpoint_is_flms_only_by_a_readable_flm_header(tmp_path, data, want):
    """Outside a manifest, a ``.safetensors`` file is flm's when its header (read by the reader
    flm.checkpoint uses) holds flm's metadata; any corrupt header means "not flm's", never an error."""
    from flm import manifest

    (tmp_path / "ckpt_0000003.safetensors").write_bytes(data)
    assert manifest.owned(tmp_path / "ckpt_0000003.safetensors") is want


def test_an_unrecorded_checkpoint_header_over_64_mib_is_not_read(tmp_path):
    """The manifest reads at most 64 MiB of header: a valid flm header padded past that is not flm's."""
    from flm import manifest

    path = tmp_path / "ckpt_0000003.safetensors"
    path.write_bytes(_safetensors_bytes(FLM_HEADER, pad=(1 << 26) + 1 - len(FLM_HEADER)))
    assert not manifest.owned(path)


def test_tokenize_never_replaces_the_users_files(finished, gen_texts, tmp_path, capsys):
    """``flm tokenize encode IN OUT`` onto the user's own OUT, and ``tokenize train --overwrite`` onto
    a tokenizer flm did not write, are refused; a token file and tokenizer flm wrote are replaced."""
    out = tmp_path / "mine.bin"
    out.write_bytes(b"precious")
    enc = ["tokenize", "encode", str(gen_texts[1]), str(out), "--tokenizer", str(finished)]
    assert main(enc) == 2
    assert "mine.bin, which flm did not write" in one_line_error(capsys) and out.read_bytes() == b"precious"
    enc[3] = str(tmp_path / "v.tokens")
    assert main(enc) == 0 and main(enc) == 0  # its own token file (the sidecar says so): replaced
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text('{"a": 0}\n')
    train = ["tokenize", "train", str(gen_texts[0]), "--vocab-size", "280", "--out-dir", str(tok), "--overwrite"]
    assert main(train) == 2
    assert "vocab.json, which flm did not write" in one_line_error(capsys)
    assert (tok / "vocab.json").read_text() == '{"a": 0}\n'
    (tok / "vocab.json").unlink()
    assert main(train) == 0 and main(train) == 0  # flm's own tokenizer: replaced with --overwrite


def test_a_lock_file_that_is_a_link_is_never_followed(finished, gen_texts, tmp_path, capsys):
    """``RUN/.lock -> ~/notes.txt``: taking the run directory's lock opened and truncated the
    link's target; it is refused instead, the target kept byte for byte."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    run = copy_run(finished, tmp_path / "run")
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(notes)
    assert main(argv(gen_texts, run, "--resume", "--max-iters", "6")) == 1
    assert ".lock is a symbolic link" in one_line_error(capsys)
    assert notes.read_text() == "my notes\n"


def test_a_sweep_never_deletes_a_users_file_in_a_models_directory(gen_texts, tmp_path, capsys):
    """``flm sweep … --overwrite`` replaced each model's directory with rmtree, the user's files in it included."""
    out = tmp_path / "sweep"
    (out / "lr_0.001").mkdir(parents=True)
    (out / "lr_0.001" / "analysis.ipynb").write_text('{"cells": []}\n')
    before = tree_bytes(out)
    cmd = ["sweep", "--lrs", "0.001", "0.01", *argv(gen_texts, out, "--max-iters", "2", "--overwrite")[1:]]
    assert main(cmd) == 2
    err = one_line_error(capsys)
    assert "lr_0.001/analysis.ipynb" in err and "move them" in err
    assert tree_bytes(out) == before
