"""Command-line strings: reading, testing and dropping ``--flag [value]`` in an argv list, and the
one error type of the trainer's command-line completion (:class:`TrainArgError`)."""

from __future__ import annotations

__all__ = ["TrainArgError", "drop_flag", "flag_value", "flag_values", "has_flag", "int_flag"]


class TrainArgError(ValueError):
    """A command line that cannot describe a run (message says why)."""


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``; last one wins), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def flag_values(argv: list[str], flag: str) -> list[str] | None:
    """The values of a ``nargs='*'`` flag (up to the next ``--option``), or None if absent."""
    values = None
    for i, a in enumerate(argv):
        if a == flag:
            values = []
            for b in argv[i + 1:]:
                if b.startswith("--"):
                    break
                values.append(b)
        elif a.startswith(flag + "="):
            values = [a.split("=", 1)[1]]
    return values


def has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def drop_flag(argv: list[str], flag: str, *, takes_value: bool = True) -> list[str]:
    """``argv`` without any ``--flag [V]`` / ``--flag=V``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def int_flag(argv: list[str], flag: str, default: int) -> int:
    value = flag_value(argv, flag)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise TrainArgError(f"{flag} {value!r} is not an integer") from None
