//! The tripwire: which log lines are ERROR events, and which of them a test declared.
//! Invariant: a line is an ERROR event by its level field alone, coloured or not, and an
//! undeclared one fails the test.

use std::borrow::Cow;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

/// An ERROR line in the output of a process a test started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorLine {
    /// The name the process was started under (`fileserver`, `fs-a`, `ws-a`), or the
    /// command line of a `holdfast` command run to completion.
    pub process: String,
    /// The process's log file; `None` for a command run to completion, whose stderr the
    /// test was handed.
    pub log: Option<PathBuf>,
    /// The line, without colours.
    pub line: String,
    /// Logged while the harness stopped the process (after its SIGTERM).
    pub while_stopping: bool,
}

/// An ERROR line a test provokes on purpose.
#[derive(Clone, Debug)]
struct Expected {
    /// Only lines of the process started under this name; any process's when `None`.
    process: Option<String>,
    /// A substring of the line.
    pattern: String,
    /// Only lines logged while the harness stopped the process.
    while_stopping: bool,
}

impl Expected {
    fn covers(&self, error: &ErrorLine) -> bool {
        self.process.as_ref().is_none_or(|p| *p == error.process)
            && error.line.contains(&self.pattern)
            && (error.while_stopping || !self.while_stopping)
    }
}

/// The ERROR lines a test declared, those of the commands it ran to completion, and
/// which stretch of each log a process wrote while the harness stopped it. Behind
/// mutexes so that a test declares through a shared `&TestCell`.
#[derive(Debug, Default)]
pub(crate) struct Tripwire {
    expected: Mutex<Vec<Expected>>,
    from_commands: Mutex<Vec<ErrorLine>>,
    /// (process, byte range of its log) per stop by the harness.
    stopping: Mutex<Vec<(String, Range<u64>)>>,
}

impl Tripwire {
    /// Declares that `process` (any process when `None`) may log ERROR lines containing
    /// `pattern`.
    pub(crate) fn expect(&self, process: Option<&str>, pattern: &str) {
        lock(&self.expected).push(Expected {
            process: process.map(str::to_owned),
            pattern: pattern.to_owned(),
            while_stopping: false,
        });
    }

    /// Declares that `process` may log ERROR lines containing `pattern` while the harness
    /// stops it, and at no other time.
    pub(crate) fn expect_while_stopping(&self, process: &str, pattern: &str) {
        lock(&self.expected).push(Expected {
            process: Some(process.to_owned()),
            pattern: pattern.to_owned(),
            while_stopping: true,
        });
    }

    /// Notes that `process` wrote `span` of its log while the harness stopped it.
    pub(crate) fn record_stop(&self, process: &str, span: Range<u64>) {
        lock(&self.stopping).push((process.to_owned(), span));
    }

    /// Keeps the ERROR lines of a command run to completion, named by its `command` line.
    pub(crate) fn record_command(&self, command: &str, stderr: &str) {
        let lines = error_lines(stderr).map(|line| ErrorLine {
            process: command.to_owned(),
            log: None,
            line,
            while_stopping: false,
        });
        lock(&self.from_commands).extend(lines);
    }

    /// Every ERROR line no declaration covers: in the log files of `logs` (process name,
    /// log file) and in the output of the commands run to completion.
    pub(crate) fn unexpected(&self, logs: &[(String, PathBuf)]) -> Vec<ErrorLine> {
        let mut found = Vec::new();
        let stopping = lock(&self.stopping);
        for (process, log) in logs {
            // A log never written (the process failed to start) has nothing to check.
            let Ok(bytes) = std::fs::read(log) else {
                continue;
            };
            found.extend(error_events(&bytes).map(|(offset, line)| {
                ErrorLine {
                    process: process.clone(),
                    log: Some(log.clone()),
                    line,
                    while_stopping: stopping
                        .iter()
                        .any(|(p, span)| p == process && span.contains(&offset)),
                }
            }));
        }
        found.extend(lock(&self.from_commands).iter().cloned());
        let expected = lock(&self.expected);
        found.retain(|error| !expected.iter().any(|e| e.covers(error)));
        found
    }
}

