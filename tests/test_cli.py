"""The ``flm`` command end to end on a slice of the shared TinyStories data (tiny preset): every
artefact, falling loss, resume equal to an uninterrupted run, cached stages, every subcommand,
generated flags and config files. Failure paths are in tests/test_reliability.py."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_argv

from flm.checkpoint import list_checkpoints, load_checkpoint, read_header
from flm.cli import main
from flm.config import PRESETS, RunConfig
from flm.train import read_metrics
from flm.tree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"step", "wall_time", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"}


def test_train_writes_every_artefact_and_learns(tiny_run):
    out = tiny_run
    for name in (
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "best.safetensors",
        "vocab.json",
        "merges.txt",
        "samples.txt",
        "results.json",
        "train.tokens",
        "valid.tokens",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_0000020.safetensors", "ckpt_0000040.safetensors"]
    rows = read_metrics(out / "metrics.jsonl")
    assert rows and all(REQUIRED <= set(r) for r in rows)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] is not None and 0 < r["mfu"] < 1 for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40 and results["val_loss"] < 6.0 and len(results["samples"]) == 3
    # The run's own config.json loads back as the same config.
    assert RunConfig.from_dict(json.loads((out / "config.json").read_text())).model.d_model == 32


def test_best_holds_params_only_with_config_and_tokenizer_fingerprint(tiny_run):
    header = read_header(tiny_run / "best.safetensors")
    assert header["has_opt_state"] is False
    assert header["metadata"]["tokenizer_fingerprint"] and header["metadata"]["val_loss"] > 0
    assert header["config"]["model"]["vocab_size"] == 300
    ckpt_header = read_header(tiny_run / "ckpt_0000040.safetensors")
    assert (
        ckpt_header["has_opt_state"]
        and ckpt_header["metadata"]["tokenizer_fingerprint"] == header["metadata"]["tokenizer_fingerprint"]
    )


def test_crash_and_resume_matches_uninterrupted(tiny_run, texts, tmp_path, capsys):
    crashed = tmp_path / "crashed"
    shutil.copytree(tiny_run, crashed)
    # A crash after step 20: the step-40 checkpoint and the final outputs were never written.
    for name in ("ckpt_0000040.safetensors", "results.json", "samples.txt"):
        (crashed / name).unlink()
    assert main(train_argv(texts, crashed, "--resume")) == 0
    assert "resumed from ckpt_0000020" in capsys.readouterr().out
    a, b = load_checkpoint(tiny_run / "ckpt_0000040.safetensors"), load_checkpoint(crashed / "ckpt_0000040.safetensors")
    assert a.step == b.step == 40
    for x, y in zip(tree_leaves(a.params), tree_leaves(b.params), strict=True):
        assert torch.equal(x, y)
    keys = ("step", "tokens", "train_loss", "val_loss", "lr", "grad_norm")
    ra, rb = read_metrics(tiny_run / "metrics.jsonl"), read_metrics(crashed / "metrics.jsonl")
    assert [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb]
    assert json.loads((crashed / "results.json").read_text())["val_loss"] == pytest.approx(
        json.loads((tiny_run / "results.json").read_text())["val_loss"], rel=1e-12
    )


def test_resume_of_a_finished_run_reuses_every_stage(tiny_run, texts, tmp_path, capsys):
    again = tmp_path / "again"
    shutil.copytree(tiny_run, again)
    assert main(train_argv(texts, again, "--resume")) == 0
    out = capsys.readouterr().out
    for stage in ("tokenizer: cached", "encode train: cached", "encode valid: cached", "resumed from ckpt_0000040"):
        assert stage in out, stage
    assert "step     45" not in out


def test_resume_with_more_steps_continues_training(tiny_run, texts, tmp_path, capsys):
    longer = tmp_path / "longer"
    shutil.copytree(tiny_run, longer)
    assert main(train_argv(texts, longer, "--resume", "--max-iters", "50")) == 0
    out = capsys.readouterr().out
    assert "resumed with changed settings: max_iters 40 → 50" in out and "step     50/50" in out
    assert list_checkpoints(longer)[-1].name == "ckpt_0000050.safetensors"


def _relative_run(texts, root: Path) -> tuple[Path, list[str]]:
    """``root/work`` holding copies of ``texts`` and a 4-step tiny run ``runs/x`` trained from
    there with relative paths (``--train-text train.txt``); returns ``(work, tail of argv)``."""
    work = root / "work"
    work.mkdir()
    for t in texts:
        shutil.copy(t, work / t.name)
    return work, ["--device", "cpu", "--num-workers", "1", "--max-new-tokens", "0"]


def test_resume_from_another_working_directory(texts, tmp_path, monkeypatch):
    """Regression (issue 21 item 6): ``cd /tmp && flm train --resume --out-dir main/runs/x`` failed
    with ``--train-text ../shared/…: no such file`` although no --train-text was given: config.json
    stored the paths relative to the first run's working directory. They are now stored relative
    to the run directory (the absolute path beside them), so the resume finds the same files —
    the cached tokenizer and token files are reused — from anywhere. Run as the user runs it: a
    subprocess in another directory."""
    work, tail = _relative_run(texts, tmp_path)
    monkeypatch.chdir(work)
    argv = ["train", "--preset", "tiny", "--train-text", "train.txt", "--valid-text", "valid.txt"]
    assert main([*argv, "--out-dir", "runs/x", "--max-iters", "4", *tail]) == 0
    saved = json.loads((work / "runs" / "x" / "config.json").read_text())
    assert saved["data"]["train_text"] == str(Path("..", "..", "train.txt"))
    assert saved["paths"]["absolute"]["valid_text"] == str(work / "valid.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "flm", "train", "--resume", "--out-dir", "../work/runs/x", "--max-iters", "6"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for line in ("tokenizer: cached", "encode train: cached", "encode valid: cached", "resumed from ckpt_0000004"):
        assert line in done.stdout, (line, done.stdout)
    assert json.loads((work / "runs" / "x" / "results.json").read_text())["steps"] == 6
    assert not list(elsewhere.iterdir())  # nothing written where the command ran


def test_resume_paths_fall_back_to_absolute_then_name_config_json(texts, tmp_path, monkeypatch, capsys):
    """A run's config.json tries its data paths relative to the run directory, then at the absolute
    path saved beside them (a moved run directory); when neither exists the error names
    config.json and where it looked, and --train-text/--valid-text still override it. An older
    config.json (paths relative to the first run's working directory, no "paths") still loads
    from that directory."""
    from flm import manifest

    work, tail = _relative_run(texts, tmp_path)
    monkeypatch.chdir(work)
    argv = ["train", "--preset", "tiny", "--train-text", "train.txt", "--valid-text", "valid.txt"]
    assert main([*argv, "--out-dir", "runs/x", "--max-iters", "4", *tail]) == 0
    moved = tmp_path / "moved" / "deeper"
    shutil.copytree(work / "runs" / "x", moved)  # ../../train.txt from here does not exist
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", str(moved), *tail]) == 0
    assert "tokenizer: cached" in capsys.readouterr().out  # the same files, at their absolute paths
    # The texts gone from both places: one line naming config.json and the places tried.
    away = tmp_path / "away"
    away.mkdir()
    for name in ("train.txt", "valid.txt"):
        (work / name).rename(away / name)
    assert main(["train", "--resume", "--out-dir", str(moved), *tail]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {moved / 'config.json'}: data.train_text") and "\n" not in err, err
    # (the resume above saved config.json again, relative to where the run directory is now)
    assert f"data.train_text '../../work/train.txt' is not at {work / 'train.txt'};" in err, err
    # Flags win over config.json: the missing paths are not reported (here the tokenizer, trained
    # on the text at its old path, is what refuses).
    flags = ["--train-text", str(away / "train.txt"), "--valid-text", str(away / "valid.txt")]
    assert main(["train", "--resume", "--out-dir", str(moved), *flags, *tail]) == 2
    err = capsys.readouterr().err
    assert "config.json" not in err and "tokenizer would be retrained" in err, err
    # An older config.json: the paths as the first run was given them, relative to its directory.
    for name in ("train.txt", "valid.txt"):
        (away / name).rename(work / name)
    old = json.loads((moved / "config.json").read_text())
    del old["paths"]
    old["data"].update(train_text="train.txt", valid_text="valid.txt", data_dir="data")
    (moved / "config.json").write_text(json.dumps(old))
    manifest.record(moved / "config.json")  # as an older flm wrote it
    assert main(["train", "--resume", "--out-dir", str(moved), *tail]) == 2  # not from elsewhere
    err = capsys.readouterr().err
    assert (
        f"config.json: data.train_text 'train.txt' is not at {moved / 'train.txt'} nor at {elsewhere / 'train.txt'};"
        in err
    )
    monkeypatch.chdir(work)
    assert main(["train", "--resume", "--out-dir", str(moved), *tail]) == 0  # but from where it ran
    assert "tokenizer: cached" in capsys.readouterr().out


def test_print_config_and_config_files_round_trip(tiny_run, texts, tmp_path, capsys):
    assert main(["train", "--config", str(tiny_run / "config.json"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tiny_run / "config.json").read_text())
    # Every setting round-trips; "auto" (why the run's device defaults were chosen) is the original
    # run's note: loaded back, those settings are explicit values, so nothing is resolved again.
    # The data paths, saved relative to the run directory (issue 21 item 6), load back as the files.
    assert "dtype" in saved["auto"] and "auto" not in printed
    assert saved["data"]["train_text"] == str(Path("..", "..", texts[0].parent.name, "train.txt"))
    assert saved["paths"]["absolute"]["train_text"] == str(texts[0]) == printed["data"]["train_text"]
    assert printed == {k: v for k, v in saved.items() if k not in ("auto", "paths")} | {
        "data": saved["data"] | saved["paths"]["absolute"]
    }
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[model]\nd_model = 48\nnorm = "post"\n[train]\nlr = 0.01\nbetas = [0.9, 0.99]\n')
    assert main(["train", "--config", str(toml), "--lr", "0.02", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["d_model"] == 48 and cfg["model"]["norm"] == "post" and cfg["train"]["lr"] == 0.02
    assert cfg["train"]["betas"] == [0.9, 0.99] and cfg["model"]["num_layers"] == PRESETS["tiny"]["model"]["num_layers"]


def test_every_config_field_is_a_flag(capsys):
    """All of TransformerConfig, TrainConfig, DataConfig and SampleConfig are reachable."""
    import dataclasses

    from flm.cli.args import flag_name
    from flm.config import SECTIONS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert flag_name(section, f.name) in text, (section, f.name)
    for preset in PRESETS:
        assert preset in text
    argv = [
        "train",
        "--preset",
        "tiny",
        "--norm",
        "none",
        "--ffn",
        "silu",
        "--position",
        "nope",
        "--tie-embeddings",
        "--attention",
        "flm",
        "--betas",
        "0.8",
        "0.9",
        "--adam-eps",
        "1e-6",
        "--norm-eps",
        "1e-6",
        "--keep-checkpoints",
        "3",
        "--tokens",
        "20480",
        "--print-config",
    ]
    assert main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["model"]["norm"], cfg["model"]["ffn"], cfg["model"]["position"], cfg["model"]["tie_embeddings"]) == (
        "none",
        "silu",
        "nope",
        True,
    )
    assert cfg["train"]["betas"] == [0.8, 0.9] and cfg["train"]["eps"] == 1e-6 and cfg["model"]["eps"] == 1e-6
    assert cfg["train"]["keep_checkpoints"] == 3 and cfg["train"]["max_iters"] == 80  # 20480 / (8 × 32)


def test_generate_streams_top_k_and_reproduces(tiny_run, capsys):
    argv = [
        "generate",
        str(tiny_run),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "10",
        "--seed",
        "1",
        "--top-k",
        "5",
        "--device",
        "auto",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("Once upon a time") and len(first) > len("Once upon a time")
    assert main(argv) == 0 and capsys.readouterr().out == first
    assert main([*argv[:2], "--checkpoint", str(tiny_run / "ckpt_0000040.safetensors"), *argv[2:], "--no-stream"]) == 0


def test_eval_export_and_tokenize_subcommands(tiny_run, texts, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--text", str(texts[1]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["loss"] == pytest.approx(json.loads((tiny_run / "results.json").read_text())["val_loss"], rel=1e-6)
    assert main(["export-hf", str(tiny_run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    tok_dir = tmp_path / "tok"
    assert main(["tokenize", "train", str(texts[0]), "--vocab-size", "300", "--out-dir", str(tok_dir)]) == 0
    assert (tok_dir / "vocab.json").read_text() == (tiny_run / "vocab.json").read_text()
    assert main(["tokenize", "encode", str(texts[1]), str(tmp_path / "v.tokens"), "--tokenizer", str(tok_dir)]) == 0
    assert (tmp_path / "v.tokens").read_bytes() == (tiny_run / "valid.tokens").read_bytes()


def test_load_run_for_notebooks(tiny_run):
    import flm

    params, config, tok = flm.load_run(tiny_run)
    assert config.vocab_size == 300 and tok.vocab_size <= 300
    ids = flm.generate.generate(params, config, [tok.encode("Once upon")], 5, temperature=0.0, eos_id=tok.eos_id)
    assert len(ids[0]) <= 5


def test_sweep_is_one_vmapped_run(tiny_run, texts, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--preset",
        "tiny",
        "--train-text",
        str(texts[0]),
        "--valid-text",
        str(texts[1]),
        "--out-dir",
        str(out),
        "--lrs",
        "1e-3",
        "1e-2",
        "--max-iters",
        "10",
        "--eval-interval",
        "5",
        "--num-workers",
        "1",
    ]
    assert main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())["results"]
    assert [r["lr"] for r in result] == [1e-3, 1e-2]
    for r in result:
        rows = read_metrics(out / r["label"] / "metrics.jsonl")
        assert [x["step"] for x in rows if x["val_loss"] is not None] == [5, 10]
        assert [x["val_perplexity"] for x in rows if x["val_loss"]] == pytest.approx(
            [math.exp(x["val_loss"]) for x in rows if x["val_loss"]]
        )
    assert result[1]["final_val_loss"] < result[0]["final_val_loss"]  # the higher lr learns faster in 10 steps
    assert (out / "sweep.png").stat().st_size > 0
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # results there: refuse to clobber
    (out / result[0]["label"] / "metrics.jsonl").unlink(missing_ok=True)
    (out / result[0]["label"] / "notes.txt").write_text("mine")  # a variant directory without results
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / result[0]["label"] / "notes.txt").read_text() == "mine"


def test_python_dash_m_flm_is_the_command():
    r = subprocess.run(
        [sys.executable, "-m", "flm", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0 and "flm" in r.stdout, r.stderr


@pytest.mark.parametrize(
    "module, command",
    [
        ("flm.generate", "generate"),
        ("flm.tokenizer", "tokenize"),
        ("flm.data", "download"),
        ("flm.download", "download"),
    ],
)
def test_old_python_dash_m_entry_points_point_to_the_flm_command(module, command):
    """The old ``python -m flm.generate`` etc. imported flm.cli from the library (an import cycle,
    issue 20); they now say, in one line and exit 2, which ``flm`` command to run."""
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: python -m {module} is no longer a command; run: flm {command} … (or python -m flm {command} …)"
    ]


def test_examples_script_is_flm_train(texts, tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tinystories.py"), "--preset", "tiny", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and json.loads(r.stdout)["preset"] == "tiny"


@pytest.mark.parametrize("module", ["flm.data", "flm.generate", "flm.tokenizer", "flm.download"])
def test_python_dash_m_entry_points_run_without_a_runpy_warning(module):
    """Regression: ``import flm`` imported flm.data, so ``python -m flm.data`` warned from runpy."""
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"], capture_output=True)
    assert r.returncode == 2 and b"RuntimeWarning" not in r.stderr, r.stderr.decode()[-500:]


@pytest.mark.parametrize("command", [["generate"], ["eval", "--text", "README.md"], ["export-hf", "--out", "x"]])
def test_a_missing_run_is_a_usage_error_in_every_command(command, tmp_path, capsys):
    """Regression: a missing RUN_OR_CHECKPOINT exited 1 in flm generate but 2 in flm eval."""
    missing = str(tmp_path / "nope")
    assert main([command[0], missing, *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {missing} does not exist"


# Issue 21, items 8-10: what a new user sees on the terminal.


def test_help_shows_plain_text_one_default_and_how_to_pass_none(capsys):
    """``--help`` had Sphinx roles (:func:`…`), defaults twice ('"pre" (default) … (default: pre)')
    and "(None: …)" with no way to pass None: roles are plain names, each flag shows its (preset's)
    default once, and an optional field says ``none``, which the flag accepts."""
    with pytest.raises(SystemExit):
        main(["train", "--preset", "cpu-small", "--help"])
    text = capsys.readouterr().out
    assert not re.search(r":\w+:`", text) and "``" not in text
    assert "see flm.nn.dot_product_attention" in text
    settings = text.split("model settings:")[1].split("presets (--preset")[0]
    entries = re.split(r"\n  (?=--)", settings)
    assert len(entries) > 40
    for entry in entries:
        if entry.startswith("--"):
            assert " ".join(entry.split()).count("(default") == 1, entry
    assert '"pre", "post" or "none"' in " ".join(text.split())
    assert "None" not in settings  # spelled as the flag takes it
    assert "(none: the whole validation set) (default: none)" in " ".join(settings.split())
    assert "0 or none" not in " ".join(settings.split())  # --top-k takes no none: it says "0 = off" only
    # none parses to None, also over a preset's value (cpu-small reads 32 MiB of its training text).
    assert (
        main(["train", "--preset", "cpu-small", "--eval-batches", "none", "--train-bytes", "None", "--print-config"])
        == 0
    )
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["eval_batches"] is None and cfg["data"]["train_bytes"] is None
    assert main(["train", "--preset", "cpu-small", "--eval-batches", "4", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["eval_batches"] == 4


def test_help_text_of_docstring_markup():
    from flm.cli.args import help_text

    assert help_text(":func:`flm.nn.dot_product_attention`.") == "flm.nn.dot_product_attention"
    assert help_text(":py:func:`~flm.nn.rms_norm` or ``x``") == "rms_norm or x"
    assert help_text(":ref:`the guide <guide-label>`") == "the guide"
    assert help_text('"a" (default) or "b" (default: off)') == '"a" or "b" (off)'
    assert help_text("k (0 or None = off)") == "k (0 = off)"
    assert help_text("k (None: all)", optional=True) == "k (none: all)"


def test_quiet_train_shows_warnings_as_one_line_and_no_progress_bar(texts, tmp_path):
    """``flm --quiet train`` printed the ``evaluate 100%|…`` bar, and BPE's early stop as Python's
    raw ``UserWarning`` with its source line: now stdout is empty and stderr holds only
    ``warning: …`` lines (a 4,000-token vocabulary cannot be reached on this text)."""
    argv = train_argv(texts, tmp_path / "run", "--vocab-size", "4000", "--max-iters", "2", "--eval-interval", "0")
    argv += ["--checkpoint-interval", "0", "--max-new-tokens", "0"]
    r = subprocess.run(
        [sys.executable, "-m", "flm", "--quiet", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), r.stderr
    assert any(line.startswith("warning: BPE training stopped after ") for line in lines), r.stderr
    assert "UserWarning" not in r.stderr and "bpe.py" not in r.stderr and "evaluate" not in r.stderr


def test_a_cli_warning_is_one_logged_line_and_the_hook_is_restored(tiny_run, capsys, monkeypatch):
    import warnings

    import flm.cli.generate as generate_cli

    before = warnings.showwarning

    def warn(args):
        warnings.warn("something odd\n  over two lines", UserWarning, stacklevel=1)
        warnings.warn("old spelling", DeprecationWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(generate_cli, "run", warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["generate", str(tiny_run)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: something odd over two lines",
        "warning: DeprecationWarning: old spelling",
    ]
    assert warnings.showwarning is before


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


_CONTROL_PROMPT = "Lily\x1b[2J\x0e\x7f\x9b\tsaw\r"


def test_samples_are_escaped_on_a_terminal_and_exact_in_a_pipe(tiny_run, tmp_path, monkeypatch):
    """A small model's ESC or shift-out bytes drove the terminal: on a terminal ``flm generate``
    shows C0 (but \\n, \\t), DEL and C1 controls escaped; a pipe gets the exact text."""
    argv = ["generate", str(tiny_run), "--prompt", _CONTROL_PROMPT, "--max-new-tokens", "3", "--device", "cpu"]
    for stream_flag in ([], ["--no-stream"]):
        tty = _Terminal()
        monkeypatch.setattr(sys, "stdout", tty)
        assert main(argv + stream_flag) == 0
        monkeypatch.undo()
        shown = tty.getvalue()
        assert shown.startswith("Lily\\x1b[2J\\x0e\\x7f\\x9b\tsaw\\x0d"), shown
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", shown)
    r = subprocess.run(
        [sys.executable, "-m", "flm", *argv], capture_output=True, cwd=tmp_path, timeout=300
    )  # bytes: a pipe
    assert r.returncode == 0 and r.stdout.startswith(_CONTROL_PROMPT.encode()), r.stdout


def test_train_samples_are_escaped_on_a_terminal_and_exact_in_samples_txt(tiny_run, texts, tmp_path, monkeypatch):
    again = tmp_path / "again"
    shutil.copytree(tiny_run, again)
    tty = _Terminal()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(train_argv(texts, again, "--resume", "--prompts", _CONTROL_PROMPT)) == 0
    monkeypatch.undo()
    assert "Lily\\x1b[2J\\x0e\\x7f\\x9b\tsaw\\x0d" in tty.getvalue()
    assert "\x1b" not in tty.getvalue()
    assert _CONTROL_PROMPT in (again / "samples.txt").read_bytes().decode("utf-8")


def test_for_terminal_escapes_only_on_a_terminal():
    from flm.cli.common import for_terminal

    text = "a\x00b\x1bc\x7fd\x85e\nf\tg é ✓"
    assert for_terminal(text, _Terminal()) == "a\\x00b\\x1bc\\x7fd\\x85e\nf\tg é ✓"
    assert for_terminal(text, io.StringIO()) == text
    assert for_terminal(text, object()) == text  # no isatty: not a terminal


def test_a_tokenizer_smaller_than_the_model_samples_only_its_ids(texts, tmp_path, capsys):
    """BPE stopped early (a 4,000-token vocabulary cannot be reached on this text), so the model
    has ids the tokenizer cannot decode: flm train's samples and flm generate crashed with
    "token id N is not in the vocabulary"; now they sample only the tokenizer's ids."""
    from flm.cli import main

    out = tmp_path / "run"
    argv = train_argv(texts, out, "--vocab-size", "4000", "--max-iters", "2", "--eval-interval", "0")
    assert main([*argv, "--checkpoint-interval", "0", "--max-new-tokens", "40", "--temperature", "1.0"]) == 0
    assert (out / "samples.txt").exists()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Once", "--max-new-tokens", "40", "--temperature", "1.0"]) == 0
    assert capsys.readouterr().out.startswith("Once")
