"""A small JSON Schema validator: the subset of draft 2020-12 that ``bench_schema.json`` uses, so validating a
report needs no extra dependency.

Supported keywords: ``type`` (one or a list), ``properties``, ``required``, ``additionalProperties`` (boolean),
``items``, ``minItems``, ``enum``, ``const``, ``minimum``, ``exclusiveMinimum``, ``minLength``, ``oneOf``; the
annotations ``$schema``, ``title``, ``description`` are ignored. Any other keyword raises ValueError, so a schema
never passes by being misread.
"""

from __future__ import annotations

from typing import Any

_ANNOTATIONS = {"$schema", "title", "description"}
_SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "enum", "const",
              "minimum", "exclusiveMinimum", "minLength", "oneOf"} | _ANNOTATIONS


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown JSON Schema type {name!r}")


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: ``True`` is not ``1``."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def validate(instance: Any, schema: dict, path: str = "$") -> list[str]:
    """Every violation of ``schema`` by ``instance``, as ``"<json path>: <problem>"`` strings (empty: valid)."""
    unknown = set(schema) - _SUPPORTED
    if unknown:
        raise ValueError(f"schema at {path} uses unsupported keywords: {', '.join(sorted(unknown))}")
    if not isinstance(schema.get("additionalProperties", True), bool):
        raise ValueError(f"schema at {path}: only a boolean additionalProperties is supported")
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__} {instance!r:.60}"]
    if "const" in schema and not _equal(instance, schema["const"]):
        errors.append(f"{path}: expected {schema['const']!r}, got {instance!r:.60}")
    if "enum" in schema and not any(_equal(instance, e) for e in schema["enum"]):
        errors.append(f"{path}: {instance!r:.60} is not one of {schema['enum']!r}")
    if _is_type(instance, "number"):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} is below the minimum {schema['minimum']}")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {instance} must be greater than {schema['exclusiveMinimum']}")
    if isinstance(instance, str) and "minLength" in schema and len(instance) < schema["minLength"]:
        errors.append(f"{path}: string shorter than {schema['minLength']}")
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in instance:
                errors.append(f"{path}: missing required property {name!r}")
        for name, value in instance.items():
            if name in properties:
                errors += validate(value, properties[name], f"{path}.{name}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: unexpected property {name!r}")
    if "oneOf" in schema:
        passing = [not validate(instance, option, path) for option in schema["oneOf"]]
        if sum(passing) != 1:
            details = [e for option in schema["oneOf"] for e in validate(instance, option, path)]
            errors.append(f"{path}: matches {sum(passing)} of the oneOf alternatives, expected exactly 1"
                          + (f" ({'; '.join(details[:3])})" if details else ""))
    return errors
