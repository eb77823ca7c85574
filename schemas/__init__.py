"""The event and output contracts of fusionrec.

The ``*.schema.json`` files are the contract; this package decodes and
validates messages by the same rules and builds the values written to Redis.
"""

from schemas.events import (
    EVENT_TYPES,
    MAX_ID_LENGTH,
    MAX_MESSAGE_BYTES,
    Event,
    ForgetRequest,
    ItemUpdate,
    SchemaError,
    decode_event,
    decode_forget,
    decode_item_update,
    event_from_object,
    parse_object,
    parse_timestamp,
)
from schemas.files import load_schema, validator
from schemas.recommendations import RecommendationList, RecommendedItem

__all__ = [
    "EVENT_TYPES",
    "MAX_ID_LENGTH",
    "MAX_MESSAGE_BYTES",
    "Event",
    "ForgetRequest",
    "ItemUpdate",
    "RecommendationList",
    "RecommendedItem",
    "SchemaError",
    "decode_event",
    "decode_forget",
    "decode_item_update",
    "event_from_object",
    "load_schema",
    "parse_object",
    "parse_timestamp",
    "validator",
]
