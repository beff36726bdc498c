"""One error path for every command (``zsp_jax.main``, ``zsp_jax.label``, ``zsp_jax.evaluate``, the tools).

A mistake is answered with one line, ``error: <what> ...``, naming the flag, config field or file
and what to do, and exit code 2; no traceback. Everything else that goes wrong (a bug) is one line
too, with exit code 1, saying where the traceback was written. The traceback is printed when
``ZSP_JAX_TRACEBACK=1`` is set or the command's verbose switch is on (``--verbose``,
``--config.verbose=True``).

* ``parse_flags``: absl flag parsing (also the ``--config`` file and its ``--config.<field>``
  overrides) where every failure is one line: an unknown config field names the nearest existing
  one; a missing config file lists the ones in ``configs/``; a bad variant argument gives the
  config file's own message.
* ``run_main``: calls a command's ``main`` and turns exceptions into those lines. Library logging
  errors (e.g. a full disk under the log file) are not printed as ``--- Logging error ---`` blocks.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

TRACEBACK_ENV = "ZSP_JAX_TRACEBACK"
EXIT_MISTAKE, EXIT_BUG = 2, 1

class UsageError(ValueError):
    """A mistake in how a command was called; the message names the flag or field."""


def traceback_wanted(verbose: bool = False) -> bool:
    return verbose or os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes", "on")


def fail(message: str, code: int = EXIT_MISTAKE) -> NoReturn:
    """Prints ``error: <message>`` (one line per line of the message) and exits with ``code``."""
    for line in str(message).strip().splitlines() or ["(no message)"]:
        line = line.strip()
        if line:
            print(f"error: {line[2:] if line.startswith('- ') else line}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------------------- flags


def _config_flag_value(argv: Sequence[str], name: str = "config") -> str | None:
    """The value of ``--<name>=...`` / ``--<name> ...`` in ``argv`` (the last one), if any."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _override_flags(argv: Sequence[str], name: str = "config") -> list[tuple[str, str]]:
    """(dotted field, raw argument) of every ``--<name>.<field>=...`` in ``argv``."""
    out = []
    for arg in argv:
        m = re.match(rf"--(?:no)?{name}\.([\w.]+)(?:=.*)?$", arg)
        if m:
            out.append((m.group(1), arg))
    return out


def load_config_file(spec: str) -> Any:
    """``get_config(arg)`` of ``path[:arg]`` (as ml_collections' config flag loads it)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("zsp_jax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def field_problem(config: Any, dotted: str) -> str | None:
    """Why ``dotted`` is not a field of ``config`` (None if it is), with the nearest existing name."""
    import ml_collections

    node, walked = config, []
    for part in dotted.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
            node = node[part]
            walked.append(part)
            continue
        where = ".".join(walked)
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return f"config field {where} is a value, not a section (no field {dotted})"
        keys = sorted(node.keys())
        close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
        initials = "".join(word[:1] for word in part.split("_"))  # learning_rate -> lr
        close = close or [k for k in keys if len(part.split("_")) > 1 and k == initials][:1]
        full = ".".join(walked + [part])
        if close:
            return f"config field {full} does not exist; did you mean {'.'.join(walked + [close[0]])}?"
        return f"config field {full} does not exist ({where or 'the config'} has: {', '.join(keys)})"
    return None


def _config_files_hint(path: str) -> str:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        folder = "configs"
    try:
        found = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
    except OSError:
        found = []
    return f" (config files in {folder}/: {', '.join(found)})" if found else ""


def _last_error_line(text: str) -> str:
    """The last ``SomeError: message`` line of a text that embeds a traceback, without the type."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in reversed(lines):
        m = re.match(r"^(?:[\w.]+(?:Error|Exception)):\s*(.*)$", line)
        if m:
            return m.group(1)
    return lines[-1] if lines else str(text)


