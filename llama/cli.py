"""What every command line tool shares (the examples, llama.chat, llama.convert, llama.tiny): its flags checked
against the function before anything runs, and a mistake reported as one line, once.

Tools are fire commands. fire would accept a mistyped flag silently, run the whole command, and only then fail;
`run` refuses it first. An exception the command raises is printed as `error: <message>` by rank 0 alone (exit
status 1; 2 for a wrong command line); LLAMA_TRACEBACK=1 shows the traceback instead.
"""

import difflib
import inspect
import os
import re
import sys
import time
import typing
from typing import Callable, Dict, List, Union

import fire

OTHER_RANKS_WAIT_S = 3
# Errors whose message is the whole story; anything else also gets its type named.
USER_ERRORS = (ValueError, TypeError, OSError)


class UsageError(Exception):
    """A command line that names no command, a flag the command lacks, or misses a required argument."""


def is_flag(argument: str) -> bool:
    """fire's rule: a leading hyphen, unless it is a negative number."""
    return argument.startswith("--") or re.match(r"^-[a-zA-Z]", argument) is not None


def check_command_line(fn: Callable, args: List[str], prog: str) -> None:
    """Raise UsageError for a flag `fn` does not take, too many positional arguments, or a required argument
    missing, read the way fire reads them (--name value, --name=value, --flag, --noflag, -n for a unique initial)."""
    params = inspect.signature(fn).parameters
    names = list(params)
    given, positional = set(), []
    skip = False
    for index, argument in enumerate(args):
        if skip:
            skip = False
            continue
        if not is_flag(argument):
            positional.append(argument)
            continue
        key = argument.lstrip("-").split("=", 1)[0].replace("-", "_")
        boolean = "=" not in argument and (index + 1 == len(args) or is_flag(args[index + 1]))
        if key not in params and boolean and key.startswith("no") and key[2:] in params:
            key = key[2:]
        elif key not in params and len(key) == 1 and sum(n[0] == key for n in names) == 1:
            key = next(n for n in names if n[0] == key)
        if key not in params:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise UsageError(f"{prog} has no flag {argument.split('=', 1)[0]}{hint} (see {prog} --help)")
        given.add(key)
        skip = "=" not in argument and not boolean
    unnamed = [n for n in names if n not in given]
    if len(positional) > len(unnamed):
        raise UsageError(f"{prog} got unexpected argument(s) {positional[len(unnamed):]} (see {prog} --help)")
    given.update(unnamed[: len(positional)])
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given]
    if missing:
        raise UsageError(f"{prog} needs {', '.join('--' + n for n in missing)} (see {prog} --help)")


def plain_optional_annotations(fn: Callable) -> None:
    """Show Optional[str] arguments as `str` to fire, whose help prints Optional[X] as 'Optional[Optional]' (it
    adds the Optional itself for a default of None)."""
    signature = inspect.signature(fn)
    params = []
    for p in signature.parameters.values():
        inner = [a for a in typing.get_args(p.annotation) if a is not type(None)]
        if typing.get_origin(p.annotation) is Union and len(inner) == 1:
            p = p.replace(annotation=inner[0])
        params.append(p)
    fn.__signature__ = signature.replace(parameters=params)


def print_error(message: str, every_rank: bool = False) -> None:
    """Print on rank 0 (RANK is set by torchrun before any process group exists). Another rank first gives rank 0
    OTHER_RANKS_WAIT_S to fail the same way, when torchrun ends this process unheard; it speaks only for an error of
    its own (or when every_rank)."""
    rank = os.environ.get("RANK", "0")
    if rank != "0" and not every_rank:
        time.sleep(OTHER_RANKS_WAIT_S)
    print(f"error: {message}" if rank == "0" else f"error (rank {rank}): {message}", file=sys.stderr, flush=True)


def describe(err: Exception) -> str:
    """The one line to print for an error a command raised."""
    if isinstance(err, RuntimeError) and "Timed out" in str(err):  # gloo's words; NCCL's watchdog aborts instead
        return ("waited LLAMA_DIST_TIMEOUT for another process, which is stuck or has died; set LLAMA_DIST_TIMEOUT "
                f"(seconds) to wait longer ({err})")
    if isinstance(err, USER_ERRORS):
        return str(err)
    return f"{type(err).__name__}: {err} (LLAMA_TRACEBACK=1 shows where)"


def run(command: Union[Callable, Dict[str, Callable]], prog: str) -> None:
    """fire.Fire(command) for a tool run as `prog`; a dict of functions is a tool with subcommands."""
    args = sys.argv[1:]
    try:
        checked = args[: args.index("--")] if "--" in args else args  # after "--": fire's own flags
        if not {"-h", "--help"} & set(checked):
            fn, fn_args, fn_prog = command, checked, prog
            if isinstance(command, dict):
                if not checked or checked[0] not in command:
                    named = f"unknown command {checked[0]!r}" if checked else "no command given"
                    raise UsageError(f"{prog}: {named}; choose one of {', '.join(command)}")
                fn, fn_args, fn_prog = command[checked[0]], checked[1:], f"{prog} {checked[0]}"
            check_command_line(fn, fn_args, fn_prog)
        for fn in command.values() if isinstance(command, dict) else [command]:
            plain_optional_annotations(fn)
    except UsageError as err:
        print_error(str(err))
        sys.exit(2)
    try:
        fire.Fire(command, name=prog.split()[-1])  # fire quotes a name with spaces
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        if os.environ.get("LLAMA_TRACEBACK"):
            raise
        print_error(describe(err), every_rank="Timed out" in str(err))  # a timeout is each rank's own story
        sys.exit(1)
