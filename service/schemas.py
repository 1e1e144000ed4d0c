"""Request and response shapes (msgspec Structs): what the OpenAPI document shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import msgspec
from litestar.dto import MsgspecDTO
from litestar.params import PathParameter

from service.errors import ProblemException

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.openapi.spec import Reference, Schema
    from litestar.typing import FieldDefinition

INT4_MAX = 2_147_483_647
FLOAT8_MAX = 1.7976931348623157e308

ItemId = Annotated[int, msgspec.Meta(ge=1, le=INT4_MAX, description="Row id, 1..2147483647.")]
# The bounds reject Infinity and NaN, which JSON cannot carry and a float column should not hold.
FiniteFloat = Annotated[float, msgspec.Meta(ge=-FLOAT8_MAX, le=FLOAT8_MAX)]
ItemName = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]

# The path parameter of /items/{item_id}: the bounds of the id column, documented but not
# validated, so that an id out of them is a 404 like any other missing row.
PathItemId = Annotated[
    int,
    PathParameter(
        description=f"Row id; ids outside 1..{INT4_MAX} name no row.",
        schema_extra={"minimum": 1, "maximum": INT4_MAX},
    ),
]


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

    title: Annotated[str, msgspec.Meta(description="The HTTP status's reason phrase.")]
    status: Annotated[int, msgspec.Meta(description="The HTTP status code, repeated.")]
    detail: Annotated[str, msgspec.Meta(description="What went wrong, for a person to read.")]
    type: Annotated[
        str, msgspec.Meta(description="Always about:blank: the status says what kind it is.")
    ] = "about:blank"
    errors: Annotated[
        list[dict[str, Any]] | None,
        msgspec.Meta(
            description="Where the request is wrong: each with a message, and where known the"
            " source (query, path or body) and key (the parameter, or a JSON path in the body)."
        ),
    ] = None
    missing_ids: Annotated[
        list[int] | None, msgspec.Meta(description="PATCH /items: the ids that do not exist.")
    ] = None


class _StrictJSONBody:
    """A request body decoded once, strictly: "5" is not an id and "1.5" is not a value.

    Mixed into a DTO because Litestar then hands the raw body to `decode_bytes` and validates
    nothing itself, while the OpenAPI document still shows the body's schema. (A plain `data`
    parameter is parsed leniently by Litestar, so it would have to be decoded a second time.)
    """

    decoder: ClassVar[msgspec.json.Decoder[Any]]

    def decode_bytes(self, value: bytes) -> Any:
        try:
            return self.decoder.decode(value)
        except msgspec.ValidationError as exc:
            raise ProblemException(
                422,
                f"the request body is invalid: {exc}",
                errors=[{"message": str(exc), "source": "body"}],
            ) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            raise ProblemException(400, "the request body is not valid JSON") from None

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        """The body's own schema (components NewItem, ValueUpdate), not a DTO transfer model."""
        return schema_creator.for_field_definition(field_definition)


class NewItemsBody(_StrictJSONBody, MsgspecDTO[NewItem]):
    """POST /items: a JSON array of new rows."""

    decoder = msgspec.json.Decoder(list[NewItem], strict=True)


class ValueUpdatesBody(_StrictJSONBody, MsgspecDTO[ValueUpdate]):
    """PATCH /items: a JSON array of {id, value}."""

    decoder = msgspec.json.Decoder(list[ValueUpdate], strict=True)
