//! Small helpers shared across the crate. This module imports nothing of ours, so any
//! module can use it without forming an import cycle.

/// Any error and its causes on one line, `outer: cause: root cause`. A cause that an
/// error's own message already ends with (kube's finalizer errors print their source
/// and return it too) is not repeated.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
