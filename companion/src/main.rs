//! The `tokengate-companion` binary: configuration, logging, signals. Everything else
//! is in the library's [`tokengate_companion::run`].

use clap::{CommandFactory, Parser};
use std::process::ExitCode;
use tokengate_companion::keys::Secrets;
use tokengate_companion::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    // Bad values and unreadable or invalid key files stop start-up here, with clap's
    // usage hint; the messages name the flag and never a key.
    let checked = config
        .validate()
        .and_then(|()| Secrets::load(&config).map(drop).map_err(|e| e.to_string()));
    if let Err(message) = checked {
        Config::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit();
    }
    init_logging(config.log_format);

    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listen = %config.listen, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match tokengate_companion::run(listener, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "companion failed");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error, filtered by RUST_LOG (`info`, `tokengate_companion=debug,info`,
/// …; `info` if unset), as text or JSON. Every line of a request carries its span
/// (`request_id`, method, path).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).init();
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
