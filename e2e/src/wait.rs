//! Polling with a deadline: the only way tests here wait for anything.

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use tokio::time::Instant;

/// What one poll attempt may return: `Option<T>` (not yet / done) or
/// `Result<Option<T>, E>` (an error counts as "not yet" and is reported on timeout).
pub trait PollOutcome<T> {
    /// `Ok(Some(v))` when the wait is over, `Ok(None)` or `Err` to poll again.
    fn into_outcome(self) -> anyhow::Result<Option<T>>;
}

impl<T> PollOutcome<T> for Option<T> {
    fn into_outcome(self) -> anyhow::Result<Option<T>> {
        Ok(self)
    }
}

impl<T, E: Into<anyhow::Error>> PollOutcome<T> for Result<Option<T>, E> {
    fn into_outcome(self) -> anyhow::Result<Option<T>> {
        self.map_err(Into::into)
    }
}

/// Calls `f` every `poll` until it yields `Some(value)`, and returns that value.
///
/// Errors returned by `f` are treated as transient (the thing waited for may not exist
/// yet); the last one is quoted in the timeout error, which names `what`. An attempt
/// still running at the deadline is abandoned, so this never overruns `deadline` by
/// more than one `poll`.
pub async fn until<F, Fut, O, T>(
    what: &str,
    deadline: Duration,
    poll: Duration,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
    O: PollOutcome<T>,
{
    let start = Instant::now();
    let end = start + deadline;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last_error = match tokio::time::timeout_at(end, f()).await {
            Ok(outcome) => match outcome.into_outcome() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => None,
                Err(error) => Some(error),
            },
            Err(_elapsed) => Some(anyhow!(
                "the last attempt was still running at the deadline"
            )),
        };
        let next = Instant::now() + poll;
        if next >= end {
            let waited = start.elapsed();
            return Err(match last_error {
                Some(error) => anyhow!(
                    "timed out after {waited:.1?} ({attempts} attempts) waiting for {what}; last error: {error:#}"
                ),
                None => {
                    anyhow!("timed out after {waited:.1?} ({attempts} attempts) waiting for {what}")
                }
            });
        }
        tokio::time::sleep_until(next).await;
    }
}

/// The time of day (UTC, `HH:MM:SS`), to stamp progress lines of long waits.
pub fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn returns_the_value_once_ready() {
        let calls = AtomicU32::new(0);
        let got = until(
            "the third call",
            Duration::from_secs(5),
            Duration::from_millis(10),
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move { (n >= 3).then_some(n) }
            },
        )
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_names_what_and_the_last_error() {
        let err = until::<_, _, _, ()>(
            "the moon to turn blue",
            Duration::from_millis(100),
            Duration::from_millis(10),
            || async { Err::<Option<()>, _>(anyhow!("still grey")) },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("the moon to turn blue"), "{err}");
        assert!(err.contains("still grey"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_hangs_does_not_overrun_the_deadline() {
        let start = Instant::now();
        let err = until::<_, _, _, ()>(
            "a hanging call",
            Duration::from_secs(1),
            Duration::from_millis(10),
            std::future::pending::<Option<()>>,
        )
        .await
        .unwrap_err();
        assert!(start.elapsed() <= Duration::from_millis(1_100), "{err}");
        assert!(err.to_string().contains("still running"), "{err}");
    }
}
