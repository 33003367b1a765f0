//! The `switchboard` binary: the allocator, then the command line
//! (`switchboard::cli`, which runs each command).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: under load, glibc malloc's
/// bookkeeping (arena locks, consolidation) took about 10 % of the relay's
/// CPU in profiles; see docs/benchmarks.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchboard::cli::dispatch(switchboard::cli::Cli::parse())
}
