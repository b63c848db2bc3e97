//! The `raft-host` binary: parses the command line and calls the library.
//! Errors end here as one line on stderr and a non-zero exit.

mod cli;

use clap::Parser;
use std::io::IsTerminal;

// The request path allocates and frees many small buffers (protobuf, HTTP/2,
// fjall batches) across threads; mimalloc's per-thread free lists serve
// that better than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What is logged when RUST_LOG says nothing: our INFO and up, and only
/// warnings of the storage engine (dozens of INFO lines at every start).
const DEFAULT_LOG_FILTER: &str = "info,fjall=warn,lsm_tree=warn";

fn main() {
    // mimalloc asks for transparent huge pages for its arenas: each 2 MiB
    // region it touches then becomes resident whole. That doubled a
    // member's memory at rest (106 against 55 MiB when started, ~240
    // against ~140 MiB after a load) for no measurable speed. Best effort:
    // kernels without the switch keep their default.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = cli::Cli::parse();
    // Logs go to stderr, filtered by RUST_LOG, so warnings from the library
    // (for example a store opened without fsync) are seen.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")));
    match cli.log_format {
        cli::LogFormat::Text => logs.init(),
        cli::LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
    }
    if let Err(error) = cli::run(cli) {
        eprintln!("raft-host: {}", one_line(&error));
        std::process::exit(1);
    }
}

/// Colour codes only for a person at a terminal: logs redirected to a file or
/// collected by a supervisor (systemd, docker, the test harness) stay plain
/// text for grep and for log pipelines. `NO_COLOR` (no-color.org) turns them
/// off at a terminal too.
fn colour_logs(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// The error and its causes on one line, each said once: many of our errors
/// already quote their source in their own message (so logs, which show
/// only that message, keep it), and anyhow's chain would repeat it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::colour_logs;

    #[test]
    fn logs_are_coloured_only_at_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(!colour_logs(false, None), "a file or a pipe gets plain text");
        assert!(!colour_logs(true, Some("1".into())), "NO_COLOR turns colour off");
        assert!(colour_logs(true, Some("".into())), "an empty NO_COLOR is unset, as no-color.org says");
    }
}
