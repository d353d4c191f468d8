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

#[test]
fn a_refused_array_is_named_itself_not_its_first_element() {
    // `[[]]` was refused at '[0][0]', an element that does not exist: a syntax error's
    // position takes in the `[` that opens the refused value.
    for (document, path) in [
        // Not an object at all: the document itself.
        ("[[]]", "."),
        (r#"{"mode":["inject"]}"#, "mode"),
        (r#"{"genesys":{"loginHosts":[]}}"#, "genesys.loginHosts"),
        (r#"{"purge":{"statuses":[[]]}}"#, "purge.statuses[0]"),
        (r#"{"purge":{"statuses":[401, "x"]}}"#, "purge.statuses[1]"),
    ] {
        let error = FilterConfig::parse(document.as_bytes()).unwrap_err();
        assert_eq!(error.path, path, "{document}: {error}");
    }
}
