"""peft: its closed `PeftType` enum, extended for unift's bottleneck-adapter plugin. Written against peft 0.21.2.

peft's `register_peft_method(name=...)` (peft/utils/peft_types.py) refuses any name whose upper case is not
already a member of `PeftType` ("Unknown PEFT type ..., please add an entry to peft.utils.peft_types.PeftType"),
and an Enum class cannot be subclassed or extended, so a third-party method cannot be registered as documented.
The member is added by hand. tests/test_compat.py fails once peft registers a new name without it.
"""

from __future__ import annotations

import contextlib
from typing import Any


def extend_peft_type(name: str) -> Any:
    """Add `name` to peft.utils.PeftType (idempotent) and return the member. It behaves like the built-in
    ones (a str equal to its value), so config files and peft's mapping lookups work unchanged."""
    from peft.utils import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    with contextlib.suppress(AttributeError):
        member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # PeftType.<name>, bypassing Enum's reassignment guard
    return member
