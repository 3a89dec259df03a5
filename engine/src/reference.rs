//! The stage kinds' params as Markdown tables, generated from the same JSON Schema that
//! validates pipelines, so the README's reference cannot drift from what `smelt` accepts
//! (a test compares the two).

use serde_json::{Map, Value};

use crate::schema::pipeline_schema;
use crate::stage::{Ports, Registry};

/// One table row: a dotted param path and what the schema says about it.
struct Row {
    path: String,
    kind: String,
    default: String,
    doc: String,
}

/// Every stage kind: a heading, its summary and inputs, and a table of its params.
pub fn markdown(registry: &Registry) -> String {
    let schema = pipeline_schema(registry);
    let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
    let mut out = String::new();
    for kind in registry.kinds() {
        let name = kind.kind();
        out.push_str(&format!("#### `{name}`\n\n{}.\n\n", kind.summary()));
        if let Ports::Declared(ports) = kind.ports() {
            for port in &ports {
                let need = if port.required {
                    "required"
                } else {
                    "optional"
                };
                let many = if port.many { ", one or more" } else { "" };
                out.push_str(&format!(
                    "- input `{}` ({need}{many}): {}\n",
                    port.name, port.doc
                ));
            }
            if !ports.is_empty() {
                out.push('\n');
            }
        }
        let params = &defs[&format!("{name}.params")];
        let mut rows = Vec::new();
        object_rows(params, &defs, "", None, &mut rows);
        if rows.is_empty() {
            out.push_str("No params.\n\n");
            continue;
        }
        out.push_str("| param | type | default | meaning |\n|---|---|---|---|\n");
        for row in rows {
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                row.path, row.kind, row.default, row.doc
            ));
        }
        out.push('\n');
    }
    out
}

/// Rows for each property of an object schema; `defaults` is the object's own default value,
/// which supplies field defaults the fields do not state themselves.
fn object_rows(
    schema: &Value,
    defs: &Map<String, Value>,
    prefix: &str,
    defaults: Option<&Value>,
    rows: &mut Vec<Row>,
) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, property) in properties {
        let path = format!("{prefix}{name}");
        let inherited = defaults.and_then(|d| d.get(name));
        property_rows(
            property,
            defs,
            &path,
            required.contains(&name.as_str()),
            inherited,
            rows,
        );
    }
}

fn property_rows(
    property: &Value,
    defs: &Map<String, Value>,
    path: &str,
    required: bool,
    inherited: Option<&Value>,
    rows: &mut Vec<Row>,
) {
    let outer = property;
    let property = unwrap_interpolation(property);
    let target = resolve(property, defs);
    let doc = describe(outer)
        .or_else(|| describe(property))
        .or_else(|| describe(target));
    let default = outer
        .get("default")
        .or_else(|| property.get("default"))
        .or_else(|| target.get("default"))
        .or(inherited);
    if target["properties"].is_object() {
        if matches!(default, Some(Value::Null)) {
            // An optional block (such as `dedup.minhash`): off unless given.
            rows.push(Row {
                path: path.to_string(),
                kind: "map".into(),
                default: "off".into(),
                doc: doc.unwrap_or_default(),
            });
        }
        // A nested block such as `train`: one row per field.
        object_rows(target, defs, &format!("{path}."), default, rows);
        return;
    }
    let variant_rows =
        |variants: Vec<(String, &Value)>, kind: &str, nested: &str, rows: &mut Vec<Row>| {
            let tags: Vec<String> = variants.iter().map(|(tag, _)| format!("`{tag}`")).collect();
            rows.push(Row {
                path: path.to_string(),
                kind: format!("{kind} {}", tags.join(", ")),
                default: default_text(default, required),
                doc: doc.clone().unwrap_or_default(),
            });
            for (tag, body) in variants {
                object_rows(body, defs, &format!("{path}{nested}{tag}."), None, rows);
            }
        };
    if let Some(variants) = tagged_variants(target, defs) {
        // An externally tagged enum such as a source: `{ files: {...} }`.
        variant_rows(variants, "one of", ".", rows);
        return;
    }
    if target["type"] == "array" {
        let items = resolve(unwrap_interpolation(&target["items"]), defs);
        let non_empty = if target["minItems"] == 1 {
            "non-empty "
        } else {
            ""
        };
        if let Some(variants) = tagged_variants(items, defs) {
            // A list of them, such as `filters` or `metrics`.
            variant_rows(variants, &format!("{non_empty}list of"), "[].", rows);
            return;
        }
        rows.push(Row {
            path: path.to_string(),
            kind: format!("{non_empty}list of {}", type_text(items)),
            default: default_text(default, required),
            doc: doc.unwrap_or_default(),
        });
        return;
    }
    rows.push(Row {
        path: path.to_string(),
        kind: type_text(target),
        default: default_text(default, required),
        doc: doc.unwrap_or_default(),
    });
}

