"""Replay progress: a redrawn bar on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io

from streams.replay import Replayer


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _replayer(out: io.StringIO) -> Replayer:
    replayer = Replayer.__new__(Replayer)  # no broker: only the progress display is under test
    replayer.progress = out
    replayer._shown = None
    return replayer


def test_log_gets_a_line_per_tenth_not_per_poll() -> None:
    out = io.StringIO()
    replayer = _replayer(out)
    for done in [0, 0, 1, 5, 10, 10, 11, 57, 100, 100]:
        replayer._show(done, 100)
    assert out.getvalue().splitlines() == [
        "  decisions 0/100", "  decisions 10/100", "  decisions 57/100", "  decisions 100/100"]
    assert "\r" not in out.getvalue()


def test_terminal_bar_is_redrawn_only_when_the_count_changes() -> None:
    out = _Terminal()
    replayer = _replayer(out)
    for done in [0, 0, 1, 1, 2]:
        replayer._show(done, 2)
    frames = out.getvalue().split("\r")[1:]
    assert frames == ["  decisions [" + "." * 30 + "] 0/2", "  decisions [" + "#" * 15 + "." * 15 + "] 1/2",
                      "  decisions [" + "#" * 30 + "] 2/2"]
