//! The `migshaper` command: parse flags, set up logging, call the library, map errors to
//! exit codes (2: bad configuration, cannot start, `inspect` cannot read a file, or `probe`
//! cannot measure (no sink there, bad flags); 1: runtime failure; 3: `probe` measured a
//! path that does not carry a link with margin).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use migshaper::app::Server;
use migshaper::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Inspect(args) => inspect(args),
        Command::Demo(args) => demo(args),
        Command::Link(cmd) => link(cmd),
        Command::Status(args) => {
            client_result(migshaper::client::status(&args).map(|()| String::new()))
        }
        Command::Sink(args) => sink(&args),
        Command::Probe(args) => probe(&args),
    }
}

fn sink(args: &migshaper::cli::SinkArgs) -> ExitCode {
    let opts = args.options();
    match migshaper::probe::bind_sink(&opts) {
        Ok(listener) => {
            migshaper::probe::run_sink(listener, &opts);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migshaper: {e}");
            ExitCode::from(2)
        }
    }
}

/// Exit 0 when every link fits, 3 when one does not, 2 when nothing could be measured.
fn probe(args: &migshaper::cli::ProbeArgs) -> ExitCode {
    let report = match migshaper::probe::probe(&args.options()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("migshaper: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(code) = print_report(&report, args.json) {
        return code;
    }
    if report.all_faithful() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn link(cmd: migshaper::cli::LinkCommand) -> ExitCode {
    use migshaper::cli::LinkCommand;
    use migshaper::client;
    client_result(match cmd {
        LinkCommand::Get {
            route,
            json,
            client,
        } => client::link_get(&client, route.as_deref(), json),
        LinkCommand::Set(args) => client::link_set(&args),
        LinkCommand::Schedule(args) => client::link_schedule(&args).map(|()| String::new()),
    })
}

/// Prints a client command's output, or its error with exit code 1.
fn client_result(r: Result<String, migshaper::client::ClientError>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migshaper: {e}");
            ExitCode::from(1)
        }
    }
}

fn demo(args: migshaper::cli::DemoArgs) -> ExitCode {
    use migshaper::demo::{Replay, render, replay_through};
    for l in &args.links {
        if let Err(e) = l.parse::<migshaper::spec::LinkRate>() {
            eprintln!("migshaper: --links: {e}");
            return ExitCode::from(2);
        }
    }
    let replay = match &args.capture {
        Some(dir) => Replay::from_dir(dir),
        None => Replay::bundled(),
    };
    let replay = match replay {
        Ok(r) => r,
        Err(e) => {
            eprintln!("migshaper: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("migshaper: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut runs = Vec::new();
    for link in &args.links {
        eprintln!("migshaper demo: replaying through a {link} link ...");
        match rt.block_on(replay_through(&replay, link)) {
            Ok(r) => runs.push((link.clone(), r)),
            Err(e) => {
                eprintln!("migshaper: {e}");
                return ExitCode::from(1);
            }
        }
    }
    print!("{}", render(&replay, &runs));
    ExitCode::SUCCESS
}

fn inspect(args: migshaper::cli::InspectArgs) -> ExitCode {
    let report = match migshaper::inspect::inspect(
        &args.capture,
        args.return_path.as_deref(),
        &args.multifd,
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("migshaper: {e}; {}", e.hint());
            return ExitCode::from(2);
        }
    };
    match print_report(&report, args.json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// Prints a report as text, or as one JSON line with `json`. A closed pipe (`| head`) is
/// the reader's choice, not a failure; anything else is exit 1.
fn print_report(
    report: &(impl serde::Serialize + std::fmt::Display),
    json: bool,
) -> Result<(), ExitCode> {
    let text = if json {
        serde_json::to_string(report)
            .map(|j| j + "\n")
            .map_err(|e| {
                eprintln!("migshaper: cannot encode the report as JSON: {e}");
                ExitCode::from(1)
            })?
    } else {
        report.to_string()
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("migshaper: cannot write the report: {e}");
            Err(ExitCode::from(1))
        }
        _ => Ok(()),
    }
}

fn serve(args: migshaper::cli::ServeArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("migshaper: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("migshaper")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("migshaper: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match migshaper::raise_fd_limit() {
        Ok(limit) => {
            // Two sockets per connection and up to two pipes (4 descriptors) for zero-copy
            // forwarding, plus listeners, the control API and some slack. Without
            // descriptors for pipes a connection copies instead; without sockets it fails.
            let need: u64 = config
                .routes
                .iter()
                .map(|r| 6 * r.max_connections as u64 + 1)
                .sum::<u64>()
                + 64;
            if limit < need {
                tracing::warn!(
                    open_files_limit = limit,
                    needed = need,
                    "the open-files limit is below what max_connections allows; accepts will fail with EMFILE before the limit is reached (raise `ulimit -Hn` or lower max_connections)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    rt.block_on(async {
        let shutdown = migshaper::shutdown_signal();
        let server = match Server::bind(&config) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("migshaper: {e}");
                return ExitCode::from(2);
            }
        };
        server.run(shutdown).await;
        ExitCode::SUCCESS
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIGSHAPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
