"""The RolloutEngine contract as the engines' tests check it: each engine's test module maps every member
of the Protocol to a check that calls it, so a member added to the Protocol without a check fails there."""

from __future__ import annotations

import inspect

from typing_extensions import get_protocol_members

from megatron_s2l.rollout.types import RolloutEngine

PROTOCOL_MEMBERS = sorted(get_protocol_members(RolloutEngine))


def assert_checks_cover_the_protocol(checks: dict) -> None:
    """The checks are exactly the Protocol's members: none missing, none left over from a removed one."""
    assert sorted(checks) == PROTOCOL_MEMBERS, (
        f"RolloutEngine has {PROTOCOL_MEMBERS} but the contract checks cover {sorted(checks)}: add a check "
        "that calls each new member (and drop checks of removed ones)")


def assert_same_parameters(engine_type: type, member: str) -> None:
    """A method takes exactly the Protocol's parameters, so callers need not know which engine they hold.
    (Return types may be narrower: LocalEngine.weights_digest always has a digest.)"""
    if not inspect.iscoroutinefunction(getattr(RolloutEngine, member, None)):
        return  # a data member, such as `name` (annotated, so not an attribute of the Protocol class)
    expected = inspect.signature(getattr(RolloutEngine, member)).parameters
    got = inspect.signature(getattr(engine_type, member)).parameters
    assert list(got.values()) == list(expected.values()), (
        f"{engine_type.__name__}.{member}{inspect.signature(getattr(engine_type, member))} differs from "
        f"RolloutEngine.{member}{inspect.signature(getattr(RolloutEngine, member))}: give it the Protocol's "
        "parameters (engine-specific choices belong in the constructor)")
