//! A log capture: a `tracing_subscriber` writer that keeps what the controller logged,
//! so a test can check it afterwards (no secret in it, no reset, one `kubeadm init`),
//! and optionally shows it on stderr as it comes.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

/// Everything written to it, shared by its clones.
#[derive(Clone, Default)]
pub struct LogCapture {
    bytes: Arc<Mutex<Vec<u8>>>,
    /// Also write each line to stderr (the test's output).
    echo: bool,
}

impl LogCapture {
    /// A capture that also shows what it keeps on stderr.
    pub fn echoing() -> Self {
        Self {
            echo: true,
            ..Self::default()
        }
    }

    /// What was written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// Lines holding every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        count_lines(&self.text(), parts)
    }

    /// The lines holding `part`, for failure messages.
    pub fn matching(&self, part: &str) -> String {
        matching_lines(&self.text(), part)
    }
}

fn count_lines(text: &str, parts: &[&str]) -> usize {
    text.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

fn matching_lines(text: &str, part: &str) -> String {
    text.lines()
        .filter(|l| l.contains(part))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The controller's log: captured in this process, or the file a controller process
/// writes (`cargo xtask up`'s), read anew at every look.
#[derive(Clone)]
pub enum ControllerLog {
    Captured(LogCapture),
    File(std::path::PathBuf),
}

impl ControllerLog {
    /// What was logged so far, without terminal colour codes.
    pub fn text(&self) -> String {
        match self {
            Self::Captured(capture) => capture.text(),
            Self::File(path) => strip_ansi(&String::from_utf8_lossy(
                &std::fs::read(path).unwrap_or_default(),
            )),
        }
    }

    /// Lines holding every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        count_lines(&self.text(), parts)
    }

    /// The lines holding `part`, for failure messages.
    pub fn matching(&self, part: &str) -> String {
        matching_lines(&self.text(), part)
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.echo {
            eprint!("{}", String::from_utf8_lossy(buf));
        }
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lines_are_counted_by_all_their_parts() {
        let mut capture = LogCapture::default();
        let mut clone = capture.clone();
        writeln!(clone, "started node=a operation=\"kubeadm init\"").unwrap();
        writeln!(capture, "started node=b operation=\"kubeadm join\"").unwrap();
        assert_eq!(capture.count(&["started"]), 2);
        assert_eq!(capture.count(&["started", "kubeadm init"]), 1);
        assert_eq!(capture.count(&["resetting"]), 0);
        assert_eq!(
            capture.matching("join"),
            "started node=b operation=\"kubeadm join\""
        );
    }

    #[test]
    fn colour_codes_are_stripped() {
        let line = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[3moperation\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"kubeadm init\"";
        assert_eq!(strip_ansi(line), "2026  INFO operation=\"kubeadm init\"");
    }
}
