//! Terminal behaviour shared by the subcommands: progress bars on stderr (only on a terminal,
//! never with `--quiet`) and leveled logs through `tracing` (`-v`: pass and stage timings,
//! `-vv`: per-kernel details).

use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: OnceLock<bool> = OnceLock::new();

/// Sets up logging for `-v` × `verbose` (0: warnings only) and remembers `--quiet`.
pub fn init(verbose: u8, quiet: bool) {
    let _ = QUIET.set(quiet);
    let level = match (quiet, verbose) {
        (true, _) => tracing::Level::ERROR,
        (false, 0) => tracing::Level::WARN,
        (false, 1) => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .with_max_level(level)
        .try_init();
}

pub fn quiet() -> bool {
    QUIET.get().copied().unwrap_or(false)
}

/// A progress bar of `len` steps on stderr; hidden with `--quiet` and when stderr is not a
/// terminal (indicatif's stderr target draws nothing then).
pub fn bar(len: usize, what: &str) -> ProgressBar {
    if quiet() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// A `progress(done, total)` callback that drives `bar`.
pub fn track(bar: &ProgressBar) -> impl Fn(usize, usize) + Send + Sync + 'static {
    let b = bar.clone();
    move |done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    }
}