/// What a test prints when the tripwire fires: each offending line under its process and
/// log file.
pub fn report(unexpected: &[ErrorLine]) -> String {
    let mut out = format!(
        "{} ERROR line(s) the test did not declare (TestCell::expect_error):",
        unexpected.len()
    );
    let mut last: Option<(&str, Option<&PathBuf>)> = None;
    for error in unexpected {
        let source = (error.process.as_str(), error.log.as_ref());
        if last != Some(source) {
            match &error.log {
                Some(log) => out.push_str(&format!("\n  {} ({}):", error.process, log.display())),
                None => out.push_str(&format!("\n  `{}` (its stderr):", error.process)),
            }
            last = Some(source);
        }
        out.push_str(&format!("\n    {}", error.line));
        if error.while_stopping {
            out.push_str("  [while the harness stopped it]");
        }
    }
    out
}

/// The end of a cell's drop, once nothing is left running or mounted: fails the test on
/// `unexpected` ERROR lines, keeping `dir` for their logs. While the test is failing
/// already it keeps `dir` and only prints them: a second panic would abort the test
/// binary, and the first failure stands.
pub fn fire(unexpected: &[ErrorLine], dir: &mut tempfile::TempDir) {
    if std::thread::panicking() {
        // The test failed: its logs are what tells why.
        dir.disable_cleanup(true);
        eprintln!("(kept {} for the logs)", dir.path().display());
    }
    if unexpected.is_empty() {
        return;
    }
    let report = report(unexpected);
    if std::thread::panicking() {
        eprintln!("while the test failed, {report}");
        return;
    }
    dir.disable_cleanup(true);
    panic!("{report}\n(kept {} for the logs)", dir.path().display());
}

/// The ERROR events in `text`, the output of a `holdfast` process, without colours.
///
/// `holdfast` logs with tracing-subscriber's default format: `<RFC 3339 time> <LEVEL>
/// <spans>: <message> <fields>`, the level padded to five characters and coloured only at
/// a terminal. A line counts when its level field says `ERROR`: the first field (a format
/// without the time) or the second after a time. Other lines — the continuation of a
/// multi-line message, a panic message, the one-line error a command prints — do not.
pub fn error_lines(text: &str) -> impl Iterator<Item = String> + '_ {
    error_events(text.as_bytes()).map(|(_, line)| line)
}

/// `error_lines` of a log's bytes, each with the offset where its line starts.
fn error_events(bytes: &[u8]) -> impl Iterator<Item = (u64, String)> + '_ {
    let mut offset = 0u64;
    bytes
        .split_inclusive(|b| *b == b'\n')
        .filter_map(move |raw| {
            let start = offset;
            offset += raw.len() as u64;
            let text = String::from_utf8_lossy(raw);
            let line = strip_ansi(text.trim_end_matches(['\n', '\r']));
            is_error_event(&line).then(|| (start, line.into_owned()))
        })
}

fn is_error_event(line: &str) -> bool {
    let mut fields = line.split_whitespace();
    match fields.next() {
        Some("ERROR") => true,
        Some(first) if is_timestamp(first) => fields.next() == Some("ERROR"),
        _ => false,
    }
}

/// `2025-01-31T12:34:56.123456Z` and the like: a date, a `T`, a time.
fn is_timestamp(field: &str) -> bool {
    let bytes = field.as_bytes();
    bytes.len() >= 19
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
}

