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
        self.text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// The lines holding `part`, for failure messages.
    pub fn matching(&self, part: &str) -> String {
        self.text()
            .lines()
            .filter(|l| l.contains(part))
            .collect::<Vec<_>>()
            .join("\n")
    }
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
}
