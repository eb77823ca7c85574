"""Load the JSON Schema files shipped with this package."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMA_FILES = (
    "event.schema.json",
    "item_update.schema.json",
    "forget.schema.json",
    "recommendations.schema.json",
    "deadletter.schema.json",
)


def load_schema(name: str) -> dict[str, Any]:
    """Return the parsed schema file ``name``, for example ``"event.schema.json"``.

    >>> load_schema("event.schema.json")["title"]
    'Storefront event'
    """
    if name not in SCHEMA_FILES:
        msg = f"unknown schema {name!r}; expected one of {', '.join(SCHEMA_FILES)}"
        raise ValueError(msg)
    text = resources.files("schemas").joinpath(name).read_bytes()
    schema: dict[str, Any] = orjson.loads(text)
    return schema


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """Return a validator for schema ``name`` that resolves references between the files.

    >>> validator("recommendations.schema.json").is_valid(
    ...     {"items": [], "computed_at": 0, "model_version": "v1"})
    True
    """
    registry: Registry[Any] = Registry().with_resources(
        (load_schema(file)["$id"], Resource.from_contents(load_schema(file)))
        for file in SCHEMA_FILES
    )
    return Draft202012Validator(
        load_schema(name),
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
