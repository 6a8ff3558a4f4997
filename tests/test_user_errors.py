"""What a user can get wrong is refused with one clear line (issue 18): NaN checkpoints are not
written unless asked and ``flm generate`` says a checkpoint holds NaN; a directory named where a
file is expected is called a directory; a named ``--gpt2-dir`` that does not exist is an error,
not a comparison silently dropped."""

from __future__ import annotations

import shutil

import pytest
import torch

from flm.checkpoint import load_checkpoint, save_checkpoint
from flm.cli import main
from flm.tree import tree_map


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "internal error" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------- NaN checkpoints
def test_save_checkpoint_refuses_non_finite_parameters_unless_asked(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    params = {"layers": [{"w": torch.ones(3)}, {"w": torch.tensor([1.0, float("nan")])}]}
    with pytest.raises(ValueError, match=r"params\.layers\.1\.w holds NaN values; refusing to write .*allow_nonfinite"):
        save_checkpoint(path, params=params)
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary left
    with pytest.raises(ValueError, match=r"opt_state\.m holds inf values"):
        save_checkpoint(path, params={"w": torch.ones(2)}, opt_state={"m": torch.tensor([float("inf")])})
    assert not path.exists()
    save_checkpoint(path, params=params, allow_nonfinite=True)
    assert load_checkpoint(path).params["layers"][1]["w"].isnan().any()
    save_checkpoint(path, params={"w": torch.ones(2)}, opt_state={"step": torch.tensor(3)})  # finite and ints: fine


def test_generate_says_the_checkpoint_holds_nan(tiny_run, tmp_path, capsys):
    """Regression: ``flm generate`` on NaN parameters printed ``internal error: RuntimeError:
    probability tensor contains either inf, nan…``."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    best = run / "best.safetensors"
    ckpt = load_checkpoint(best)
    save_checkpoint(
        best,
        params=tree_map(lambda p: p * float("nan"), ckpt.params),
        step=ckpt.step,
        config=ckpt.config,
        metadata=ckpt.metadata,
        allow_nonfinite=True,
    )
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Once", "--max-new-tokens", "3", "--device", "cpu"]) == 1
    _one_line_error(capsys, str(best), "holds NaN/inf parameters")


# ------------------------------------------------------------ a directory where a file goes
@pytest.mark.parametrize("command", ["eval", "tokenize train", "tokenize encode", "tokenize encode --vocab"])
def test_a_directory_given_as_an_input_file_is_called_a_directory(command, tiny_run, texts, tmp_path, capsys):
    """Regression: ``flm eval RUN --text DIR``, ``flm tokenize train DIR`` and ``flm tokenize encode
    DIR …`` said "no such file" for a directory that exists."""
    folder = tmp_path / "some dir"
    folder.mkdir()
    argv = {
        "eval": ["eval", str(tiny_run), "--text", str(folder)],
        "tokenize train": ["tokenize", "train", str(folder), "--vocab-size", "300", "--out-dir", str(tmp_path / "t")],
        "tokenize encode": [
            "tokenize",
            "encode",
            str(folder),
            str(tmp_path / "o.tokens"),
            "--tokenizer",
            str(tiny_run),
        ],
        "tokenize encode --vocab": [
            "tokenize",
            "encode",
            str(texts[1]),
            str(tmp_path / "o.tokens"),
            "--vocab",
            str(folder),
            "--merges",
            str(tiny_run / "merges.txt"),
        ],
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line_error(capsys, str(folder), "is a directory")
    assert "no such file" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some dir"]  # nothing written
    # A path that really is missing is still "no such file".
    argv[argv.index(str(folder))] = str(tmp_path / "missing.txt")
    assert main(argv) == 2
    _one_line_error(capsys, "missing.txt", "no such file")


# ---------------------------------------------------------------------------- --gpt2-dir
@pytest.mark.parametrize("kind", ["missing", "file", "empty dir", "no merges"])
def test_experiment_tokenizer_refuses_a_gpt2_dir_it_cannot_use(kind, texts, tmp_path, capsys):
    """Regression: ``flm experiment tokenizer --gpt2-dir /nonexistent`` exited 0 and silently
    dropped the GPT-2 comparison."""
    gpt2 = tmp_path / "gpt2"
    if kind == "file":
        gpt2.write_text("not a directory")
    elif kind != "missing":
        gpt2.mkdir()
        if kind == "no merges":
            (gpt2 / "gpt2_vocab.json").write_text("{}")
    out = tmp_path / "exp"
    train, valid = texts
    argv = ["experiment", "tokenizer", "--preset", "tiny", "--train-text", str(train), "--valid-text", str(valid)]
    capsys.readouterr()
    assert main([*argv, "--out-dir", str(out), "--gpt2-dir", str(gpt2), "--device", "cpu"]) == 2
    want = {
        "missing": "no such directory",
        "file": "not a directory",
        "empty dir": "has no gpt2_vocab.json",
        "no merges": "has no gpt2_merges.txt",
    }[kind]
    _one_line_error(capsys, f"--gpt2-dir {gpt2}", want)
    assert not out.exists()  # refused before anything was written


def test_exp_tokenizer_library_refuses_a_missing_gpt2_dir(tmp_path):
    from flm.experiments.handout import exp_tokenizer

    with pytest.raises(ValueError, match=r"gpt2_dir .* has no gpt2_vocab\.json or gpt2_merges\.txt"):
        exp_tokenizer(None, gpt2_dir=str(tmp_path / "nowhere"))  # type: ignore[arg-type]
