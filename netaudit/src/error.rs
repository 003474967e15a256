//! The library's errors. Everything a user hands netaudit (files, flags, objects from the API)
//! fails as an [`InputError`] naming the origin, the object and the field; failures of the
//! machine (a file that cannot be written) are the other variants of [`Error`]. The CLI exits 2
//! on every one of them.

use std::{fmt, path::PathBuf};

/// A field that is wrong, and why: what the dialect parsers and value checks return. The caller
/// that knows the file and the object turns it into an [`InputError`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// Where inside the object, as a path (`spec.egress[0].ports[1].port`); empty for the whole.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), message: message.into() }
    }

    /// An error about the whole value, not one field of it.
    pub fn whole(message: impl Into<String>) -> FieldError {
        FieldError::new("", message)
    }

    /// The same error inside `parent` (`parent.field`).
    pub fn within(mut self, parent: &str) -> FieldError {
        self.field = match (parent.is_empty(), self.field.is_empty()) {
            (true, _) => self.field,
            (false, true) => parent.to_string(),
            (false, false) if self.field.starts_with('[') => format!("{parent}{}", self.field),
            (false, false) => format!("{parent}.{}", self.field),
        };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.field, self.message) }
    }
}

/// An error in something the user gave netaudit. Displayed as
/// `origin (object): field: message`, the parts that are known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InputError {
    /// The file (and document, list item), the flag, or the API.
    pub origin: String,
    /// `Kind namespace/name` of the object, when the error is inside one.
    pub object: Option<String>,
    /// The field path inside the object or file.
    pub field: Option<String>,
    pub message: String,
}

impl InputError {
    /// An error about `origin` as a whole (a flag's value, a file that cannot be read).
    pub fn new(origin: impl Into<String>, message: impl Into<String>) -> InputError {
        InputError { origin: origin.into(), object: None, field: None, message: message.into() }
    }

    /// An error without a place (flags that do not fit together).
    pub fn usage(message: impl Into<String>) -> InputError {
        InputError::new("", message)
    }

    /// A field error placed in a file and, when known, an object.
    pub fn at(origin: impl Into<String>, object: Option<String>, e: FieldError) -> InputError {
        let field = (!e.field.is_empty()).then_some(e.field);
        InputError { origin: origin.into(), object, field, message: e.message }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if !self.origin.is_empty() {
            f.write_str(&self.origin)?;
            sep = ": ";
        }
        if let Some(o) = self.object.as_deref().filter(|o| !o.is_empty()) {
            write!(f, " ({o})")?;
            sep = ": ";
        }
        if let Some(field) = &self.field {
            write!(f, "{sep}{field}")?;
            sep = ": ";
        }
        write!(f, "{sep}{}", self.message)
    }
}

/// What the library's reading, judging and writing functions fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Input(#[from] InputError),
    /// A file the user asked for could not be written (full disk, permissions, a vanished
    /// directory): nothing was half-written, the old file is kept.
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing an artefact as YAML failed (a bug, not the user's input).
    #[error("writing {what} as YAML: {source}")]
    Yaml {
        what: &'static str,
        #[source]
        source: serde_saphyr::SerializeError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_is_known() {
        let e = FieldError::new("port", "70000 is not a port").within("spec.egress[0].ports[1]");
        assert_eq!(e.to_string(), "spec.egress[0].ports[1].port: 70000 is not a port");
        assert_eq!(FieldError::new("[2]", "x").within("items").field, "items[2]");
        let i = InputError::at("np.yaml: document 2", Some("NetworkPolicy a/b".into()), e);
        assert_eq!(
            i.to_string(),
            "np.yaml: document 2 (NetworkPolicy a/b): spec.egress[0].ports[1].port: 70000 is not a port"
        );
        assert_eq!(InputError::new("--output x", "is a directory").to_string(), "--output x: is a directory");
        assert_eq!(InputError::usage("give --flows").to_string(), "give --flows");
    }
}
