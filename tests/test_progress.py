"""flm.progress: a bar redrawn in place (``\\r``) on a terminal, throttled plain lines in files and CI
logs, and the count/duration formatters."""

from __future__ import annotations

import io
import re
import sys

import pytest

from flm.progress import ProgressBar, format_count, format_duration, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _percents(lines: list[str]) -> list[int]:
    return [int(re.search(r"(\d+)%", line).group(1)) for line in lines]


def test_a_terminal_gets_one_line_redrawn_with_carriage_returns():
    f = _Terminal()
    with ProgressBar(3, "t.bin", file=f, min_interval=0) as bar:
        for _ in range(3):
            bar.update(1)
    out = f.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")  # one line, ended by close
    frames = [s.strip() for s in out.split("\r") if s.strip()]
    assert len(frames) >= 4 and _percents(frames)[-4:] == [33, 67, 100, 100]
    assert all(frame.startswith("t.bin") for frame in frames)


def test_a_file_gets_plain_lines_at_most_every_log_interval():
    f = io.StringIO()
    with ProgressBar(1000, "f.bin", file=f, log_interval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    out = f.getvalue()
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("f.bin") for line in lines)  # its start and its end
    assert _percents(lines) == [0, 100]


def test_a_file_gets_a_line_per_update_without_interval_and_no_repeated_final_line():
    f = io.StringIO()
    with ProgressBar(4, "g", unit="it", file=f, log_interval=0) as bar:
        for _ in range(4):
            bar.update(1)
    out = f.getvalue()
    assert "\r" not in out
    assert _percents(out.splitlines())[-5:] in ([0, 25, 50, 75, 100], [25, 50, 75, 100])  # close adds no copy


def test_progress_bar_redraws_on_a_terminal_and_writes_plain_lines_elsewhere(monkeypatch):
    for stream, carriage_returns in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress_bar(2, "x", unit="it") as bar:
            bar.update(2)
        out = stream.getvalue()
        assert ("\r" in out) is carriage_returns and out.count("\n") >= 1 and "100%" in out.splitlines()[-1]
        with progress_bar(2, "quiet", unit="it", enabled=False) as quiet:
            quiet.update(2)
        assert stream.getvalue() == out


def test_a_broken_log_stream_does_not_stop_the_work():
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    with ProgressBar(3, "b", file=Broken(), log_interval=0) as bar:
        bar.update(3)
    assert bar.n == 3


def test_format_helpers():
    assert format_count(512) == "512 B"
    assert format_count(1536) == "1.5 KiB"
    assert format_count(3 * 2**30) == "3.0 GiB"
    assert format_count(12_000, "tok") == "12.0k tok"
    assert format_duration(59) == "0:59" and format_duration(3725) == "1:02:05"
    assert format_duration(float("inf")) == "?"


def test_progress_bar_render_and_close():
    f = io.StringIO()
    with ProgressBar(200, "file.bin", file=f, log_interval=0) as bar:
        bar.update(50)
        assert "25%" in bar.render() and "50 B/200 B" in bar.render()
        bar.update(150)
    text = f.getvalue()
    assert text.splitlines()[-1].startswith("file.bin  100%")
    bar.close()  # idempotent
    assert f.getvalue() == text
    assert ProgressBar(None, "n", unit="it").render().startswith("n  0 it [")  # unknown total: no percentage


def test_progress_bar_throttles_and_can_be_disabled():
    f = io.StringIO()
    bar = ProgressBar(10**6, "x", file=f, log_interval=3600)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(f.getvalue().splitlines()) == 2  # the first update and the final state
    g = io.StringIO()
    with ProgressBar(10, "y", enabled=False, file=g) as quiet:
        quiet.update(10)
    assert g.getvalue() == "" and quiet.n == 10
    with pytest.raises(ValueError):
        ProgressBar(-1)


def test_progress_bar_resumed_initial_is_shown_but_not_in_rate():
    bar = ProgressBar(100, "r", initial=40, file=io.StringIO())
    assert "40 B/100 B" in bar.render() and "0 B/s" in bar.render()
