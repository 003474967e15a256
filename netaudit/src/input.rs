//! Reading what the user hands us (inventories, policies, values, matrices): YAML or JSON, one
//! document, a multi-document stream, or a `List`. Every error names the file, the document
//! (kind, namespace/name) and the field: an [`InputError`].

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{FieldError, InputError};

/// One object read from a file, with where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    /// `file`, `file: document 3` or `file: document 2, items[5]`: for messages.
    pub origin: String,
    pub value: Value,
}

impl Document {
    pub fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or("")
    }

    pub fn api_version(&self) -> &str {
        self.value.get("apiVersion").and_then(Value::as_str).unwrap_or("")
    }

    /// `Kind namespace/name` (or `Kind name`) for messages.
    pub fn describe(&self) -> String {
        let meta = self.value.get("metadata");
        let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
        match (get("namespace"), get("name")) {
            (Some(ns), Some(n)) => format!("{} {ns}/{n}", self.kind()),
            (None, Some(n)) => format!("{} {n}", self.kind()),
            _ => self.kind().to_string(),
        }
    }

    /// Deserializes the document into `T`, naming the field on error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, InputError> {
        from_value(&self.value).map_err(|e| self.error(e))
    }

    /// `e` placed in this document: file, object, field.
    pub fn error(&self, e: FieldError) -> InputError {
        InputError::at(&self.origin, Some(self.describe()), e)
    }
}

/// Deserializes a JSON value into `T`; the error names the field path (`spec.ingress[0].ports`).
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." { FieldError::whole(inner) } else { FieldError::new(path, inner) }
    })
}

/// Reads a YAML or JSON file into its top-level values (documents), unflattened.
pub fn read_values(path: &Path) -> Result<Vec<Value>, InputError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| InputError::new(&origin, format!("cannot read: {e}")))?;
    parse_values(&text).map_err(|e| InputError::at(origin, None, e))
}

/// Parses YAML (one or more documents) or JSON text.
pub fn parse_values(text: &str) -> Result<Vec<Value>, FieldError> {
    let trimmed = text.trim_start();
    let looks_json = trimmed.starts_with('{') || trimmed.starts_with('[');
    let json_err = if looks_json {
        // JSON is YAML too, but serde_json gives exact positions for JSON's own mistakes.
        match serde_json::from_str::<Value>(text) {
            Ok(v) => return Ok(vec![v]),
            Err(e) => Some(e),
        }
    } else {
        None
    };
    // Flow-style YAML (`{a: b}`) also starts with a brace: try YAML before giving up.
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        FieldError::whole(match &json_err {
            Some(j) => format!("invalid JSON ({j}) and invalid YAML ({e})"),
            None => format!("invalid YAML: {e}"),
        })
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Reads a file of Kubernetes objects: a single object, a multi-document stream, a JSON array, or
/// a `List` (what `kubectl get … -o yaml` prints). Lists are flattened; items of typed lists
/// (`PodList`) get their kind from the list.
pub fn read_objects(path: &Path) -> Result<Vec<Document>, InputError> {
    let file = path.display().to_string();
    let mut out = Vec::new();
    let values = read_values(path)?;
    let many = values.len() > 1;
    for (i, value) in values.into_iter().enumerate() {
        let origin = if many { format!("{file}: document {}", i + 1) } else { file.clone() };
        flatten(value, origin, &mut out)?;
    }
    Ok(out)
}

fn flatten(value: Value, origin: String, out: &mut Vec<Document>) -> Result<(), InputError> {
    let items = match value {
        Value::Array(items) => Some((items, None)),
        Value::Object(mut map) => {
            let kind = map.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
            if kind.ends_with("List") && map.contains_key("items") {
                let api_version = map.get("apiVersion").cloned();
                let items = match map.remove("items") {
                    Some(Value::Array(items)) => items,
                    Some(Value::Null) => Vec::new(),
                    _ => return Err(InputError::new(origin, format!("`items` of a {kind} must be a list"))),
                };
                let item_kind = (kind != "List").then(|| kind.trim_end_matches("List").to_string());
                Some((items, item_kind.map(|k| (k, api_version))))
            } else {
                out.push(Document { origin: origin.clone(), value: Value::Object(map) });
                None
            }
        }
        Value::Null => None,
        other => {
            return Err(InputError::new(
                origin,
                format!(
                    "expected a Kubernetes object (a mapping with apiVersion and kind), found {}",
                    type_name(&other)
                ),
            ));
        }
    };
    if let Some((items, typed)) = items {
        for (j, mut item) in items.into_iter().enumerate() {
            if let (Some((kind, api_version)), Value::Object(m)) = (&typed, &mut item) {
                m.entry("kind").or_insert_with(|| Value::String(kind.clone()));
                if let Some(v) = api_version {
                    m.entry("apiVersion").or_insert_with(|| v.clone());
                }
            }
            flatten(item, format!("{origin}, items[{j}]"), out)?;
        }
    }
    Ok(())
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_streams_and_json_flatten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.yaml");
        std::fs::write(
            &p,
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n\
             - {apiVersion: v1, kind: PodList, items: [{metadata: {name: p, namespace: a}}]}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .unwrap();
        let docs = read_objects(&p).unwrap();
        let kinds: Vec<_> = docs.iter().map(|d| d.describe()).collect();
        assert_eq!(kinds, ["Namespace a", "Pod a/p", "Namespace b"]);
        assert!(docs[1].origin.ends_with("document 1, items[1], items[0]"), "{}", docs[1].origin);
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, "kind: Pod\nmetadata:\n  name: [unclosed\n").unwrap();
        let msg = format!("{:#}", read_objects(&p).unwrap_err());
        assert!(msg.contains("bad.yaml") && msg.contains("invalid YAML"), "{msg}");
        let msg = format!("{:#}", read_objects(&dir.path().join("missing.yaml")).unwrap_err());
        assert!(msg.contains("missing.yaml: cannot read"), "{msg}");
    }
}
