"""Deprecated name of :mod:`rapa.cli.common` (threads, outputs, runs): kept importable."""

from __future__ import annotations

from rapa.cli.common import (add_quiet, add_threads, apply_threads, auto_threads, output_file, output_folder,
                             run_output, write_text)

__all__ = ["add_quiet", "add_threads", "apply_threads", "auto_threads", "output_file", "output_folder",
           "run_output", "write_text"]
