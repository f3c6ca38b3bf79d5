"""Running the ``influent`` command in-process from tests."""

from influent.cli import main


def run_cli(capsys, argv):
    """``influent argv`` in this process: ``(exit status, stdout, stderr)``."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err
