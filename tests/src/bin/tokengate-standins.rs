//! `tokengate-standins`: runs the Tenant Service, Genesys login and echo stand-ins on
//! fixed loopback ports for demos and manual testing, until Ctrl-C or SIGTERM.
//!
//! ```text
//! tokengate-standins [--tenant-service-port 18081] [--login-port 18082] [--echo-port 18083] [--fixture PATH]
//! curl -s localhost:18081/tenants/acme/credentials/genesys
//! curl -s -X POST localhost:18082/_standin/fault -d '{"fault":"status","status":503}' -H 'content-type: application/json'
//! ```
//!
//! One log line per request (stand-in, method, path, status, and for the login the
//! client id); secrets and tokens are never logged. `RUST_LOG` overrides the level.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokengate_tests::standins::{Endpoint, Fixture, Ports, StandIns};
use tracing_subscriber::EnvFilter;

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Stand-in Tenant Service, Genesys login and echo upstream for tokengate"
)]
struct Args {
    /// Port of the Tenant Service stand-in on 127.0.0.1.
    #[arg(long, default_value_t = Ports::DEMO.tenant_service)]
    tenant_service_port: u16,
    /// Port of the Genesys login stand-in on 127.0.0.1 (serves every region's login host).
    #[arg(long, default_value_t = Ports::DEMO.login)]
    login_port: u16,
    /// Port of the echo upstream on 127.0.0.1.
    #[arg(long, default_value_t = Ports::DEMO.echo)]
    echo_port: u16,
    /// Fixture JSON file; the embedded tests/fixtures/tenants.json when absent.
    #[arg(long)]
    fixture: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();

    let fixture = match &args.fixture {
        Some(path) => match Fixture::load(path) {
            Ok(fixture) => fixture,
            Err(error) => {
                tracing::error!(%error, "cannot load the fixture");
                return ExitCode::FAILURE;
            }
        },
        None => Fixture::default_fixture(),
    };
    let ports = Ports {
        tenant_service: args.tenant_service_port,
        login: args.login_port,
        echo: args.echo_port,
    };
    let standins = match StandIns::start_on(fixture, ports).await {
        Ok(standins) => standins,
        Err(error) => {
            tracing::error!(%error, ?ports, "cannot bind the stand-in ports");
            return ExitCode::FAILURE;
        }
    };
    for endpoint in Endpoint::ALL {
        tracing::info!(
            standin = endpoint.name(),
            url = standins.url(endpoint),
            "listening"
        );
    }
    tracing::info!(
        tenants = standins
            .fixture()
            .tenant_ids()
            .collect::<Vec<_>>()
            .join(","),
        "fixture loaded"
    );

    match shutdown_signal().await {
        Ok(signal) => tracing::info!(signal, "stopping"),
        Err(error) => tracing::error!(%error, "cannot listen for signals; stopping"),
    }
    standins.shutdown().await;
    ExitCode::SUCCESS
}

/// Resolves with the signal's name on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map(|()| "SIGINT"),
            _ = terminate.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map(|()| "Ctrl-C")
    }
}
