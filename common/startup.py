"""Imported first by every script, before the libraries that take a second or two to load (torch, diffusers): Ctrl-C,
SIGTERM or SIGHUP in that time ends the program in one line instead of a traceback from inside an import. Importing
it changes how these signals end the program, which is why a script imports it explicitly and nothing else does;
cli() then installs the run's own handling (common/cli.py)."""

import os
import signal
import sys


def quit_before_start(signum, frame) -> None:
    print("interrupted before the run started; nothing was written", file=sys.stderr)
    os._exit(128 + signum)


for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, quit_before_start)
