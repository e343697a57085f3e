//! What of a failed command's output is shown in conditions and events: its last
//! lines, with anything shaped like a bootstrap token redacted.

use std::process::Output;

/// Lines of failing command output kept for conditions and events.
const OUTPUT_TAIL_LINES: usize = 12;

/// The last lines of stderr (else stdout), with bootstrap tokens redacted.
pub(super) fn shown_output(output: &Output) -> String {
    let stream = if output.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        &output.stderr
    } else {
        &output.stdout
    };
    let text = String::from_utf8_lossy(stream);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..].join("\n");
    redact_tokens(&tail)
}

/// Replaces anything shaped like a bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`).
pub fn redact_tokens(text: &str) -> String {
    let bytes = text.as_bytes();
    let token_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let candidate = i + 23 <= bytes.len()
            && (i == 0 || !token_char(bytes[i - 1]))
            && bytes[i..i + 6].iter().all(|b| token_char(*b))
            && bytes[i + 6] == b'.'
            && bytes[i + 7..i + 23].iter().all(|b| token_char(*b))
            && (i + 23 == bytes.len() || !token_char(bytes[i + 23]));
        if candidate {
            out.push_str("<redacted-token>");
            i += 23;
        } else {
            let ch = text[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(ch);
            i += ch.len_utf8().max(1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tokens_are_redacted_from_output() {
        let text = "[bootstrap-token] Using token: abcdef.0123456789abcdef\nnot-a-token: abcdefg.0123456789abcdef";
        let redacted = redact_tokens(text);
        assert!(!redacted.contains("abcdef.0123456789abcdef\n"));
        assert!(redacted.contains("Using token: <redacted-token>"));
        assert!(
            redacted.contains("abcdefg.0123456789abcdef"),
            "7-char prefix is no token"
        );
    }

    proptest! {
        #[test]
        fn redaction_never_panics_and_removes_tokens(prefix in "\\PC{0,20}", token in "[a-z0-9]{6}\\.[a-z0-9]{16}") {
            let text = format!("{prefix} {token} end");
            let redacted = redact_tokens(&text);
            prop_assert!(!redacted.contains(&token));
        }
    }
}
