"""A quicker interpreter exit for the command line."""

from __future__ import annotations

import atexit
import gc


def skip_exit_collection() -> None:
    """At exit, freeze every object so that Python's shutdown does not search them all for cycles.

    A process that loaded a model holds the objects of some 3,000 modules (torch,
    transformers, sympy, ...); the interpreter's shutdown runs the cycle collector over
    all of them while it clears the modules: about 1.4 s of a 7 s ``load_model`` process
    (2-core CPU, shared, one thread).  ``gc.freeze`` moves every object out of the
    collector's reach; reference counting still frees what it frees, and the other exit
    handlers (files, logging, torch's) run before it, as registered later ones run first.
    Only cycles still alive at exit are left to the operating system.  Calling it again
    keeps one registration.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
