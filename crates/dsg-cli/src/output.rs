//! Output: human text on stdout, or one JSON document with `--json`;
//! warnings, errors and progress on stderr. Progress bars only on a terminal.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use dsg_core::scan::Problem;
use dsg_core::state::Action;
use dsg_sync::status::Row;
use dsg_sync::{EngineError, Reporter};
use indicatif::{ProgressBar, ProgressStyle};

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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}

pub struct Out {
    pub json: bool,
    pub quiet: bool,
    pub verbose: bool,
    pub progress: bool,
}

impl Out {
    pub fn new(json: bool, quiet: bool, verbose: bool) -> Out {
        Out {
            json,
            quiet,
            verbose,
            progress: !quiet && std::io::stderr().is_terminal(),
        }
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
            "Summary: {} local, {} remote, {} conflicts, {} problems",
            counts[0],
            counts[1],
            counts[2],
            problems.len()
        ));
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

/// Draws progress bars on a terminal.
pub struct TermReporter {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl TermReporter {
    pub fn new(out: &Out) -> TermReporter {
        TermReporter {
            enabled: out.progress,
            bar: Mutex::new(None),
        }
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
        let bar = g.get_or_insert_with(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{spinner} {msg}").unwrap());
            b
        });
        if to_hash > 0 {
            bar.set_length(to_hash);
            bar.set_style(
                ProgressStyle::with_template(
                    "hashing {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .unwrap(),
            );
            bar.set_position(p.bytes_hashed.load(Ordering::Relaxed));
            bar.set_message(format!(
                "{}/{} files",
                p.files_hashed.load(Ordering::Relaxed),
                p.files_to_hash.load(Ordering::Relaxed)
            ));
        } else {
            bar.set_message(format!(
                "scanning: {} files",
                p.files_seen.load(Ordering::Relaxed)
            ));
            bar.tick();
        }
    }

    fn transfer_start(&self, what: &str, files: u64, bytes: u64) {
        if !self.enabled {
            return;
        }
        let mut g = self.bar.lock().unwrap();
        if let Some(b) = g.take() {
            b.finish_and_clear();
        }
        let b = ProgressBar::new(bytes);
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{what} {{bar:30}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} {{msg}} of {files} files"
            ))
            .unwrap(),
        );
        *g = Some(b);
    }

    fn transfer_progress(&self, files: u64, bytes: u64) {
        if let Some(b) = self.bar.lock().unwrap().as_ref() {
            b.set_position(bytes);
            b.set_message(files.to_string());
        }
    }

    fn transfer_done(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }

    fn warn(&self, msg: &str) {
        eprintln!("warning: {msg}");
    }
}

impl Drop for TermReporter {
    fn drop(&mut self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}
