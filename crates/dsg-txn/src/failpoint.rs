//! Failpoints for crash tests: `DSG_FAILPOINT=<name>` makes the process exit
//! abruptly (as kill -9 would: no destructors, no cleanup) when it reaches
//! that step. `DSG_FAILPOINT=list` prints each step name to stderr as it is
//! passed, so tests can enumerate the steps. `DSG_FAILPOINT=<name>:pause=MS`
//! sleeps there instead, so a test can deliver a signal at a known step.
//! `DSG_FAILPOINT=<name>:error` makes the steps that can fail (see
//! `injected_error`) return an error there, for "failed, not crashed"
//! tests. Compiled in always: a check of one environment variable per step
//! costs nothing measurable.

use std::sync::OnceLock;

fn setting() -> &'static Option<String> {
    static S: OnceLock<Option<String>> = OnceLock::new();
    S.get_or_init(|| {
        std::env::var("DSG_FAILPOINT")
            .ok()
            .filter(|s| !s.is_empty())
    })
}

pub fn failpoint(name: &str) {
    match setting() {
        None => {}
        Some(s) if s == "list" => eprintln!("failpoint: {name}"),
        Some(s)
            if s.strip_prefix(name)
                .and_then(|r| r.strip_prefix(":pause="))
                .is_some() =>
        {
            let ms: u64 = s[name.len() + 7..].parse().unwrap_or(1000);
            eprintln!("failpoint {name}: pausing {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Some(s) if s == name => {
            eprintln!("failpoint {name}: exiting");
            // SIGKILL ourselves: no unwinding, no atexit, no buffered flush.
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            std::process::abort();
        }
        Some(_) => {}
    }
}

/// True when `DSG_FAILPOINT=<name>:error`: the caller fails at this step as
/// if its next system call had.
pub fn injected_error(name: &str) -> bool {
    matches!(setting(), Some(s) if s.strip_prefix(name) == Some(":error"))
}
