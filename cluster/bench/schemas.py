"""A set of JSON schemas of the kinds users send as response formats and tool parameters: flat and
nested objects, arrays with bounds, enums, consts, patterns, formats, optional fields, unions and
recursion. Used by the structured-output benchmarks and tests (each must compile, and every output
constrained by one must validate against it)."""

from __future__ import annotations

_STR = {"type": "string"}
_INT = {"type": "integer"}

SCHEMAS: dict[str, dict] = {
    "flat_required": {"type": "object", "properties": {"name": _STR, "age": _INT}, "required": ["name", "age"],
                      "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"title": _STR, "subtitle": _STR, "pages": _INT},
                        "required": ["title"], "additionalProperties": False},
    "all_optional": {"type": "object", "properties": {"a": _INT, "b": {"type": "boolean"}},
                     "additionalProperties": False},
    "enum_string": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                    "required": ["color"], "additionalProperties": False},
    "enum_mixed": {"type": "object", "properties": {"v": {"enum": [1, "two", None, True]}}, "required": ["v"],
                   "additionalProperties": False},
    "const": {"type": "object", "properties": {"kind": {"const": "event"}, "id": _INT}, "required": ["kind", "id"],
              "additionalProperties": False},
    "int_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 120}},
                   "required": ["n"], "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["x"], "additionalProperties": False},
    "string_length": {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 6}},
                      "required": ["code"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
                "required": ["sku"], "additionalProperties": False},
    "pattern_phone": {"type": "object", "properties": {
        "phone": {"type": "string", "pattern": "^\\+?[0-9]{2,3} [0-9]{3} [0-9]{4}$"}}, "required": ["phone"],
        "additionalProperties": False},
    "format_date": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                    "required": ["day"], "additionalProperties": False},
    "format_email": {"type": "object", "properties": {"to": {"type": "string", "format": "email"}},
                     "required": ["to"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": _STR, "minItems": 1,
                                                               "maxItems": 3}},
                     "required": ["tags"], "additionalProperties": False},
    "array_of_ints_exact": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                            "minItems": 4, "maxItems": 4},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": _STR, "qty": {"type": "integer", "minimum": 1}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
        "additionalProperties": False},
    "tuple_prefix_items": {"type": "array", "prefixItems": [_STR, _INT, {"type": "boolean"}], "items": False},
    "nested_object": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": _INT, "address": {"type": "object", "properties": {"city": _STR, "zip": {"type": "string",
                                                                                       "pattern": "^[0-9]{5}$"}},
                                "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["id", "address"], "additionalProperties": False}}, "required": ["user"],
        "additionalProperties": False},
    "deep_nesting": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": {"type": "object", "properties": {"d": _INT}, "required": ["d"],
                                               "additionalProperties": False}},
        "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
        "required": ["a"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [_INT, {"type": "string", "maxLength": 5}]}},
               "required": ["value"], "additionalProperties": False},
    "one_of_objects": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}},
         "required": ["kind", "side"], "additionalProperties": False}]},
    "nullable": {"type": "object", "properties": {"note": {"type": ["string", "null"]}}, "required": ["note"],
                 "additionalProperties": False},
    "boolean_flags": {"type": "object", "properties": {"ok": {"type": "boolean"}, "retry": {"type": "boolean"}},
                      "required": ["ok", "retry"], "additionalProperties": False},
    "refs_defs": {"$defs": {"point": {"type": "object", "properties": {"x": _INT, "y": _INT}, "required": ["x", "y"],
                                      "additionalProperties": False}},
                  "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
                  "required": ["from", "to"], "additionalProperties": False},
    "recursive_tree": {"$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 8},
        "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}},
        "required": ["label"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "recursive_list": {"$defs": {"cell": {"type": "object", "properties": {
        "v": _INT, "next": {"anyOf": [{"$ref": "#/$defs/cell"}, {"type": "null"}]}}, "required": ["v", "next"],
        "additionalProperties": False}}, "$ref": "#/$defs/cell"},
    "additional_props_typed": {"type": "object", "additionalProperties": _INT, "maxProperties": 3},
    "free_object": {"type": "object"},
    "top_level_string_enum": {"enum": ["yes", "no", "maybe"]},
    "top_level_integer": {"type": "integer", "minimum": 0, "maximum": 1000},
    "weather_tool": {"type": "object", "properties": {
        "location": {"type": "string", "description": "City and country"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"],
        "additionalProperties": False},
    "strict_openai_style": {"type": "object", "properties": {
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "explanation": _STR, "output": _STR}, "required": ["explanation", "output"],
            "additionalProperties": False}},
        "final_answer": _STR}, "required": ["steps", "final_answer"], "additionalProperties": False},
    "unique_union_types": {"type": "object", "properties": {"id": {"type": ["integer", "string"]}},
                           "required": ["id"], "additionalProperties": False},
    "many_properties": {"type": "object", "properties": {f"f{i}": _INT for i in range(8)},
                        "required": [f"f{i}" for i in range(8)], "additionalProperties": False},
}
