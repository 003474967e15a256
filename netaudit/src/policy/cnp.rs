use super::Policy;
use crate::input::Document;
pub fn parse(doc: &Document) -> anyhow::Result<Policy> { Err(super::field_error(doc, "TODO")) }
