//! W3C trace context (<https://www.w3.org/TR/trace-context/>): which `traceparent`
//! header values the filter and the companion take from a request and pass on to the
//! calls made for it, so those calls show in the caller's trace.
//!
//! The rule: `<version>-<trace-id>-<parent-id>-<flags>`, in lower-case hex of 2, 32,
//! 16 and 2 digits; the version is not `ff`; neither id is all zeros. Version `00` has
//! exactly these four fields (55 characters). A later version may append fields after a
//! `-`; only the four known fields are kept and passed on. Anything else is not a trace
//! context: it is ignored and never passed on. The value is ids and flags only, so no
//! secret or token can travel in it.

/// The header's name.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Length of the four known fields with their dashes.
const KNOWN_FIELDS_LEN: usize = 2 + 1 + 32 + 1 + 16 + 1 + 2;

/// A valid `traceparent` value, reduced to its four known fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traceparent(String);

impl Traceparent {
    /// The trace context in header value `value`, if it is one (see the module rule).
    pub fn parse(value: &str) -> Option<Traceparent> {
        let (known, rest) = value.split_at_checked(KNOWN_FIELDS_LEN)?;
        let mut fields = known.split('-');
        let (version, trace_id, parent_id, flags) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let later_fields_fit = if version == "00" {
            rest.is_empty()
        } else {
            rest.is_empty() || rest.starts_with('-')
        };
        let valid = fields.next().is_none()
            && hex(version, 2)
            && version != "ff"
            && hex(trace_id, 32)
            && !zeros(trace_id)
            && hex(parent_id, 16)
            && !zeros(parent_id)
            && hex(flags, 2)
            && later_fields_fit;
        valid.then(|| Traceparent(known.to_owned()))
    }

    /// The value to send.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trace id (32 hex digits), to name the trace in log lines.
    pub fn trace_id(&self) -> &str {
        self.0.get(3..35).unwrap_or_default()
    }
}

fn hex(field: &str, len: usize) -> bool {
    field.len() == len
        && field
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn zeros(field: &str) -> bool {
    field.bytes().all(|b| b == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_value_is_kept_as_is_with_its_trace_id() {
        let traceparent = Traceparent::parse(VALID).unwrap();
        assert_eq!(traceparent.as_str(), VALID);
        assert_eq!(traceparent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(Traceparent::parse(unsampled).is_some());
    }

    #[test]
    fn a_later_version_keeps_only_its_four_known_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(
            Traceparent::parse(later).unwrap().as_str(),
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let bare_later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(Traceparent::parse(bare_later).is_some());
    }

    #[test]
    fn anything_else_is_not_a_trace_context() {
        for bad in [
            "",
            "garbage",
            // Bad lengths.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Upper-case or non-hex digits.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0G",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // The forbidden version.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Version 00 with more fields, or anything after the flags but a dash.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            // Separators elsewhere than the spec's.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Traceparent::parse(bad), None, "{bad:?}");
        }
    }
}
