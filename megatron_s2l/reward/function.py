"""Your own reward (reward.kind=function): a Python function named in the config as "module:callable".

It is called once per response as `fn(completion: str, gold: str) -> float`, in the same scoring processes and
under the same per-item deadline as math-verify, so a call that hangs is killed and scored 0 like a sympy spin.
Per response rather than per batch for that reason: a deadline can then cost one response, not a whole batch.
The return value is the reward as it is (reward.scale is for kind=math only); it must be a finite number.

Workers are spawned and import the function by its name, so its module must be importable by every process
of the run (the trainer checks it at start-up, in its own process, before anything is trained).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from typing import Callable

from megatron_s2l.config import ConfigError


class RewardFunctionError(ValueError):
    """The reward function raised, or returned something that is not a reward; the message names it."""


def load_reward_function(name: str) -> Callable[[str, str], float]:
    """The callable that `name` ("module:callable") names; a ConfigError naming reward.function if unusable."""
    where = f"reward.function={name!r}"
    module_name, _, attribute = name.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(f"{where}: there is no module {module_name!r} on this Python's path; put the "
                              "directory that holds it on PYTHONPATH (e.g. `PYTHONPATH=$PWD s2l train ...`) or "
                              "install it as a package") from err
        raise ConfigError(f"{where}: importing {module_name!r} failed: {err}; install what it needs") from err
    except Exception as err:
        raise ConfigError(f"{where}: importing {module_name!r} failed ({type(err).__name__}: {err}); fix the "
                          f"module so that `python -c 'import {module_name}'` works") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: module {module_name!r} ({getattr(target, '__file__', '?')}) has no "
                              f"{attribute!r}; check the name after the colon")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where} is a {type(target).__name__}, not a function; name a function "
                          "fn(completion: str, gold: str) -> float")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have none: the first call will tell
        return target
    try:
        signature.bind("completion", "gold")
    except TypeError:
        raise ConfigError(f"{where} takes {signature}; it is called as fn(completion, gold) once per response, "
                          "so it must accept two positional arguments") from None
    return target


_loaded = functools.cache(load_reward_function)  # each worker imports the function once


def call_reward_function(name: str, completion: str, gold: str) -> tuple[float, bool]:
    """(reward, timed_out=False) of one response; runs in a scoring worker (or in process, num_workers=0)."""
    function = _loaded(name)
    try:
        value = function(completion, gold)
    except Exception as err:
        raise RewardFunctionError(f"reward.function={name!r} raised {type(err).__name__}: {err} (gold {gold!r}, "
                                  f"response ending {completion[-80:]!r}); it must return a number for every "
                                  "response: 0.0 for a wrong or unreadable one") from err
    return _checked(name, value), False


def _checked(name: str, value: object) -> float:
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    if isinstance(value, numbers.Real):
        fix = "return a finite number"
    elif isinstance(value, (list, tuple)):
        fix = "it is called once per response: return one float, not a list"
    else:
        fix = "return a float such as 1.0"
    raise RewardFunctionError(f"reward.function={name!r} returned {value!r} ({type(value).__name__}), which is "
                              f"not a reward; {fix}")
