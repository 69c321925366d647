"""A script's ``main(argv)`` run in-process up to argparse's exit: ``--help`` (status 0) or refused input (status 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def exit_output(main: Callable[[Sequence[str]], object], argv: Sequence[str], status: int, capsys) -> tuple[str, str]:
    """Run ``main(argv)``, which must exit with ``status``; return what it printed (stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == status
    captured = capsys.readouterr()
    return captured.out, captured.err


def help_text(main: Callable[[Sequence[str]], object], capsys) -> str:
    """What ``main(["--help"])`` prints; it must exit with status 0."""
    return exit_output(main, ["--help"], 0, capsys)[0]


def usage_error(main: Callable[[Sequence[str]], object], argv: Sequence[str], capsys) -> str:
    """The error message of ``main(argv)``, which must refuse ``argv`` with status 2."""
    return exit_output(main, argv, 2, capsys)[1]
