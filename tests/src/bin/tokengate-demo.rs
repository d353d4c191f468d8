//! The local demo: starts Redis, the companion, the stand-ins and Envoy with the
//! filter on loopback, sends sample requests, and shows what the upstream received.
//!
//! `tokengate-demo` keeps the stack running until Ctrl-C; `tokengate-demo --once`
//! exits after the walkthrough. Everything it started is stopped on exit. Envoy loads
//! the build `$TOKENGATE_FILTER` names (`wasm`, the default, or `native`; `scripts/demo
//! --native` sets it).

use clap::Parser;
use tokengate_tests::harness::{FilterBuild, Stack};
use tokengate_tests::standins::Endpoint;

#[derive(Parser)]
#[command(about = "Run tokengate locally and walk through a request")]
struct Args {
    /// Exit after the walkthrough instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tokengate_tests::harness::log_like_an_operator();
    let build = FilterBuild::from_env();
    build.assert_built();
    let module = build
        .module()
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!("Starting Redis, the companion, the stand-ins and Envoy with {module} ...");
    let stack = Stack::start().await;
    let url = format!("{}/api/conversations", stack.envoy.url());
    println!();
    println!("  Envoy listener     {}", stack.envoy.url());
    println!(
        "  Envoy admin        http://127.0.0.1:{}/stats?filter=tokengate",
        stack.envoy.admin_port
    );
    println!(
        "  companion          http://127.0.0.1:{}",
        stack.companion.port
    );
    println!("  redis              {}", stack.redis.url());
    println!(
        "  Tenant Service     http://{}  (stand-in)",
        stack.standins.tenant_service
    );
    println!(
        "  Genesys login      http://{}  (stand-in)",
        stack.standins.login
    );
    println!(
        "  upstream app       http://{}  (stand-in, echoes the headers it got)",
        stack.standins.echo
    );
    println!("  logs               {}", stack.dir.path().display());
    println!();

    let client = reqwest::Client::new();
    for attempt in ["first", "second"] {
        println!("$ curl -H 'x-tenant-id: acme' {url}      # {attempt} request");
        match client.get(&url).header("x-tenant-id", "acme").send().await {
            Ok(response) => {
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                println!("  status {status}; the upstream saw:");
                println!(
                    "  authorization: {}",
                    body["headers"]["authorization"]
                        .as_str()
                        .unwrap_or("(none)")
                );
            }
            Err(error) => println!("  request failed: {error}"),
        }
        println!(
            "  calls so far: Tenant Service {}, Genesys login {}",
            stack.standins.calls(Endpoint::TenantService),
            stack.standins.calls(Endpoint::Login)
        );
        println!();
    }
    println!(
        "The second request was served from the gateway's cache: no new Tenant Service or login call."
    );
    println!();
    println!(
        "The filter's stats in Envoy (http://127.0.0.1:{}/stats?filter=tokengate):",
        stack.envoy.admin_port
    );
    for stat in [
        "tokengate.cache_miss",
        "tokengate.cache_hit",
        "tokengate.fetch_started",
        "tokengate.fetch_succeeded",
    ] {
        println!("  {stat}: {}", stack.envoy.stat(stat).await);
    }

    if args.once {
        println!("Stopping everything (--once); the log folder is removed.");
        return;
    }
    println!();
    println!(
        "Try other tenants: globex, initech, umbrella, hooli, wayne; an unknown one gets a JSON error:"
    );
    println!("  curl -s -H 'x-tenant-id: globex' {url}");
    println!("  curl -s -H 'x-tenant-id: nobody' {url}");
    println!("Press Ctrl-C to stop everything (the processes and the log folder are removed).");
    let _ = tokio::signal::ctrl_c().await;
    println!("Stopping.");
}
