//! Runs the real pieces on loopback for end-to-end tests and the demo: `redis-server`,
//! the companion binary, Envoy with the built filter, and the stand-ins.
//!
//! Every Envoy loads one of the filter's two builds, chosen by `$TOKENGATE_FILTER`
//! ([`FilterBuild`]): `wasm` (the default, `tokengate.wasm`) or `native` (the dynamic
//! module `libtokengate_native.so`). Both render the same `envoy/local.yaml.tmpl`; only
//! its filter block differs (`envoy/filter-wasm.yaml.tmpl`, `envoy/filter-native.yaml.tmpl`).
//!
//! Every process is started on free loopback ports, logs to a file in a per-stack
//! temporary folder, and is killed when its guard is dropped, also when a test fails
//! (the log tails are printed then, to explain the failure).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::leak_scan::{LeakScan, receive};
use crate::standins::{Fixture, StandIns};

/// The workspace root (the folder of the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A path from an environment variable, or a default under the workspace root.
fn artifact(variable: &str, default: &str) -> PathBuf {
    std::env::var_os(variable).map_or_else(|| workspace_root().join(default), PathBuf::from)
}

/// The Envoy binary: `$TOKENGATE_ENVOY`, or the one `scripts/setup` installs.
pub fn envoy_binary() -> PathBuf {
    artifact("TOKENGATE_ENVOY", ".venv/bin/envoy")
}

/// The filter module: `$TOKENGATE_WASM`, or the one `scripts/build-wasm` writes.
pub fn wasm_module() -> PathBuf {
    artifact("TOKENGATE_WASM", "target/tokengate.wasm")
}

/// The folder of the native build, `libtokengate_native.so`: `$TOKENGATE_NATIVE_DIR`, or
/// the debug build's (`cargo build -p tokengate-native`). Envoy gets it as
/// `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`.
pub fn native_module_dir() -> PathBuf {
    artifact("TOKENGATE_NATIVE_DIR", "target/debug")
}

/// The native build's module name in Envoy's `dynamic_module_config` (`lib<name>.so`).
pub const NATIVE_MODULE_NAME: &str = "tokengate_native";

/// The environment variable that picks the build every Envoy loads: `wasm` or `native`.
pub const FILTER_BUILD_VARIABLE: &str = "TOKENGATE_FILTER";

/// Which build of the filter an Envoy loads. Both run the same worker and read the same
/// filter configuration; they differ in the host (proxy-wasm on V8, or Envoy's dynamic
/// module ABI), so in a few things an operator sees: stat prefixes, logger names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterBuild {
    /// `tokengate.wasm` in Envoy's Wasm filter ([`wasm_module`]).
    Wasm,
    /// `libtokengate_native.so` in Envoy's dynamic modules filter ([`native_module_dir`]).
    Native,
}

impl FilterBuild {
    /// The build `$TOKENGATE_FILTER` names (`wasm` when unset or empty); panics on
    /// anything else, so that a typo never runs the suite on the wrong build.
    pub fn from_env() -> FilterBuild {
        match std::env::var(FILTER_BUILD_VARIABLE).as_deref() {
            Err(_) | Ok("" | "wasm") => FilterBuild::Wasm,
            Ok("native") => FilterBuild::Native,
            Ok(other) => panic!("{FILTER_BUILD_VARIABLE}={other}: expected `wasm` or `native`"),
        }
    }

    /// The module file Envoy loads.
    pub fn module(self) -> PathBuf {
        match self {
            FilterBuild::Wasm => wasm_module(),
            FilterBuild::Native => native_module_dir().join(format!("lib{NATIVE_MODULE_NAME}.so")),
        }
    }

    /// Fails, saying how to build it, when the module is missing.
    pub fn assert_built(self) {
        let module = self.module();
        let how = match self {
            FilterBuild::Wasm => "scripts/build-wasm",
            FilterBuild::Native => "cargo build -p tokengate-native",
        };
        assert!(
            module.exists(),
            "no filter module at {}: run {how}",
            module.display()
        );
    }

