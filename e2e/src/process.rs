//! Child processes that cannot outlive the test process.
//!
//! `Drop` is not enough: a server kept in a `static` is never dropped, and a test binary
//! killed by a timeout or Ctrl-C runs no destructor at all. So each child runs under a
//! small bash watchdog that holds the read end of a pipe whose only write end is this
//! process's handle to the watchdog's stdin. When that end closes, because we dropped it
//! or because this process died however it died, the watchdog SIGKILLs the child, waits
//! for it, and removes the child's scratch directory if it was given one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// `$1`: directory to remove once the child was killed by the watchdog ("" for none);
/// the rest: the command. Exits with the child's status if the child ends on its own.
/// The lifeline is kept open on fd 3: after the child is gone, `read -t 0` on it tells
/// apart "told to stop" (EOF) from "ended on its own" (no data, no EOF).
const WATCHDOG: &str = r#"
set -u
cleanup=$1; shift
exec 3<&0 </dev/null
"$@" 3<&- &
child=$!
( read -r _ <&3; kill -KILL "$child" 2>/dev/null ) &
watcher=$!
exec 2>/dev/null # no "Killed" job notices in the child's log
wait "$child"
status=$?
if read -t 0 -u 3; then
  wait "$watcher"
  if [ -n "$cleanup" ]; then rm -rf -- "$cleanup"; fi
  exit 0
fi
kill -KILL "$watcher" 2>/dev/null
exit "$status"
"#;

/// How long `stop` waits for the watchdog to report the child gone.
const STOP_DEADLINE: Duration = Duration::from_secs(20);
const STOP_POLL: Duration = Duration::from_millis(20);

/// A running child process, its output in `log`.
#[derive(Debug)]
pub(crate) struct Supervised {
    name: String,
    watchdog: Child,
    lifeline: Option<ChildStdin>,
    log: PathBuf,
}

impl Supervised {
    /// Starts `program args` with stdout and stderr written to `log` (truncated first).
    /// `cleanup`, if given, is removed after the child was killed.
    pub(crate) fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        cleanup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let cleanup = cleanup
            .map(|p| p.as_os_str().to_owned())
            .unwrap_or_default();
        let mut watchdog = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("{name}-watchdog"))
            .arg(cleanup)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let lifeline = watchdog.stdin.take();
        Ok(Self {
            name: name.to_owned(),
            watchdog,
            lifeline,
            log: log.to_owned(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the child has ended on its own.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.watchdog.try_wait().ok().flatten()
    }

    /// SIGKILLs the child (through its watchdog) and waits until it is gone.
    pub(crate) fn stop(&mut self) {
        drop(self.lifeline.take());
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            match self.watchdog.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(STOP_POLL),
            }
        }
        // Not seen so far: a stuck watchdog. Kill it so the caller is not stuck too;
        // the child it leaves behind (if any) cannot be reached from here.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }

    /// The last `lines` lines of the log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
            .unwrap_or_else(|error| format!("<cannot read {}: {error}>", self.log.display()))
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path, lines: usize) -> std::io::Result<String> {
    const WINDOW: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn alive(pid: &str) -> bool {
        let pid: u32 = pid.trim().parse().expect("a pid");
        Path::new("/proc").join(pid.to_string()).exists()
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn stop_kills_the_child_and_removes_its_scratch_dir() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo $$ > {}; echo hello; exec sleep 1000",
            pidfile.display()
        );
        let mut child = Supervised::spawn(
            "sleeper",
            Path::new("/bin/sh"),
            &["-c".into(), script],
            &dir.path().join("sleeper.log"),
            Some(&scratch),
        )
        .unwrap();
        wait_for("the child's pid file", || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        });
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        assert!(alive(&pid));
        assert!(child.exited().is_none());
        assert_eq!(child.log_tail(5), "hello");

        child.stop();
        assert!(!alive(&pid), "child {pid} survived stop()");
        assert!(!scratch.exists(), "scratch dir survived stop()");
    }

    #[test]
    fn a_child_that_dies_is_reported_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Supervised::spawn(
            "failing",
            Path::new("/bin/sh"),
            &["-c".into(), "echo boom >&2; exit 7".into()],
            &dir.path().join("failing.log"),
            None,
        )
        .unwrap();
        wait_for("the child to exit", || child.exited().is_some());
        let status = child.exited();
        assert_eq!(status.and_then(|s| s.code()), Some(7), "{status:?}");
        assert_eq!(child.log_tail(5), "boom");
    }

    /// Starts and stops children from several threads at once, stopping each right
    /// after its start (before the watchdog may even have forked its watcher).
    #[test]
    fn concurrent_immediate_stops_leave_no_child_behind() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let dir = dir.path().to_owned();
                std::thread::spawn(move || {
                    let mut pids = Vec::new();
                    for i in 0..15 {
                        let pidfile = dir.join(format!("{t}-{i}.pid"));
                        let script = format!("echo $$ > {}; exec sleep 1000", pidfile.display());
                        let mut child = Supervised::spawn(
                            "sleeper",
                            Path::new("/bin/sh"),
                            &["-c".into(), script],
                            &dir.join(format!("{t}-{i}.log")),
                            None,
                        )
                        .unwrap();
                        if i % 2 == 0 {
                            wait_for("the pid file", || {
                                std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
                            });
                        }
                        let started = Instant::now();
                        child.stop();
                        assert!(started.elapsed() < STOP_DEADLINE, "stop() hit its deadline");
                        pids.push(pidfile);
                    }
                    pids
                })
            })
            .collect();
        for thread in threads {
            for pidfile in thread.join().unwrap() {
                // A child killed before it wrote its pid (odd iterations) leaves none.
                match std::fs::read_to_string(&pidfile) {
                    Ok(pid) if pid.ends_with('\n') => {
                        assert!(!alive(&pid), "child {pid} survived stop()")
                    }
                    _ => {}
                }
            }
        }
    }

    /// What `Drop` cannot cover: the holder of the lifeline is SIGKILLed. Here the
    /// holder is a separate process so the test can kill it.
    #[test]
    fn the_child_dies_when_the_lifeline_holder_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let pidfile = dir.path().join("pid");
        let mut holder = Command::new("sleep")
            .arg("1000")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lifeline = holder.stdout.take().unwrap();
        let script = format!("echo $$ > {}; exec sleep 1000", pidfile.display());
        let mut watchdog = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("test-watchdog")
            .arg(&scratch)
            .args(["/bin/sh", "-c", &script])
            .stdin(Stdio::from(lifeline))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("the child's pid file", || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        });
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        assert!(alive(&pid));

        holder.kill().unwrap();
        holder.wait().unwrap();
        wait_for("the watchdog to exit", || {
            watchdog.try_wait().unwrap().is_some()
        });
        assert!(!alive(&pid), "child {pid} survived its lifeline holder");
        assert!(
            !scratch.exists(),
            "scratch dir survived its lifeline holder"
        );
    }
}
