//! Helpers shared by tokengate's fuzz targets (`fuzz_targets/`, run by `scripts/fuzz`).
//!
//! The targets check more than "no panic". Where a parsed document carries a secret
//! (a client secret, a token, the companion's API key), a target also parses a copy with
//! a known marker planted in that field ([`plant_secret`]) and checks that no error
//! message and no `Debug` output repeats it ([`assert_hidden`]).

use arbitrary::{Arbitrary, Unstructured};
use serde_json::Value;
use std::fmt;

/// One fuzzed HTTP answer, as a driver hands it to the core.
#[derive(Debug, Arbitrary)]
pub struct Response<'a> {
    /// The status code.
    pub status: u16,
    /// The `Retry-After` header in seconds (the drivers parse it as a `u64`).
    pub retry_after_secs: Option<u64>,
    /// The body.
    pub body: Body<'a>,
}

/// A fuzzed HTTP body: the raw bytes, shown as text in a crash report.
#[derive(Clone, Copy)]
pub struct Body<'a>(pub &'a [u8]);

impl<'a> Arbitrary<'a> for Body<'a> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        <&'a [u8]>::arbitrary(u).map(Body)
    }

    fn arbitrary_take_rest(u: Unstructured<'a>) -> arbitrary::Result<Self> {
        <&'a [u8]>::arbitrary_take_rest(u).map(Body)
    }

    fn size_hint(depth: usize) -> (usize, Option<usize>) {
        <&'a [u8]>::size_hint(depth)
    }
}

impl fmt::Debug for Body<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.0))
    }
}

/// The marker planted where a document carries a secret.
pub const SECRET: &str = "planted-secret-6d1f0c9a";

/// `document` re-serialized with every field named by `pointers` (JSON pointers such as
/// `/companion/apiKey`) that is present set to [`SECRET`].
///
/// `None` when the document is not JSON, has none of the fields, or holds the marker
/// elsewhere too (an echo of it would then prove nothing).
pub fn plant_secret(document: &[u8], pointers: &[&str]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(document).ok()?;
    let mut planted = 0;
    for pointer in pointers {
        if let Some(field) = value.pointer_mut(pointer) {
            *field = Value::String(SECRET.to_owned());
            planted += 1;
        }
    }
    let planted_document = serde_json::to_vec(&value).ok()?;
    (planted > 0 && occurrences(&planted_document) == planted).then_some(planted_document)
}

/// Whether fuzzed `bytes` hold the marker already (the fuzzer learns it from the
/// comparisons in [`assert_hidden`]): an echo of such input proves nothing.
pub fn holds_secret(bytes: &[u8]) -> bool {
    occurrences(bytes) > 0
}

fn occurrences(bytes: &[u8]) -> usize {
    bytes
        .windows(SECRET.len())
        .filter(|window| *window == SECRET.as_bytes())
        .count()
}

/// Fails when `text` (described by `what`) repeats the planted secret.
pub fn assert_hidden(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} repeats a secret: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_replaces_present_fields_only() {
        let planted = plant_secret(br#"{"a":{"b":1},"c":2}"#, &["/a/b", "/x"]).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&planted).unwrap(),
            serde_json::json!({"a":{"b":SECRET},"c":2})
        );
        assert_eq!(plant_secret(br#"{"c":2}"#, &["/a/b"]), None);
        assert_eq!(plant_secret(b"not json", &["/a"]), None);
    }

    #[test]
    fn a_document_already_holding_the_marker_is_not_planted() {
        let document = format!(r#"{{"a":1,"b":"{SECRET}"}}"#);
        assert_eq!(plant_secret(document.as_bytes(), &["/a"]), None);
    }
}