def explain_flag_error(error: BaseException, argv: Sequence[str], config_flag: str = "config") -> str:
    """One line for a failure while parsing ``argv`` (absl flags and the config flag's overrides)."""
    spec = _config_flag_value(argv, config_flag)
    if spec is not None:
        path = spec.partition(":")[0]
        if not os.path.isfile(path):
            return f"--{config_flag}={spec}: no such config file{_config_files_hint(path)}"
        overrides = _override_flags(argv, config_flag)
        if overrides:
            try:
                config = load_config_file(spec)
            except Exception as e:  # noqa: BLE001 - the config file itself is at fault
                return f"--{config_flag}={spec}: {_last_error_line(str(e)) or type(e).__name__}"
            for dotted, arg in overrides:
                problem = field_problem(config, dotted)
                if problem:
                    return f"{arg.split('=')[0]}: {problem}"
    text = str(error)
    m = re.search(r"flag (--[^\s:]+)", text)
    if "Traceback" in text or m is None:
        flag = m.group(1) if m else (f"--{config_flag}={spec}" if spec is not None else "flags")
        return f"{flag}: {_last_error_line(text)}"
    return re.sub(r"^\s*(FATAL\s+)?(Flags parsing error:\s*)?(flag\s+)?", "", text.splitlines()[0])


def define_config_flag(default: str, help_text: str = "config file[:variant args]", name: str = "config") -> Any:
    """``config_flags.DEFINE_config_file`` (locked), whose loading of ``--<name>.<field>`` overrides at
    definition time fails with one ``error:`` line instead of a traceback."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
    except Exception as e:  # noqa: BLE001 - an unknown overridden field, found while defining the flag
        if traceback_wanted():
            traceback.print_exc()
        argv = sys.argv[1:]
        if _config_flag_value(argv, name) is None:
            argv = [*argv, f"--{name}={default}"]
        fail(explain_flag_error(e, argv, name))


def parse_flags(argv: list[str], *, config_flag: str = "config") -> list[str]:
    """absl flag parsing for ``app.run(main, flags_parser=parse_flags)``: a mistake is one ``error:``
    line and exit code 2 (absl prints a traceback for some and usage text for others)."""
    from absl import flags

    try:
        remaining = flags.FLAGS(argv)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - flags.Error, and what the config flag's loading raises
        if traceback_wanted():
            traceback.print_exc()
        fail(explain_flag_error(e, argv[1:], config_flag))
    if len(remaining) > 1:
        fail(f"unexpected argument(s) {' '.join(remaining[1:])}: every option is a --flag (see --help)")
    spec = _config_flag_value(argv[1:], config_flag)
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):  # loaded lazily: check it now
        fail(f"--{config_flag}={spec}: no such config file{_config_files_hint(spec.partition(':')[0])}")
    return remaining


# --------------------------------------------------------------------------------------------- errors

_MISTAKES: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError,
                                             IsADirectoryError, FileExistsError, KeyError)
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
                errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}


def _disk_errno(error: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s, or one that a library reports in its message
    (safetensors, TensorStore: "... (os error 28)")."""
    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
        return error.errno
    m = re.search(r"os error (\d+)", str(error))
    return int(m.group(1)) if m and int(m.group(1)) in _DISK_ERRNOS else None