/// `anyOf: [X, ${vars.…}]` (how the pipeline schema lets scalars be variables) and
/// `anyOf: [X, null]` (an optional value) are just X here.
fn unwrap_interpolation(schema: &Value) -> &Value {
    match schema["anyOf"].as_array() {
        Some(options)
            if options.len() == 2 && (is_variable(&options[1]) || is_null(&options[1])) =>
        {
            unwrap_interpolation(&options[0])
        }
        _ => schema,
    }
}

fn is_variable(schema: &Value) -> bool {
    schema["$ref"] == "#/$defs/interpolation"
}

/// `null`, or (after the pipeline schema's rewrite) `null` or a variable.
fn is_null(schema: &Value) -> bool {
    schema["type"] == "null"
        || schema["anyOf"]
            .as_array()
            .is_some_and(|o| o.iter().all(|s| s["type"] == "null" || is_variable(s)))
}

fn resolve<'a>(schema: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    match schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        Some(name) => defs.get(name).map_or(schema, |d| resolve(d, defs)),
        None => schema,
    }
}

/// The variants of an externally tagged enum (`oneOf` objects with one required key), as
/// (tag, the variant's body schema).
fn tagged_variants<'a>(
    schema: &'a Value,
    defs: &'a Map<String, Value>,
) -> Option<Vec<(String, &'a Value)>> {
    let variants = schema["oneOf"].as_array()?;
    variants
        .iter()
        .map(|variant| {
            let properties = variant["properties"].as_object()?;
            let (tag, body) = properties.iter().next().filter(|_| properties.len() == 1)?;
            Some((tag.clone(), resolve(unwrap_interpolation(body), defs)))
        })
        .collect()
}

fn type_text(schema: &Value) -> String {
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .map(|v| format!("`{}`", v.as_str().map_or(v.to_string(), str::to_string)))
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let constants: Option<Vec<String>> = options
            .iter()
            .map(|o| {
                let single = o["enum"].as_array().filter(|e| e.len() == 1).map(|e| &e[0]);
                o["const"]
                    .as_str()
                    .or(single.and_then(Value::as_str))
                    .map(|c| format!("`{c}`"))
            })
            .collect();
        if let Some(constants) = constants {
            return constants.join(" \\| ");
        }
    }
    let name = |t: &Value| match t.as_str() {
        Some("integer") => "integer",
        Some("number") => "number",
        Some("boolean") => "bool",
        Some("string") => "string",
        Some("object") => "map",
        Some("array") => "list",
        _ => "",
    };
    let kind = match &schema["type"] {
        Value::Array(types) => {
            let named: Vec<&str> = types.iter().filter(|t| *t != "null").map(name).collect();
            named.join(" or ")
        }
        Value::Null if schema["additionalProperties"].is_object() => "map".into(),
        Value::Null => "any".into(),
        t => name(t).to_string(),
    };
    kind + &bounds_text(schema)
}

/// A number's range as the schema states it: ` ≥ 1`, ` > 0`, ` in [0, 1)`. An integer's
/// `minimum: 0` (how unsigned types are written) goes without saying.
fn bounds_text(schema: &Value) -> String {
    let bound = |closed: &str, open: &str| {
        let found = |key: &str| schema.get(key).filter(|v| v.is_number());
        found(closed)
            .map(|v| (true, v))
            .or_else(|| found(open).map(|v| (false, v)))
    };
    let integer = schema["type"] == "integer"
        || schema["type"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "integer"));
    let low = bound("minimum", "exclusiveMinimum")
        .filter(|(closed, v)| !(integer && *closed && v.as_f64() == Some(0.0)));
    let high = bound("maximum", "exclusiveMaximum");
    match (low, high) {
        (Some((low_closed, low)), Some((high_closed, high))) => {
            let open = if low_closed { "[" } else { "(" };
            let close = if high_closed { "]" } else { ")" };
            format!(" in {open}{low}, {high}{close}")
        }
        (Some((closed, low)), None) => format!(" {} {low}", if closed { "≥" } else { ">" }),
        (None, Some((closed, high))) => format!(" {} {high}", if closed { "≤" } else { "<" }),
        (None, None) => String::new(),
    }
}

fn default_text(default: Option<&Value>, required: bool) -> String {
    match default {
        _ if required => "required".into(),
        None | Some(Value::Null) => "—".into(),
        Some(Value::Number(n)) => format!("`{}`", short_number(n)),
        Some(Value::String(s)) => format!("`{s}`"),
        Some(v) => format!("`{}`", cell(&v.to_string())),
    }
}

/// `0.05000000074505806` (an f32 default widened) as `0.05`.
fn short_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() => {
            let short = format!("{}", f as f32);
            if short.parse::<f64>().is_ok() {
                short
            } else {
                n.to_string()
            }
        }
        _ => n.to_string(),
    }
}

fn describe(schema: &Value) -> Option<String> {
    schema["description"].as_str().map(cell)
}

/// Text fit for one table cell: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}
