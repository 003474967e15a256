//! Value rules of the Kubernetes API that every reader shares (the inventory, every policy
//! dialect): port numbers, port names, protocol names — checked as the API server checks them.

use crate::{error::FieldError, model::Protocol};

/// Parses a Kubernetes protocol name (absent means TCP, as the API defaults it).
pub fn parse_protocol(p: Option<&str>) -> Result<Protocol, FieldError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => {
            Err(FieldError::whole(format!("`{other}` is not a protocol Kubernetes accepts (TCP, UDP or SCTP)")))
        }
    }
}

pub fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p > 0)
}

/// An IANA_SVC_NAME, as container port names must be: ≤ 15 chars, lowercase alphanumerics and
/// '-', at least one letter.
pub fn valid_port_name(s: &str) -> Result<String, FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(FieldError::whole(format!("`{s}` is neither a port number nor a valid port name")))
    }
}
