"""Calling a CLI's `main` in-process, as the shell would."""

from __future__ import annotations


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """Call `main(argv)` in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