    /// The prefix Envoy's `/stats` shows before the filter's own stats
    /// (`<prefix>tokengate.cache_hit`).
    pub fn stat_prefix(self) -> &'static str {
        match self {
            FilterBuild::Wasm => "wasmcustom.",
            FilterBuild::Native => "dynamicmodulescustom.",
        }
    }

    /// The filter block of `envoy/local.yaml.tmpl` for this build.
    fn template(self) -> &'static str {
        match self {
            FilterBuild::Wasm => "envoy/filter-wasm.yaml.tmpl",
            FilterBuild::Native => "envoy/filter-native.yaml.tmpl",
        }
    }
}

/// The companion binary: `$TOKENGATE_COMPANION`, or the debug build.
pub fn companion_binary() -> PathBuf {
    artifact("TOKENGATE_COMPANION", "target/debug/tokengate-companion")
}

/// Whether processes log at an operator's level instead of the tests' (see
/// [`log_like_an_operator`]).
static OPERATOR_LOGGING: AtomicBool = AtomicBool::new(false);

/// Envoy's loggers that print secrets at `debug`, kept at `info` even in tests: `http`
/// and `router` print every header (so the `Authorization` header the filter adds, and
/// the login callout's `Basic` credentials), `config` prints the whole filter
/// configuration (so `companion.apiKey`). That is Envoy's own behaviour, not the
/// filter's; the README tells operators the same.
const ENVOY_LOGGERS_THAT_PRINT_SECRETS: &str = "http:info,router:info,config:info";

/// From now on, processes this harness starts log at `info`, like an operator runs
/// them: for the benchmarks and the demo. By default they log as much as they can
/// (Envoy at `debug`, the companion at `trace`), so that the end-to-end tests' leak
/// scan ([`crate::leak_scan`]) reads everything. `TOKENGATE_ENVOY_LOG` and
/// `TOKENGATE_COMPANION_LOG` override both.
pub fn log_like_an_operator() {
    OPERATOR_LOGGING.store(true, Ordering::SeqCst);
}

/// Envoy's `--log-level` and `--component-log-level` arguments (see
/// [`log_like_an_operator`]), for any Envoy a test starts.
pub fn envoy_log_args() -> Vec<String> {
    if let Ok(level) = std::env::var("TOKENGATE_ENVOY_LOG") {
        return vec!["--log-level".into(), level];
    }
    if OPERATOR_LOGGING.load(Ordering::SeqCst) {
        return vec!["--log-level".into(), "info".into()];
    }
    vec![
        "--log-level".into(),
        "debug".into(),
        "--component-log-level".into(),
        ENVOY_LOGGERS_THAT_PRINT_SECRETS.into(),
    ]
}

/// The companion's `RUST_LOG`.
fn companion_log_filter() -> String {
    std::env::var("TOKENGATE_COMPANION_LOG").unwrap_or_else(|_| {
        let level = if OPERATOR_LOGGING.load(Ordering::SeqCst) {
            "info"
        } else {
            "trace"
        };
        level.to_owned()
    })
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Process {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let stderr = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log handle: {e}"));
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", command.get_program()));
        Process {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// Kills the process now (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (a name `kill -s` knows: `STOP`, `CONT`, `TERM`, ...) to the
    /// process: `STOP` and `CONT` freeze and thaw it, to test a peer that stops answering.
    pub fn signal(&self, signal: &str) {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            panic!("{} is not running: cannot send SIG{signal}", self.name);
        };
        let sent = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .is_ok_and(|status| status.success());
        assert!(sent, "cannot send SIG{signal} to {} ({pid})", self.name);
    }

    /// Its process id, until it is killed (to read its memory from `/proc`).
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Fails when the process has exited, showing its log.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.log_tail(40));
            }
        }
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            );
        }
        self.kill();
    }
}

/// Waits until `ready` holds, checking every 20 ms, or fails after `limit`
/// (processes take a moment to bind their ports).
pub async fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < limit,
            "{what} not ready after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the async `condition` holds, checking every 20 ms, or fails after
