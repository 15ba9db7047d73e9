//! Output: human text on stdout, or one JSON document with `--json`;
//! warnings, errors and progress on stderr. Progress bars only on a terminal.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dsg_core::scan::Problem;
use dsg_core::state::Action;
use dsg_sync::status::Row;
use dsg_sync::{EngineError, Reporter};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use crate::human::{self, count};

pub fn init_logging(debug: bool, verbose: bool) {
    let default = if debug {
        "debug"
    } else if verbose {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DSG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // Debugging (a slow sync, say) wants to see where the time went: each
    // line then carries the seconds since start. Warnings stay plain.
    let _ = if debug || std::env::var_os("DSG_LOG").is_some() {
        fmt.with_timer(tracing_subscriber::fmt::time::uptime())
            .try_init()
    } else {
        fmt.without_time().try_init()
    };
}

pub struct Out {
    pub json: bool,
    pub quiet: bool,
    pub verbose: bool,
    pub progress: bool,
    /// When the command started: summaries of long work say how long.
    pub start: std::time::Instant,
}

impl Out {
    pub fn new(json: bool, quiet: bool, verbose: bool) -> Out {
        Out {
            json,
            quiet,
            verbose,
            progress: !quiet && std::io::stderr().is_terminal(),
            start: std::time::Instant::now(),
        }
    }

    /// ` in 3.2 s` when the command has run a second or more, else
    /// nothing: the end of a summary line.
    pub fn took(&self) -> String {
        crate::human::took(self.start.elapsed())
    }

    /// A line of normal output (suppressed by -q and --json).
    pub fn line(&self, s: &str) {
        if !self.quiet && !self.json {
            println!("{s}");
        }
    }

    /// A final summary line: kept under -q? No: -q prints only errors.
    pub fn summary(&self, s: &str) {
        self.line(s)
    }

    pub fn warn(&self, s: &str) {
        if !self.quiet {
            eprintln!("warning: {s}");
        }
    }

    /// Something the user should know about an outcome that is not a
    /// problem; on stderr, so that it reaches them under --json too.
    pub fn note(&self, s: &str) {
        if !self.quiet {
            eprintln!("note: {s}");
        }
    }

    pub fn json_doc(&self, v: &serde_json::Value) {
        let mut o = std::io::stdout().lock();
        let _ = serde_json::to_writer_pretty(&mut o, v);
        let _ = writeln!(o);
    }

    pub fn error(&self, e: &EngineError, code: i32) {
        let text = e.to_string();
        if let EngineError::Reported { .. } = e {
            // The command printed its own result (JSON included).
            eprintln!("error: {text}");
            return;
        }
        let mut lines = text.lines();
        if let Some(first) = lines.next() {
            eprintln!("error: {first}");
        }
        for l in lines {
            eprintln!("{l}");
        }
        if self.json {
            self.json_doc(&serde_json::json!({
                "status": "error",
                "error": e.message(),
                "hint": e.hint(),
                "paths": e.paths(),
                "exit_code": code,
            }));
        }
    }
}

pub fn print_status(out: &Out, rows: &[Row], problems: &[Problem], offline: bool, has_cache: bool) {
    if offline {
        out.line("Offline: comparing the working tree with the last sync only (the repository was not contacted).");
    }
    if !has_cache {
        out.line("No local .dsg/: this project has not been synced here yet (run 'dsg clone').");
    }
    let sections: [(&str, &[Action]); 4] = [
        (
            "Local changes (sync uploads):",
            &[Action::Upload, Action::DeleteRemote],
        ),
        (
            "Remote changes (sync downloads):",
            &[Action::Download, Action::DeleteLocal],
        ),
        ("Conflicts (block sync):", &[Action::Conflict]),
        ("Cache updates only:", &[Action::UpdateCache]),
    ];
    let mut counts = [0usize; 4];
    for (i, (title, actions)) in sections.iter().enumerate() {
        let sel: Vec<&Row> = rows
            .iter()
            .filter(|r| actions.contains(&r.action))
            .collect();
        counts[i] = sel.len();
        if sel.is_empty() || (i == 3 && !out.verbose) {
            continue;
        }
        out.line(title);
        for r in sel {
            out.line(&format!("  {}  ({})", r.path, r.state.label()));
        }
        out.line("");
    }
    if !problems.is_empty() {
        out.line("Problems (block sync):");
        for p in problems {
            out.line(&format!("  {}: {}", p.path, p.message));
        }
        out.line("");
    }
    if counts[..3].iter().all(|c| *c == 0) && problems.is_empty() {
        out.line("Everything up to date");
    } else {
        out.line(&format!(
            "Summary: {} local, {} remote, {}, {}",
            counts[0],
            counts[1],
            count(counts[2] as u64, "conflict"),
            count(problems.len() as u64, "problem")
        ));
    }
}

/// The one line after a sync or clone: only the nonzero parts, the first
/// naming its noun (`Snapshot s7: 12 files uploaded (4.2 MiB), 3
/// downloaded (1.1 KiB), 1 deleted here`).
pub fn sync_summary(plan: &dsg_sync::sync::Plan, snapshot_id: Option<&str>) -> String {
    let parts: Vec<(u64, String)> = [
        (
            plan.uploaded,
            format!("uploaded ({})", human::bytes(plan.uploaded_bytes)),
        ),
        (
            plan.downloaded,
            format!("downloaded ({})", human::bytes(plan.downloaded_bytes)),
        ),
        (plan.deleted_local, "deleted here".to_string()),
        (plan.deleted_remote, "deleted in the repository".to_string()),
        (plan.cache_updated, "recorded as identical".to_string()),
        (
            plan.restores.len() as u64,
            "restored to the last-synced version".to_string(),
        ),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .collect();
    let text = if parts.is_empty() {
        "no file changed".to_string()
    } else {
        parts
            .iter()
            .enumerate()
            .map(|(i, (n, what))| match i {
                0 => format!("{} {what}", count(*n, "file")),
                _ => format!("{n} {what}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = match plan.backups.len() {
        0 => text,
        n => format!(
            "{text}; {} kept beside the replaced {} (name~time~)",
            count(n as u64, "backup"),
            if n == 1 { "file" } else { "files" }
        ),
    };
    match snapshot_id {
        Some(id) => format!("Snapshot {id}: {text}"),
        None => {
            let mut c = text.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        }
    }
}

/// What the next sync would refuse, or the history it would adopt: after
/// the summary, so that a status listing downloads never reads as if the
/// sync will simply do them.
pub fn print_outlook(out: &Out, outlook: &dsg_sync::sync::Outlook) {
    if let Some(b) = &outlook.blocked {
        out.line("");
        out.line("Sync is blocked (exit 3; nothing would be changed):");
        for l in b.reason.lines() {
            out.line(&format!("  {l}"));
        }
        if !b.paths.is_empty() {
            out.line("  paths:");
            for p in &b.paths {
                out.line(&format!("    {p}"));
            }
        }
        out.line(&format!("  hint: {}", b.hint));
    }
    if let Some(f) = &outlook.adopts_history {
        out.line("");
        out.line(&format!("Note: {}.", f.note(false, false)));
    }
}

/// Draws progress bars on a terminal: a spinner while the tree is walked,
/// then one bar per phase (hashing, uploading, downloading, …), each
/// created when its phase starts so that its rate and ETA count from there.
pub struct TermReporter {
    enabled: bool,
    bar: Mutex<Option<(Phase, ProgressBar)>>,
    /// The files of the current transfer, for its "3/8 files".
    files: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Scanning,
    Hashing,
    Transfer,
}

/// Before this long, or this share of the work, a rate or ETA says more
/// about start-up than about the transfer.
const RATE_AFTER: Duration = Duration::from_millis(500);
const ETA_AFTER: Duration = Duration::from_secs(2);

/// The average rate since the phase started: bytes done / time elapsed.
/// Steadier than a sliding window, and never fed a burst before time passed.
fn mean_rate(s: &ProgressState) -> Option<f64> {
    let t = s.elapsed();
    (t >= RATE_AFTER && s.pos() > 0).then(|| s.pos() as f64 / t.as_secs_f64())
}

/// What is left at the mean rate, once that rate means something.
fn eta(s: &ProgressState) -> Option<Duration> {
    let len = s.len()?;
    let rate = mean_rate(s)?;
    (s.elapsed() >= ETA_AFTER && s.pos() < len)
        .then(|| Duration::from_secs_f64((len - s.pos()) as f64 / rate))
}

/// `{what} [bar] 412.0 MiB/1.0 GiB  206.1 MiB/s  ETA 3 s  3/8 files`.
fn bar_style(what: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{what} {{bar:30}} {{done}}/{{total}}{{rate}}{{eta}}  {{msg}}"
    ))
    .unwrap()
    .with_key("done", |s: &ProgressState, w: &mut dyn fmt::Write| {
        let _ = write!(w, "{}", human::bytes(s.pos()));
    })
    .with_key("total", |s: &ProgressState, w: &mut dyn fmt::Write| {
        let _ = write!(w, "{}", human::bytes(s.len().unwrap_or(0)));
    })
    .with_key("rate", |s: &ProgressState, w: &mut dyn fmt::Write| {
        if let Some(r) = mean_rate(s) {
            let _ = write!(w, "  {}", human::rate(r));
        }
    })
    .with_key("eta", |s: &ProgressState, w: &mut dyn fmt::Write| {
        if let Some(t) = eta(s) {
            let _ = write!(w, "  ETA {}", human::eta(t));
        }
    })
}

fn new_bar(what: &str, len: u64) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(bar_style(what));
    // Redrawn while no progress arrives (one large file), so that the
    // rate and ETA keep moving.
    b.enable_steady_tick(Duration::from_millis(250));
    b
}

impl TermReporter {
    pub fn new(out: &Out) -> TermReporter {
        TermReporter {
            enabled: out.progress,
            bar: Mutex::new(None),
            files: AtomicU64::new(0),
        }
    }

    /// The bar of `phase`, made by `make` if another phase's is up.
    fn phase(
        slot: &mut Option<(Phase, ProgressBar)>,
        phase: Phase,
        make: impl FnOnce() -> ProgressBar,
    ) -> &ProgressBar {
        if slot.as_ref().is_some_and(|(p, _)| *p != phase) {
            if let Some((_, b)) = slot.take() {
                b.finish_and_clear();
            }
        }
        &slot.get_or_insert_with(|| (phase, make())).1
    }
}

impl Reporter for TermReporter {
    fn wants_progress(&self) -> bool {
        self.enabled
    }

    fn scanning(&self, p: &dsg_core::scan::Progress) {
        if !self.enabled {
            return;
        }
        let mut g = self.bar.lock().unwrap();
        let to_hash = p.bytes_to_hash.load(Ordering::Relaxed);
        if to_hash > 0 {
            let bar = Self::phase(&mut g, Phase::Hashing, || new_bar("hashing", to_hash));
            bar.set_length(to_hash);
            bar.set_position(p.bytes_hashed.load(Ordering::Relaxed));
            bar.set_message(format!(
                "{}/{}",
                p.files_hashed.load(Ordering::Relaxed),
                count(p.files_to_hash.load(Ordering::Relaxed), "file")
            ));
        } else {
            let bar = Self::phase(&mut g, Phase::Scanning, || {
                let b = ProgressBar::new_spinner();
                b.set_style(ProgressStyle::with_template("{spinner} {msg}").unwrap());
                b
            });
            bar.set_message(format!(
                "scanning: {}",
                count(p.files_seen.load(Ordering::Relaxed), "file")
            ));
            bar.tick();
        }
    }

    fn transfer_start(&self, what: &str, files: u64, bytes: u64) {
        if !self.enabled {
            return;
        }
        let mut g = self.bar.lock().unwrap();
        if let Some((_, b)) = g.take() {
            b.finish_and_clear();
        }
        let b = new_bar(what, bytes);
        b.set_message(format!("0/{}", count(files, "file")));
        *g = Some((Phase::Transfer, b));
        self.files.store(files, Ordering::Relaxed);
    }

    fn transfer_progress(&self, files: u64, bytes: u64) {
        if let Some((_, b)) = self.bar.lock().unwrap().as_ref() {
            b.set_position(bytes);
            let total = self.files.load(Ordering::Relaxed);
            b.set_message(format!("{files}/{}", count(total, "file")));
        }
    }

    fn transfer_done(&self) {
        if let Some((_, b)) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }

    fn warn(&self, msg: &str) {
        eprintln!("warning: {msg}");
    }
}

impl Drop for TermReporter {
    fn drop(&mut self) {
        if let Some((_, b)) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}
