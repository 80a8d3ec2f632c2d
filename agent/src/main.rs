//! `allod`: the one binary of an Allod node. `allod agent` is the daemon,
//! `allod up` a single-node cluster with built-in defaults, and every other
//! subcommand a client of the local admin socket or of the REST API.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = agent::cli::Cli::parse();
    let is_daemon = matches!(
        cli.command,
        agent::cli::TopCommand::Agent(_) | agent::cli::TopCommand::Up(_)
    );
    if !is_daemon {
        // A client printing into a closed pipe (`allod ... | head`) should
        // end quietly, as other command-line tools do, not panic.
        // SAFETY: restoring the default disposition of SIGPIPE, before any
        // other thread exists, installs no handler code at all.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    let default_filter = if is_daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALLOD_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!("{default_filter},openraft=warn"))
            }),
        )
        .with_writer(|| agent::daemon::logring::Tee)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if is_daemon {
        // Everything the agent writes (state, log, keys, tenants' objects)
        // is its own: 0600 files, 0700 directories. What QEMU must reach,
        // the NBD socket, is opened up explicitly.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        agent::daemon::raise_open_file_limit();
    }
    // One worker per core (at least two): block I/O runs on a runtime of
    // its own, so these serve the control plane and the API.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(agent::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", agent::error_chain_anyhow(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