def _is_mistake(error: BaseException) -> bool:
    """Errors the project raises on purpose about the user's inputs, and disk problems."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"CheckpointError", "ConversionError", "CheckpointsDamaged", "TrainingDiverged", "InputProblems",
                "BadInputError", "CheckpointNotFound", "UsageError"}:
        return True
    if _disk_errno(error) is not None:
        return True
    return isinstance(error, _MISTAKES) and not isinstance(error, KeyError)


def describe(error: BaseException) -> str:
    """The message of an error as the ``error:`` line(s) show it."""
    code = _disk_errno(error)
    if code is not None:
        where = getattr(error, "filename", None) or ""
        return (f"cannot write {where}: {_DISK_ERRNOS[code]}" if where else
                f"cannot write: {_DISK_ERRNOS[code]} ({str(error).splitlines()[0][:200]})")
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error).strip()
    return text or type(error).__name__


def report(error: BaseException, *, verbose: bool = False, log_file: str | None = None) -> int:
    """Prints ``error: ...`` for ``error`` (and the traceback if wanted); returns the exit code."""
    if log_file:  # the traceback is kept where the library logs are, whatever the console shows
        try:
            with open(log_file, "a") as f:
                f.write("command failed:\n" + "".join(traceback.format_exception(type(error), error,
                                                                                 error.__traceback__)))
        except OSError:
            log_file = None
    if traceback_wanted(verbose):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    if _is_mistake(error):
        message, code = describe(error), EXIT_MISTAKE
    else:
        where = f"the traceback is in {log_file}" if log_file else f"rerun with {TRACEBACK_ENV}=1 for the traceback"
        message = f"unexpected {type(error).__name__}: {describe(error)} (a bug in zsp_jax; {where})"
        code = EXIT_BUG
    for line in message.splitlines() or [message]:
        line = line.strip()
        if line:
            print(f"error: {line[2:] if line.startswith('- ') else line}", file=sys.stderr, flush=True)
    return code


def run_main(body: Callable[[], Any], *, verbose: Callable[[], bool] = lambda: False,
             log_file: Callable[[], str | None] = lambda: None) -> None:
    """Runs a command's body; an exception becomes ``error:`` lines and an exit code (see ``report``)."""
    logging.raiseExceptions = False  # a failing log handler (full disk) must not print tracebacks
    try:
        body()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - every error ends as one line
        try:
            is_verbose = bool(verbose())
        except Exception:  # noqa: BLE001 - e.g. the config could not be loaded
            is_verbose = False
        try:
            where = log_file()
        except Exception:  # noqa: BLE001
            where = None
        sys.exit(report(e, verbose=is_verbose, log_file=where))


def quiet_library_logs(verbose: bool = False) -> None:
    """Library INFO lines (JAX's backend probing, absl, Orbax, TFDS) off the console unless ``verbose``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if verbose:
        return
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    absl_logging.get_absl_handler().setLevel(logging.CRITICAL + 1)
    for name in ("jax", "jax._src.xla_bridge", "absl", "orbax", "tensorflow_datasets", "grain"):
        logging.getLogger(name).setLevel(logging.ERROR)



# ---------------------------------------------------------------------------------------- tools

class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes are one ``error:`` line and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")


def convert_and_save(source: str, out: str, convert: Callable[[], Any], save: Callable[[Any], None]) -> Any:
    """What every ``tools/convert_*.py`` does around its own conversion: refuse an output path that is the source
    or a directory, ``convert()``, ``save(converted)``. Returns what ``convert`` gave, or None after printing one
    ``error:`` line (a missing or unreadable source, an invalid config or option, a failed write naming ``out``),
    for the tool to return exit code 2."""
    from zsp_jax.utils.io import output_path_problem
    from zsp_jax.utils.weights import ConversionError

    def error(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)

    if problem := output_path_problem(source, out):
        return error(problem)
    try:
        converted = convert()
    except (FileNotFoundError, ConversionError, ValueError) as e:  # ValueError: an invalid config or option
        return error(str(e))
    try:
        save(converted)
    except OSError as e:
        return error(f"cannot write {out}: {e}")
    return converted


def run_tool(main: Callable[..., Any], argv: Sequence[str] | None = None) -> NoReturn:
    """``if __name__ == "__main__": cli.run_tool(main)`` for ``tools/*.py``: the tool's return value is the exit
    code (None = 0); an exception becomes ``error:`` lines (``report``); ``ZSP_JAX_TRACEBACK=1`` shows it."""
    code: list[int] = [0]

    def body() -> None:
        result = main() if argv is None else main(list(argv))
        code[0] = int(result or 0)

    run_main(body)
    sys.exit(code[0])
