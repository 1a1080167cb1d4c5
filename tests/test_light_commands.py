"""Listing commands start without torch or transformers: each is run in a fresh Python
process, which reports the heavy packages its command imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "safetensors", "tokenizers")

_PROBE = """
import json, sys
from typer.testing import CliRunner
from kedit.cli import app
res = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit": res.exit_code, "output": res.output,
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def run_fresh(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["models", "methods"])
def test_listing_command_imports_no_heavy_package(command):
    res = run_fresh(command)
    assert res["exit"] == 0, res["output"]
    assert res["heavy"] == [], f"kedit {command} imported {res['heavy']}"


def test_models_lists_the_default_model():
    res = run_fresh("models")
    assert "smollm2-135m (default)" in res["output"]


def test_methods_read_from_source_are_the_registered_ones():
    from kedit.methods.catalog import shipped_methods
    from kedit.methods.registry import get_method, method_names

    registered = [(n, get_method(n).kind, get_method(n).description) for n in method_names()]
    assert [(m.name, m.kind, m.description) for m in shipped_methods()] == registered


def test_a_description_that_is_not_a_literal_is_refused(tmp_path, monkeypatch):
    import kedit.methods.catalog as catalog

    (tmp_path / "odd_method.py").write_text(
        "@register\nclass Odd(Method):\n    name = 'odd'\n    description = 'a' + str(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(catalog, "METHOD_MODULES", ("odd_method",))
    with pytest.raises(catalog.UnreadableMethod, match="odd_method.Odd.description"):
        catalog.shipped_methods()


def test_exit_freezes_objects_after_the_handlers_registered_later(tmp_path):
    early, late = tmp_path / "early", tmp_path / "late"
    code = f"""
import atexit, gc
atexit.register(lambda: open({str(early)!r}, "w").write(str(gc.get_freeze_count())))
from kedit.util.shutdown import skip_exit_collection
skip_exit_collection()
skip_exit_collection()
atexit.register(lambda: open({str(late)!r}, "w").write(str(gc.get_freeze_count())))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert late.read_text() == "0"          # handlers registered after it run before the freeze
    assert int(early.read_text()) > 0       # ... and it ran at exit, before those registered earlier
