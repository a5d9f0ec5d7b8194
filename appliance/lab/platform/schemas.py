"""Request validation against the protocol's OpenAPI document.

The reference platform validates every request body with the very schemas of
``docs/openapi.yaml`` (``openapi.yaml`` beside this module links to it), so that
the document and the platform cannot drift apart.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI_URI = "urn:vsa:openapi"
_HERE = Path(__file__).resolve().parent
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
PATH_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def openapi_path() -> Path:
    """Where the OpenAPI document is: beside this module, else the repository's docs/."""
    for candidate in (_HERE / "openapi.yaml", _HERE.parents[2] / "docs" / "openapi.yaml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("docs/openapi.yaml is missing")


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The parsed OpenAPI document."""
    with openapi_path().open(encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    assert isinstance(doc, dict)
    return doc


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    """A JSON Schema 2020-12 validator of ``components/schemas/<schema_name>``."""
    doc = openapi_document()
    if schema_name not in doc["components"]["schemas"]:
        raise KeyError(schema_name)
    registry: Registry = Registry().with_resource(
        OPENAPI_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"{OPENAPI_URI}#/components/schemas/{schema_name}"}, registry=registry
    )


def schema_errors(schema_name: str, value: Any) -> str | None:
    """None when ``value`` matches the schema, else words naming the first problem and where."""
    best = None
    for error in validator(schema_name).iter_errors(value):
        if best is None or len(error.absolute_path) > len(best.absolute_path):
            best = error
    if best is None:
        return None
    where = "/".join(str(p) for p in best.absolute_path) or "(body)"
    return f"{where}: {_describe(best)}"[:500]


def _describe(error: Any) -> str:
    """Words for a schema error that never quote the offending value (it may be a secret)."""
    kind, expected = error.validator, error.validator_value
    if kind == "required":
        return error.message  # names the missing field only
    if kind == "type":
        return f"must be of type {expected}"
    if kind == "pattern":
        return f"does not match the pattern {expected}"
    if kind == "enum":
        return "must be one of " + ", ".join(str(v) for v in expected)
    if kind in ("minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems"):
        return f"violates {kind} {expected}"
    if kind in ("anyOf", "oneOf"):
        return "matches none of the allowed forms"
    return f"fails the {kind} rule"


def is_host_key(value: str) -> bool:
    """A host key is an EC2 instance ID or an IP address (PROTOCOL.md, PUT hosts)."""
    if INSTANCE_ID_RE.match(value):
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
