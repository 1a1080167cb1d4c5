"""`python -m kedit ...`: the same CLI as the `kedit` command (launchers such as torchrun and
accelerate start modules this way)."""

from kedit.cli import app

if __name__ == "__main__":
    app(prog_name="kedit")
