//! Inputs the `filter_config` fuzz target (`fuzz/`, run by `scripts/fuzz`) found
//! crashing, kept as tests of the behaviour they now get.

use tokengate::config::FilterConfig;

#[test]
fn an_unreadable_document_with_an_empty_key_names_the_document() {
    // The key "" was reported as an unknown field with the empty path: the log line
    // read "invalid tokengate configuration at '': ...".
    let error = FilterConfig::parse(br#"{""{eutMs":"soon"}}"#).unwrap_err();
    assert_eq!(error.path, ".", "{error}");
    assert!(error.problem.contains("unknown field ``"), "{error}");
}
