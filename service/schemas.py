"""Request and response shapes (msgspec Structs): what the OpenAPI document shows."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

INT4_MAX = 2_147_483_647
FLOAT8_MAX = 1.7976931348623157e308

ItemId = Annotated[int, msgspec.Meta(ge=1, le=INT4_MAX, description="Row id, 1..2147483647.")]
# The bounds reject Infinity and NaN, which JSON cannot carry and a float column should not hold.
FiniteFloat = Annotated[float, msgspec.Meta(ge=-FLOAT8_MAX, le=FLOAT8_MAX)]
ItemName = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]


class Item(msgspec.Struct):
    """One row of playing_with_neon."""

    id: int
    name: str
    value: float


class ItemPage(msgspec.Struct):
    """A page of rows in id order; pass next_after_id as after_id to get the next page."""

    items: list[Item]
    next_after_id: int | None


class NewItem(msgspec.Struct, forbid_unknown_fields=True):
    """A row to insert; the database assigns its id."""

    name: ItemName
    value: FiniteFloat


class CreatedItems(msgspec.Struct):
    """The inserted rows, with their new ids, in the order they were sent."""

    items: list[Item]


class ValueUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """A new value for an existing row."""

    id: ItemId
    value: FiniteFloat


class UpdateResult(msgspec.Struct):
    """How many rows the batch changed."""

    updated: int


class Health(msgspec.Struct):
    """Probe answer."""

    status: str


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem document (served as application/problem+json)."""

    title: str
    status: int
    detail: str
    type: str = "about:blank"
    errors: list[dict[str, Any]] | None = None
    missing_ids: list[int] | None = None
