"""How the tests hold the command line to its promise for a user's mistake: exit status 2 and one line."""
from __future__ import annotations

from scratchlm.cli import main


def one_line_error(capsys, argv) -> str:
    """Run `scratchlm ARGV`, expect exit status 2 with one `error:` line and no traceback; return the line.
    Progress notes may come before it; nothing comes after."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]
