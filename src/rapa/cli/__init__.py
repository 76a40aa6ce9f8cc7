"""The ``rapa`` command line: one module per subcommand, registered here.

Each subcommand module defines ``register(subparsers)`` which adds its parser and
sets ``func`` (a callable taking the parsed ``argparse.Namespace``). Only the module of
the command being run is imported (the others appear in ``rapa --help`` by their
one-line summary, :data:`COMMANDS`), so help and argument errors come back at once.

Errors a user can fix raise :class:`rapa.errors.RapaError` and are printed as one line,
without traceback, exit status 2 (as are the argument errors argparse finds); a result that cannot be written after all
(:class:`rapa.errors.OutputError`, or any other ``OSError``) exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, NoReturn, Sequence

from rapa import __version__
from rapa.errors import RapaError
from rapa.heap import keep_heap

# subcommand -> its one-line summary, in the order `rapa --help` lists them
COMMANDS: dict[str, str] = {
    "demo": "train the untiled and the random-tiled net for a few epochs and compare them (minutes on a CPU)",
    "train": "train the paper's ConvNet (tiled or not) into a run directory",
    "eval": "test errors of a trained run: single pass, majority and adaptive vote",
    "bench": "benchmarks: RAPA conv layer, training, analog training",
    "similarity": "similarity of the filters across tiles (paper Fig. 6)",
    "reduce": "reduce a tiled net to one kernel per layer (paper Table 3)",
    "attack": "FGSM/EOT/PGD robustness against SNR (paper Fig. 7)",
    "theory": "replicated logistic regression: implicit regulariser R (paper 3.5-3.6)",
    "speedup": "analog run time and speed-up of a tiled network (paper Fig. 1, 4.2)",
    "convert": "what rapa.convert makes of a net: tiles, patches per tile, analog speed-ups",
    "sweep": "train an experiment's grid of runs on Ray (local or a cluster)",
    "report": "the paper's tables and figures from a sweep folder",
    "reproduce": "the reproduction battery on Fashion-MNIST, the paper's claims checked",
    "modern": "beyond the paper: RAPA on a residual and a depthwise-separable net (Fashion-MNIST)",
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors (an unknown option, a value that does not parse) are one
    line, ``rapa CMD: error: ...``, exit status 2, like every other error a user can fix
    (its subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Subparsers:
    """The subparsers action as a command module sees it: its parser gets the summary of
    :data:`COMMANDS` as help, so that the list in ``rapa --help`` has one source."""

    def __init__(self, action: argparse._SubParsersAction) -> None:
        self._action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["help"] = COMMANDS[name]
        return self._action.add_parser(name, **kwargs)


def _selected(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the first argument that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser. With ``argv``, only the named command's module is imported and
    registered in full, the others by name and summary; without, every command in full."""
    parser = _Parser(
        prog="rapa",
        description="RAPA-ConvNets: replicated kernel matrices for analog arrays.",
    )
    parser.add_argument("--version", action="version", version=f"rapa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = None if argv is None else _selected(argv)
    for name, summary in COMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        try:
            module = importlib.import_module(f"rapa.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not written yet
            if exc.name == f"rapa.cli.{name}":
                continue
            raise
        module.register(_Subparsers(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rapa`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    keep_heap()  # this process's own allocator settings (rapa.heap); the library never sets them
    stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except RapaError as exc:
        print(f"rapa {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"rapa {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rapa ... | head`: the reader has gone
        _silence_stdout()
        return 1
    except OSError as exc:  # a write that failed after the outputs were checked (disk full ...)
        if exc.filename:
            where = f"{exc.filename}: "
        elif isinstance(exc, _StdoutError):  # print() to a full or closed stdout
            where = "cannot write to standard output: "
            _silence_stdout()
        else:
            where = ""
        print(f"rapa {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout
    return int(rc or 0)


class _StdoutError(OSError):
    """A write to standard output failed."""


class _GuardedStdout:
    """``sys.stdout`` whose failed writes raise :class:`_StdoutError`, so that the message
    can say it was standard output (a print() error carries no file name)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _StdoutError(exc.errno, exc.strerror) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _StdoutError(exc.errno, exc.strerror) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