/// `line` without ANSI escape sequences (CSI: ESC `[`, parameters, one final byte).
fn strip_ansi(line: &str) -> Cow<'_, str> {
    if !line.contains('\x1b') {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            // Parameters and intermediates run up to a final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    Cow::Owned(out)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A test that panicked while holding it left nothing half-done: pushes only.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as `holdfast` writes them to a log file (no colours).
    const LOG: &str = "\
2025-06-01T10:00:00.000001Z  INFO vlserver started cell=e2e.test
2025-06-01T10:00:00.000002Z  WARN client unreachable; break queued
2025-06-01T10:00:00.000003Z ERROR state journal append failed; journaling stops error=No space left on device (os error 28)
2025-06-01T10:00:00.000004Z ERROR request{peer=127.0.0.1:4000}: storage operation failed error=Is a directory
    a continuation line: ERROR is not its level
holdfast: fileserver: state journal append failed: ERROR
thread 'main' panicked at src/main.rs:1:1: ERROR
2025-06-01T10:00:00.000005Z DEBUG about an ERROR seen elsewhere
";

    #[test]
    fn only_lines_whose_level_is_error_count() {
        let lines: Vec<String> = error_lines(LOG).collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].contains("state journal append failed"));
        assert!(lines[1].contains("storage operation failed"));
    }

    /// What `holdfast` writes through the subscriber `init_tracing` (src/process.rs)
    /// sets up: colours only at a terminal, no target.
    fn logged_by_holdfast(ansi: bool) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(ansi)
            .with_target(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", peer = "127.0.0.1:4000");
            let _entered = span.enter();
            tracing::info!(volume = "root.cell", "volume created");
            tracing::warn!("client unreachable; an ERROR may follow");
            tracing::error!(error = "Is a directory", "storage operation failed");
            tracing::debug!("not logged at the default level");
        });
        let bytes = lock(&buffer.0).clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn holdfasts_own_format_is_read_with_and_without_colours() {
        for ansi in [false, true] {
            let text = logged_by_holdfast(ansi);
            assert_eq!(text.contains('\x1b'), ansi, "{text}");
            let lines: Vec<String> = error_lines(&text).collect();
            assert_eq!(lines.len(), 1, "ansi {ansi}: {text}");
            assert!(
                lines[0].contains("ERROR request{peer=")
                    && lines[0].contains("storage operation failed"),
                "{lines:?}"
            );
        }
    }

    #[test]
    fn a_format_without_the_time_is_read_too() {
        let lines: Vec<String> = error_lines("ERROR boom\n INFO fine\n").collect();
        assert_eq!(lines, ["ERROR boom"]);
    }

    #[test]
    fn a_declaration_covers_its_process_and_pattern_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fileserver.log");
        std::fs::write(&log, LOG).unwrap();
        let logs = [("fileserver".to_owned(), log.clone())];
        let tripwire = Tripwire::default();
        assert_eq!(tripwire.unexpected(&logs).len(), 2);

        tripwire.expect(Some("vlserver"), "storage operation failed");
        assert_eq!(tripwire.unexpected(&logs).len(), 2, "another process's");
        tripwire.expect(Some("fileserver"), "storage operation failed");
        let left = tripwire.unexpected(&logs);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].process, "fileserver");
        assert_eq!(left[0].log.as_ref(), Some(&log));
        assert!(left[0].line.contains("state journal append failed"));
        let report = report(&left);
        assert!(
            report.contains("fileserver (") && report.contains("fileserver.log):"),
            "{report}"
        );
        assert!(report.contains("state journal append failed"), "{report}");

        tripwire.expect(None, "state journal append failed");
        assert_eq!(tripwire.unexpected(&logs), []);
    }

    #[test]
    fn a_declaration_while_stopping_covers_only_what_a_stop_logged() {
        const REPLY: &str = "2025-06-01T10:00:00.000001Z ERROR Failed to send FUSE reply: \
                             No such file or directory (os error 2)\n";
        let running = REPLY.to_owned();
        let stopping = format!("2025-06-01T10:00:00.000002Z  INFO signal received\n{REPLY}");
        let dir = tempfile::tempdir().unwrap();
        let logs: Vec<(String, PathBuf)> = ["ws-a", "ws-b"]
            .iter()
            .map(|name| {
                let log = dir.path().join(format!("{name}.log"));
                std::fs::write(&log, format!("{running}{stopping}")).unwrap();
                (name.to_string(), log)
            })
            .collect();
        let tripwire = Tripwire::default();
        for (name, _) in &logs {
            tripwire.expect_while_stopping(name, "Failed to send FUSE reply");
        }
        let span = running.len() as u64..(running.len() + stopping.len()) as u64;
        tripwire.record_stop("ws-b", span);

        let left = tripwire.unexpected(&logs);
        // ws-a was not stopped by the harness: both of its lines count; of ws-b's, the
        // one logged while running.
        let summary: Vec<(&str, bool)> = left
            .iter()
            .map(|e| (e.process.as_str(), e.while_stopping))
            .collect();
        assert_eq!(summary, [("ws-a", false), ("ws-a", false), ("ws-b", false)]);
    }

    #[test]
    fn a_command_run_to_completion_is_checked_by_its_stderr() {
        let tripwire = Tripwire::default();
        tripwire.record_command("holdfast vos listvldb", LOG);
        let found = tripwire.unexpected(&[]);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].process, "holdfast vos listvldb");
        assert_eq!(found[0].log, None);
        assert!(report(&found).contains("`holdfast vos listvldb` (its stderr):"));
        tripwire.expect(None, "ERROR");
        assert_eq!(tripwire.unexpected(&[]), []);
    }
}