/// `limit` (for state that real processes reach in their own time).
pub async fn eventually(what: &str, limit: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !condition().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends one raw request line and reads the answer (a dependency-free check that a
/// server speaks): `PING` to Redis, `GET /ready` to Envoy's admin.
fn answers(addr: SocketAddr, request: &[u8], expected: &[u8]) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(request).is_err() {
        return false;
    }
    let mut buffer = vec![0u8; 512];
    let read = stream.read(&mut buffer).unwrap_or(0);
    buffer[..read]
        .windows(expected.len())
        .any(|window| window == expected)
}

/// A private `redis-server` on a free loopback port, no persistence.
#[derive(Debug)]
pub struct Redis {
    /// Where it listens.
    pub port: u16,
    process: Process,
}

impl Redis {
    /// Starts Redis and waits until it answers `PING`.
    pub async fn start(dir: &Path) -> Redis {
        Self::start_on(dir, free_port()).await
    }

    /// Starts Redis on `port` (again, after a kill) and waits until it answers `PING`.
    pub async fn start_on(dir: &Path, port: u16) -> Redis {
        Self::start_with(dir, port, &[]).await
    }

    /// Starts Redis on `port` with `args` added (e.g. cluster mode) and waits until it
    /// answers `PING`.
    pub async fn start_with(dir: &Path, port: u16, args: &[&str]) -> Redis {
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        command.args(args);
        let process = Process::spawn("redis", command, dir.join(format!("redis-{port}.log")));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until("redis", Duration::from_secs(10), || {
            answers(addr, b"PING\r\n", b"+PONG")
        })
        .await;
        Redis { port, process }
    }

    /// The `redis://` URL of this instance.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (to test outages).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Runs one command with `redis-cli` and returns its output (`--raw`: one line per
    /// element), to look at keys or slow Redis down (`CLIENT PAUSE`).
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        assert!(
            output.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The value of Prometheus series `series` (the first line starting with it) on the
/// `/metrics` of the companion at `port`; 0 when absent or unreachable.
pub async fn companion_metric(port: u16, series: &str) -> f64 {
    let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A companion process.
#[derive(Debug)]
pub struct Companion {
    /// Where it listens.
    pub port: u16,
    /// The process, to read its log or kill it.
    pub process: Process,
    /// What it was started with, to restart it the same way.
    redis_url: String,
    extra_args: Vec<String>,
    dir: PathBuf,
}

impl Companion {
    /// Starts the companion binary against `redis_url` with extra flags, and waits
    /// until `/healthz` answers.
    pub async fn start(dir: &Path, redis_url: &str, extra_args: &[&str]) -> Companion {
        let port = free_port();
        let extra_args: Vec<String> = extra_args.iter().map(|arg| (*arg).to_owned()).collect();
        let process = Self::spawn(dir, port, redis_url, &extra_args).await;
        Companion {
            port,
            process,
            redis_url: redis_url.to_owned(),
            extra_args,
            dir: dir.to_path_buf(),
        }
    }

    async fn spawn(dir: &Path, port: u16, redis_url: &str, extra_args: &[String]) -> Process {
        let binary = companion_binary();
        assert!(
            binary.exists(),
            "no companion binary at {}: run scripts/test (or cargo build -p tokengate-companion)",
            binary.display()
        );
        let mut command = Command::new(binary);
        command
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--redis-url",
                redis_url,
            ])
            .args(extra_args);
        command.env("RUST_LOG", companion_log_filter());
        let process = Process::spawn(
            "companion",
            command,
            dir.join(format!("companion-{port}.log")),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until("companion", Duration::from_secs(10), || {
            answers(
                addr,
                b"GET /healthz HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
                b"200 OK",
            )
        })
        .await;
        process
    }

    /// The value of Prometheus series `series` on its `/metrics` (see
    /// [`companion_metric`]).
    pub async fn metric(&self, series: &str) -> f64 {
        companion_metric(self.port, series).await
    }

    /// Kills the companion (SIGKILL): no goodbye to Redis or the filter.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port with the same flags, and waits until it is up.
    pub async fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(&self.dir, self.port, &self.redis_url, &self.extra_args).await;
    }
}

/// What an Envoy instance routes to.
#[derive(Debug, Clone)]
pub struct EnvoyUpstreams {
    /// The companion's port.
    pub companion_port: u16,
    /// The stand-in Tenant Service.
    pub tenant_service: SocketAddr,
    /// The stand-in Genesys login.
    pub login: SocketAddr,
    /// The stand-in echo app.
    pub echo: SocketAddr,
    /// A real authorization server (cluster `oauth_idp`), when a test runs one; without
    /// it the cluster points at the login stand-in.
    pub idp: Option<SocketAddr>,
}

/// An Envoy process running the filter (the build [`FilterBuild::from_env`] names),
/// rendered from `envoy/local.yaml.tmpl`.
#[derive(Debug)]
pub struct Envoy {
    /// The listener requests go to.
    pub port: u16,
    /// The admin interface (`/stats`, `/ready`).
    pub admin_port: u16,
    /// The process, to read its log or kill it.
    pub process: Process,
    /// How to start the next epoch; `None` when started with hot restart disabled.
    hot_restart: Option<HotRestart>,
    /// The build of the filter it loaded.
    build: FilterBuild,
}

/// What a hot-restartable Envoy needs to start its next epoch.
#[derive(Debug)]
struct HotRestart {
    /// Where the epochs log.
    dir: PathBuf,
    /// The rendered configuration, the same for every epoch.
    config: PathBuf,
    /// Worker threads of every epoch.
    concurrency: u32,
    /// `--base-id`, shared by the epochs (the first epoch's admin port).
    base_id: u16,
    /// The filter build every epoch loads.
    build: FilterBuild,
    /// The epoch running now.
    epoch: u32,
}

impl Drop for HotRestart {
    fn drop(&mut self) {
        // Envoy leaves its hot-restart shared memory behind, named after ten times the base id.
        let name = format!("envoy_shared_memory_{}", u32::from(self.base_id) * 10);
        let _ = std::fs::remove_file(Path::new("/dev/shm").join(name));
    }
}

impl Envoy {
    /// The filter configuration the tests use unless they pass their own: every
    /// Genesys region through the one `genesys_login` cluster.
    pub fn default_filter_config() -> serde_json::Value {
        serde_json::json!({ "genesys": { "loginClusterPattern": "genesys_login" } })
    }

    /// The default filter configuration with `overrides` merged in (objects merge
    /// field by field; anything else replaces).
    pub fn filter_config_with(overrides: serde_json::Value) -> serde_json::Value {
        let mut config = Self::default_filter_config();
        merge_json(&mut config, overrides);
        config
    }

    /// Starts Envoy (`--concurrency` workers) with `filter_config` and waits until it is
    /// live, loading the build `$TOKENGATE_FILTER` names.
    pub async fn start(
        dir: &Path,
        upstreams: &EnvoyUpstreams,
        filter_config: &serde_json::Value,
        concurrency: u32,
    ) -> Envoy {
        let build = FilterBuild::from_env();
        Self::start_build(build, dir, upstreams, filter_config, concurrency).await
    }

    /// Starts Envoy like [`Envoy::start`], loading `build` (the benchmarks measure both).
    pub async fn start_build(
        build: FilterBuild,
        dir: &Path,
        upstreams: &EnvoyUpstreams,
        filter_config: &serde_json::Value,
        concurrency: u32,
    ) -> Envoy {
        let (process, port, admin_port) =
            Self::spawn_live(build, dir, upstreams, filter_config, concurrency, None).await;
        Envoy {
            port,
            admin_port,
            process,
            hot_restart: None,
            build,
        }
    }

    /// Starts Envoy like [`Envoy::start`], but as epoch 0 of a hot restart: see
    /// [`Envoy::hot_restart`].
    pub async fn start_hot_restartable(
        dir: &Path,
        upstreams: &EnvoyUpstreams,
        filter_config: &serde_json::Value,
        concurrency: u32,
    ) -> Envoy {
        let build = FilterBuild::from_env();
        let (process, port, admin_port) =
            Self::spawn_live(build, dir, upstreams, filter_config, concurrency, Some(0)).await;
        let hot_restart = HotRestart {
            dir: dir.to_path_buf(),
            config: dir.join(format!("envoy-{port}.yaml")),
            concurrency,
            base_id: admin_port,
            build,
            epoch: 0,
        };
        Envoy {
            port,
            admin_port,
            process,
            hot_restart: Some(hot_restart),
            build,
        }
    }

    /// Hot restart: starts the next epoch with the same configuration and waits until it
    /// serves the listener and the admin port. The previous epoch drains for 1 s, closing
    /// each connection after its next response, and exits 3 s after the new one started;
    /// it is returned so that it keeps running until then (dropping it kills it).
    pub async fn hot_restart(&mut self) -> Process {
        let Some(restart) = self.hot_restart.as_mut() else {
            panic!("this Envoy was started with hot restart disabled");
        };
        restart.epoch += 1;
        let command = Self::command(
            &restart.config,
            restart.build,
            restart.concurrency,
            restart.base_id,
            Some(restart.epoch),
        );
        let log = restart
            .dir
            .join(format!("envoy-{}-epoch-{}.log", self.port, restart.epoch));
        let epoch = restart.epoch;
        let mut previous = std::mem::replace(
            &mut self.process,
            Process::spawn(&format!("envoy epoch {epoch}"), command, log),
        );
        let server_info = format!("http://127.0.0.1:{}/server_info", self.admin_port);
        let serving = format!("\"restart_epoch\": {epoch},");
        let started = Instant::now();
        loop {
            let info = match reqwest::get(&server_info).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if info.contains(&serving) && info.contains("\"state\": \"LIVE\"") {
                break;
            }
            self.process.assert_running();
            previous.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Envoy epoch {epoch} not live after 30 s:\n{}",
                self.process.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        previous
    }

    /// Spawns Envoy (see [`Envoy::spawn`]) and waits until it is live. The ports are
    /// free when chosen, but a process started by a concurrent test may bind one before
    /// Envoy does: then Envoy exits at once and is started again on other ports.
    async fn spawn_live(
        build: FilterBuild,
        dir: &Path,
        upstreams: &EnvoyUpstreams,
        filter_config: &serde_json::Value,
        concurrency: u32,
        restart_epoch: Option<u32>,
    ) -> (Process, u16, u16) {
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            let (mut process, port, admin_port) = Self::spawn(
                build,
                dir,
                upstreams,
                filter_config,
                concurrency,
                restart_epoch,
            );
            if Self::wait_live(&mut process, admin_port).await {
                return (process, port, admin_port);
            }
            let log = process.log_text();
            assert!(
                attempt < ATTEMPTS && log.contains("Address already in use"),
                "envoy exited before going live:\n{}",
                process.log_tail(40)
            );
            attempt += 1;
        }
    }

    /// Waits until the Envoy just started answers `LIVE` on its admin port (30 s at
    /// most); `false` when it exits first.
    async fn wait_live(process: &mut Process, admin_port: u16) -> bool {
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let started = Instant::now();
        while !answers(
            admin,
            b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            b"LIVE",
        ) {
            if !process.is_running() {
                return false;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Envoy not live after 30 s:\n{}",
                process.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Starts Envoy with a filter configuration it must refuse: waits for Envoy to
    /// exit (at most 30 s) and returns its log. Fails if Envoy goes live instead.
    pub async fn start_expecting_rejection(
        dir: &Path,
        upstreams: &EnvoyUpstreams,
        filter_config: &serde_json::Value,
    ) -> String {
        let (mut process, _, admin_port) = Self::spawn(
            FilterBuild::from_env(),
            dir,
            upstreams,
            filter_config,
            1,
            None,
        );
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let started = Instant::now();
        while process.is_running() {
            assert!(
                !answers(
                    admin,
                    b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    b"LIVE"
                ),
                "Envoy went live with an invalid filter configuration"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Envoy neither failed nor went live"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process.log_text()
    }

    /// Renders the configuration and starts the process (as `restart_epoch` of a hot
    /// restart, or with hot restart disabled); returns it with its listener and admin ports.
    fn spawn(
        build: FilterBuild,
        dir: &Path,
        upstreams: &EnvoyUpstreams,
        filter_config: &serde_json::Value,
        concurrency: u32,
        restart_epoch: Option<u32>,
    ) -> (Process, u16, u16) {
        let binary = envoy_binary();
        assert!(
            binary.exists(),
            "no Envoy at {}: run scripts/setup",
            binary.display()
        );
        build.assert_built();
        let (port, admin_port) = (free_port(), free_port());
        let config_path = dir.join(format!("envoy-{port}.yaml"));
        let rendered = render_envoy_config(
            &EnvoyPorts {
                listen: port,
                admin: admin_port,
            },
            upstreams,
            build,
            filter_config,
        );
        std::fs::write(&config_path, rendered)
            .unwrap_or_else(|e| panic!("cannot write Envoy config: {e}"));
        let command = Self::command(&config_path, build, concurrency, admin_port, restart_epoch);
        let process = Process::spawn("envoy", command, dir.join(format!("envoy-{port}.log")));
        (process, port, admin_port)
    }

    /// The Envoy command line for a rendered configuration. Envoys on one machine need
    /// distinct base ids (their admin ports are), the epochs of one hot restart the same.
    fn command(
        config_path: &Path,
        build: FilterBuild,
        concurrency: u32,
        base_id: u16,
        restart_epoch: Option<u32>,
    ) -> Command {
        let mut command = Command::new(envoy_binary());
        if build == FilterBuild::Native {
            command.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", native_module_dir());
        }
        command.arg("-c").arg(config_path).args([
            "--concurrency",
            &concurrency.to_string(),
            "--base-id",
            &base_id.to_string(),
        ]);
        match restart_epoch {
            // Each epoch drains as the parent of the next: for 1 s, closing every HTTP/1
            // connection after its next response (`immediate`), so clients move to the
            // new epoch before it tells this one to exit (3 s after it started).
            Some(epoch) => command.args([
                "--restart-epoch",
                &epoch.to_string(),
                "--drain-time-s",
                "1",
                "--drain-strategy",
                "immediate",
                "--parent-shutdown-time-s",
                "3",
            ]),
            None => command.arg("--disable-hot-restart"),
        };
        command.args(envoy_log_args());
        command
    }

    /// The base URL of the listener.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The value of counter `name` in `/stats`; panics when Envoy has no such stat. The
    /// filter's own stats are named without the prefix `/stats` shows before them, which
    /// depends on the build (`wasmcustom.`, `dynamicmodulescustom.`: see
    /// [`FilterBuild::stat_prefix`]).
    pub async fn stat(&self, name: &str) -> u64 {
        let prefix = self.build.stat_prefix();
        let url = format!("http://127.0.0.1:{}/stats?filter={}", self.admin_port, name);
        let text = match reqwest::get(&url).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(error) => panic!("Envoy admin {url}: {error}"),
        };
        let value = text.lines().find_map(|line| {
            let line = line.strip_prefix(prefix).unwrap_or(line);
            line.strip_prefix(&format!("{name}: "))
        });
        match value.map(|value| value.trim().parse()) {
            Some(Ok(value)) => value,
            Some(Err(error)) => panic!("Envoy stat {name} is not a number: {error}"),
            // The filter defines every stat at load, so a missing one is a typo in the
            // test (or a stat the filter lost): never read it as 0.
            None => panic!("Envoy has no stat {name}; it has:\n{text}"),
        }
    }
}

fn merge_json(base: &mut serde_json::Value, overrides: serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides)) => {
            for (key, value) in overrides {
                merge_json(base.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (base, overrides) => *base = overrides,
    }
}

/// The two ports of one Envoy.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyPorts {
    /// Listener.
    pub listen: u16,
    /// Admin.
    pub admin: u16,
}

/// Reads a template of the workspace.
fn read_template(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The placeholder line of `envoy/local.yaml.tmpl` that the filter block replaces.
const FILTER_PLACEHOLDER: &str = "{{TOKENGATE_FILTER}}";

/// Renders `envoy/local.yaml.tmpl` with the filter block of `build`, for the given
/// ports and filter configuration.
pub fn render_envoy_config(
    ports: &EnvoyPorts,
    upstreams: &EnvoyUpstreams,
    build: FilterBuild,
    filter_config: &serde_json::Value,
) -> String {
    let stack = read_template("envoy/local.yaml.tmpl");
    let block = read_template(build.template());
    // The block goes in at the placeholder's indentation, line by line.
    let template: String = stack
        .lines()
        .flat_map(|line| match line.split_once(FILTER_PLACEHOLDER) {
            Some((indent, _)) => block
                .lines()
                .map(|block_line| format!("{indent}{block_line}\n"))
                .collect::<Vec<_>>(),
            None => vec![format!("{line}\n")],
        })
        .collect();
    assert!(
        stack.contains(FILTER_PLACEHOLDER),
        "envoy/local.yaml.tmpl has no {FILTER_PLACEHOLDER} line"
    );
    // The configuration goes in as a JSON string inside YAML: a JSON string literal is valid YAML.
    let config_literal = serde_json::to_string(&filter_config.to_string()).unwrap_or_default();
    [
        ("{{ADMIN_PORT}}", ports.admin.to_string()),
        ("{{LISTEN_PORT}}", ports.listen.to_string()),
        ("{{WASM_PATH}}", wasm_module().display().to_string()),
        ("{{PLUGIN_CONFIG}}", config_literal),
        ("{{COMPANION_PORT}}", upstreams.companion_port.to_string()),
        (
            "{{TENANT_SERVICE_PORT}}",
            upstreams.tenant_service.port().to_string(),
        ),
        ("{{LOGIN_PORT}}", upstreams.login.port().to_string()),
        ("{{ECHO_PORT}}", upstreams.echo.port().to_string()),
        (
            "{{IDP_PORT}}",
            upstreams.idp.unwrap_or(upstreams.login).port().to_string(),
        ),
    ]
    .iter()
    .fold(template, |text, (placeholder, value)| {
        text.replace(placeholder, value)
    })
}

/// The whole pipeline on one machine: Redis, one companion, the stand-ins, one Envoy.
#[derive(Debug)]
pub struct Stack {
    /// The stand-in Tenant Service, login and echo app (in this process).
    pub standins: StandIns,
    /// Envoy with the filter (declared before the companion and Redis so it stops first).
    pub envoy: Envoy,
    /// The companion.
    pub companion: Companion,
    /// Redis.
    pub redis: Redis,
    /// Searches the logs for leaked secrets once the processes above have stopped.
    pub leak_scan: LeakScan,
    /// Logs and rendered configs; removed when the stack is dropped.
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// Starts everything with the default fixture and filter configuration.
    pub async fn start() -> Stack {
        Self::start_with(Envoy::default_filter_config(), 2).await
    }

    /// Starts everything with a given filter configuration and Envoy worker count.
    pub async fn start_with(filter_config: serde_json::Value, concurrency: u32) -> Stack {
        let Cluster {
            standins,
            mut envoys,
            mut companions,
            redis,
            leak_scan,
            dir,
        } = Cluster::start(1, concurrency, 1, &filter_config, &[]).await;
        Stack {
            standins,
            envoy: envoys.remove(0),
            companion: companions.remove(0),
            redis,
            leak_scan,
            dir,
        }
    }
}

/// What one request through Envoy came back with.
#[derive(Debug)]
pub struct Answer {
    /// The status the client saw.
    pub status: u16,
    /// The JSON body (the echo upstream's report, or an error body); `Null` if not JSON.
    pub body: serde_json::Value,
    /// The `authorization` header the echo upstream received, if the request got there.
    pub authorization: Option<String>,
}

impl Stack {
    /// Sends `GET path` for `tenant` (in `x-tenant-id`) through Envoy.
    pub async fn get(&self, path: &str, tenant: &str) -> Answer {
        self.envoy.get(path, tenant).await
    }

    /// `Bearer <token>` for every token the stand-in login issued to `tenant`, in order.
    pub fn bearers(&self, tenant: &str) -> Vec<String> {
        self.standins
            .tokens_issued_to(tenant)
            .into_iter()
            .map(|token| format!("Bearer {token}"))
            .collect()
    }
}

impl Envoy {
    /// Sends `GET path` for `tenant` (in `x-tenant-id`) through this Envoy.
    pub async fn get(&self, path: &str, tenant: &str) -> Answer {
        self.get_with_headers(path, tenant, &[]).await
    }

    /// Sends `GET path` for `tenant` (in `x-tenant-id`), with `headers` too, through
    /// this Envoy.
    pub async fn get_with_headers(
        &self,
        path: &str,
        tenant: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = reqwest::Client::new()
            .get(format!("{}{path}", self.url()))
            .header("x-tenant-id", tenant);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("request through Envoy failed: {e}"));
        let received = receive(response).await;
        let body = received.json();
        let authorization = body["headers"]["authorization"].as_str().map(str::to_owned);
        Answer {
            status: received.status,
            body,
            authorization,
        }
    }
}

/// Several Envoys and companions sharing one Redis, like a fleet of gateways.
/// Envoy `i` talks to companion `i % companions`.
#[derive(Debug)]
pub struct Cluster {
    /// The stand-in Tenant Service, login and echo app (in this process).
    pub standins: StandIns,
    /// The Envoys (declared first so they stop first).
    pub envoys: Vec<Envoy>,
    /// The companions.
    pub companions: Vec<Companion>,
    /// The one Redis.
    pub redis: Redis,
    /// Searches the logs for leaked secrets once the processes above have stopped.
    pub leak_scan: LeakScan,
    /// Logs and rendered configs; removed when the cluster is dropped.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `envoys` Envoys with `concurrency` workers each and `companions`
    /// companions (with `companion_args`), all with `filter_config`.
    pub async fn start(
        envoys: usize,
        concurrency: u32,
        companions: usize,
        filter_config: &serde_json::Value,
        companion_args: &[&str],
    ) -> Cluster {
        let fixture = Fixture::default_fixture();
        Self::start_with_fixture(
            fixture,
            None,
            envoys,
            concurrency,
            companions,
            filter_config,
            companion_args,
        )
        .await
    }

    /// Like [`Cluster::start`], with the stand-ins serving `fixture` (e.g. with
    /// generated tenants, for tests that need many cold ones), and
    /// the Envoys' `oauth_idp` cluster at `idp` (a real authorization server the test
    /// started; `None`: the login stand-in).
    pub async fn start_with_fixture(
        fixture: Fixture,
        idp: Option<SocketAddr>,
        envoys: usize,
        concurrency: u32,
        companions: usize,
        filter_config: &serde_json::Value,
        companion_args: &[&str],
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-cluster-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
        let standins = StandIns::start(fixture)
            .await
            .unwrap_or_else(|e| panic!("cannot start the stand-ins: {e}"));
        let redis = Redis::start(dir.path()).await;
        // The companions can also fetch (their `/auth/token`, for `fetch: companion`),
        // from the same stand-ins.
        let tenant_service_url = format!("http://{}", standins.tenant_service);
        let login_url_template = format!("http://{}", standins.login);
        let mut args = vec![
            "--tenant-service-url",
            tenant_service_url.as_str(),
            "--genesys-login-url-template",
            login_url_template.as_str(),
        ];
        args.extend_from_slice(companion_args);
        let mut started_companions = Vec::new();
        for _ in 0..companions.max(1) {
            started_companions.push(Companion::start(dir.path(), &redis.url(), &args).await);
        }
        let mut started_envoys = Vec::new();
        for index in 0..envoys {
            let upstreams = EnvoyUpstreams {
                companion_port: started_companions[index % started_companions.len()].port,
                tenant_service: standins.tenant_service,
                login: standins.login,
                echo: standins.echo,
                idp,
            };
            started_envoys
                .push(Envoy::start(dir.path(), &upstreams, filter_config, concurrency).await);
        }
        Cluster {
            leak_scan: LeakScan::new(dir.path(), standins.secrets()),
            standins,
            envoys: started_envoys,
            companions: started_companions,
            redis,
            dir,
        }
    }

    /// Sum of stat `name` over every Envoy.
    pub async fn stat(&self, name: &str) -> u64 {
        let mut total = 0;
        for envoy in &self.envoys {
            total += envoy.stat(name).await;
        }
        total
    }
}
