//! Logs: `tracing` events as text or JSON lines on stderr, filtered by a level or
//! `RUST_LOG` directives. The reconcile span carries the object's namespace and name,
//! so every line of a pass says which BenchCluster it is about.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Filter when neither `--log-level` nor `RUST_LOG` says otherwise.
pub const DEFAULT_FILTER: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (namespace, name).
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[source] tracing::subscriber::SetGlobalDefaultError),
}

/// The filter: `level` if given (a level such as `debug` or full `RUST_LOG`-style
/// directives), else `RUST_LOG`, else [`DEFAULT_FILTER`].
pub fn filter(level: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    let directives = match level {
        Some(level) => level.to_owned(),
        None => std::env::var(EnvFilter::DEFAULT_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_FILTER.to_owned()),
    };
    EnvFilter::try_new(&directives).map_err(|source| TelemetryError::Filter {
        filter: directives,
        source,
    })
}

/// A subscriber writing to `writer` in `format` through `filter`. Tests pass their own
/// writer to capture what the controller logs.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync + 'static>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Installs the process-wide subscriber on stderr.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), TelemetryError> {
    let subscriber = subscriber(format, filter(level)?, std::io::stderr);
    tracing::subscriber::set_global_default(subscriber).map_err(TelemetryError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_the_reconcile_span_fields() {
        let buffer = Buffer::default();
        let subscriber = subscriber(
            LogFormat::Json,
            filter(Some("info")).unwrap(),
            buffer.clone(),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("reconcile", namespace = "ns", benchcluster = "small");
            let _entered = span.enter();
            tracing::info!(domain = "ns-small-cp-0", "VM started");
            tracing::debug!("filtered out");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line = &lines[0];
        assert_eq!(line["fields"]["message"], "VM started");
        assert_eq!(line["span"]["namespace"], "ns");
        assert_eq!(line["span"]["benchcluster"], "small");
        assert_eq!(line["span"]["name"], "reconcile");
    }

    #[test]
    fn a_bad_filter_is_an_error_not_a_silent_default() {
        assert!(filter(Some("info,=[")).is_err());
        assert!(filter(Some("debug,kube=warn")).is_ok());
    }
}
