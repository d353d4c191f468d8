//! The hit-path Envoys: `bench/envoy/hitpath.yaml.tmpl` with one of three filter
//! blocks, started with `--concurrency 1`, optionally pinned to CPUs with `taskset`.
//! Unlike the test harness's Envoy, it keeps the process id, to read the process's
//! memory and CPU time from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokengate_tests::harness::{envoy_binary, free_port, wasm_module, workspace_root};
use tokengate_tests::standins::GenesysClient;

const BASE_TEMPLATE: &str = include_str!("../envoy/hitpath.yaml.tmpl");
const CREDENTIAL_INJECTOR: &str = include_str!("../envoy/credential-injector.yaml.tmpl");
const WASM_FILTER: &str = include_str!("../envoy/wasm-filter.yaml.tmpl");
const NATIVE_FILTER: &str = include_str!("../envoy/native-filter.yaml.tmpl");

/// Where the native build is: `$TOKENGATE_NATIVE_DIR`, or the optimised build
/// (`cargo build --profile native -p tokengate-native`) that `scripts/bench` makes.
pub fn native_module_dir() -> PathBuf {
    std::env::var_os("TOKENGATE_NATIVE_DIR")
        .map_or_else(|| workspace_root().join("target/native"), PathBuf::from)
}

/// Whether the native build is there to be measured.
pub fn native_module_built() -> bool {
    native_module_dir().join("libtokengate_native.so").exists()
}

/// Which filter the Envoy runs in front of the router.
#[derive(Debug, Clone)]
pub enum Filter {
    /// None: plain Envoy.
    None,
    /// Envoy's `credential_injector` with `envoy.http.injected_credentials.oauth2`,
    /// logging in as this client.
    CredentialInjector(GenesysClient),
    /// tokengate with this filter configuration.
    Tokengate(serde_json::Value),
    /// tokengate's native build (an Envoy dynamic module) with this filter configuration.
    Native(serde_json::Value),
    /// The minimal dynamic module of `bench/native-floor` (`libnative_floor.so`), from
    /// this folder.
    OtherNative {
        /// The folder holding `libnative_floor.so`.
        dir: PathBuf,
    },
    /// Another proxy-wasm module (the minimal filter of `bench/wasm-floor`) with this
    /// configuration string.
    OtherWasm {
        /// The module.
        module: PathBuf,
        /// Its configuration.
        configuration: String,
    },
}

/// What every hit-path Envoy routes to.
#[derive(Debug, Clone, Copy)]
pub struct Upstreams {
    /// The echo upstream (`app` cluster).
    pub echo: SocketAddr,
    /// The companion.
    pub companion: SocketAddr,
    /// The stand-in Tenant Service.
    pub tenant_service: SocketAddr,
    /// The stand-in Genesys login.
    pub login: SocketAddr,
}

/// A running hit-path Envoy; killed when dropped.
#[derive(Debug)]
pub struct BenchEnvoy {
    /// Short name for reports, e.g. `a`.
    pub name: String,
    /// Listener port.
    pub port: u16,
    /// Admin port.
    pub admin_port: u16,
    child: Child,
    log: PathBuf,
}

/// Renders the configuration of one hit-path Envoy.
pub fn render(
    listen: u16,
    admin: u16,
    filter: &Filter,
    upstreams: &Upstreams,
    wasm: &Path,
) -> String {
    let (filters, client) = match filter {
        Filter::None => ("          []".to_owned(), None),
        Filter::CredentialInjector(client) => (CREDENTIAL_INJECTOR.to_owned(), Some(client)),
        Filter::Tokengate(config) => (wasm_block("tokengate", wasm, &config.to_string()), None),
        Filter::Native(config) => {
            let literal = serde_json::to_string(&config.to_string()).unwrap_or_default();
            let block = NATIVE_FILTER.replace("{{MODULE}}", "tokengate_native");
            (block.replace("{{PLUGIN_CONFIG}}", &literal), None)
        }
        Filter::OtherNative { .. } => {
            let block = NATIVE_FILTER.replace("{{MODULE}}", "native_floor");
            (block.replace("{{PLUGIN_CONFIG}}", "\"\""), None)
        }
        Filter::OtherWasm {
            module,
            configuration,
        } => (wasm_block("wasm_floor", module, configuration), None),
    };
    // Plain Envoy: the list holds the router only, so drop the placeholder line.
    let base = if matches!(filter, Filter::None) {
        BASE_TEMPLATE.replace("{{HTTP_FILTERS}}\n", "")
    } else {
        BASE_TEMPLATE.replace("{{HTTP_FILTERS}}", filters.trim_end())
    };
    let (client_id, secret, host) = client.map_or_else(
        || (String::new(), "unused".to_owned(), String::new()),
        |client| {
            (
                client.client_id.clone(),
                client.client_secret.clone(),
                client.login_host().unwrap_or_default(),
            )
        },
    );
    [
        ("{{ADMIN_PORT}}", admin.to_string()),
        ("{{LISTEN_PORT}}", listen.to_string()),
        ("{{ECHO_PORT}}", upstreams.echo.port().to_string()),
        ("{{COMPANION_PORT}}", upstreams.companion.port().to_string()),
        (
            "{{TENANT_SERVICE_PORT}}",
            upstreams.tenant_service.port().to_string(),
        ),
        ("{{LOGIN_PORT}}", upstreams.login.port().to_string()),
        ("{{LOGIN_CLIENT_ID}}", client_id),
        ("{{LOGIN_CLIENT_SECRET}}", secret),
        ("{{LOGIN_HOST}}", host),
    ]
    .iter()
    .fold(base, |text, (placeholder, value)| {
        text.replace(placeholder, value)
    })
}

/// The proxy-wasm filter block for `module` with a configuration string.
fn wasm_block(name: &str, module: &Path, configuration: &str) -> String {
    let literal = serde_json::to_string(configuration).unwrap_or_default();
    WASM_FILTER
        .replace("{{FILTER_NAME}}", name)
        .replace("{{WASM_PATH}}", &module.display().to_string())
        .replace("{{PLUGIN_CONFIG}}", &literal)
}

impl BenchEnvoy {
    /// Starts Envoy with one worker (pinned to `cpus` when given, e.g. `"0"`) and waits
    /// until its admin interface says `LIVE`.
    pub async fn start(
        dir: &Path,
        name: &str,
        filter: &Filter,
        upstreams: &Upstreams,
        cpus: Option<&str>,
    ) -> Result<BenchEnvoy, String> {
        let (port, admin_port) = (free_port(), free_port());
        let config = render(port, admin_port, filter, upstreams, &wasm_module());
        let config_path = dir.join(format!("envoy-{name}.yaml"));
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let module_dir = match filter {
            Filter::OtherNative { dir } => dir.clone(),
            _ => native_module_dir(),
        };
        let log = dir.join(format!("envoy-{name}.log"));
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.args(["-c", cpus]).arg(envoy_binary());
                command
            }
            None => Command::new(envoy_binary()),
        };
        command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "1", "--log-level", "warn"])
            .args([
                "--base-id",
                &admin_port.to_string(),
                "--disable-hot-restart",
            ])
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start Envoy {name}: {e}"))?;
        let mut envoy = BenchEnvoy {
            name: name.to_owned(),
            port,
            admin_port,
            child,
            log,
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!(
                    "Envoy {name} exited with {status}:\n{}",
                    envoy.log_tail(30)
                ));
            }
            if envoy
                .admin("/ready")
                .await
                .is_ok_and(|text| text.contains("LIVE"))
            {
                return Ok(envoy);
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("Envoy {name} not live after 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The listener's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The process id (Envoy itself: `taskset` and the `.venv` wrapper exec it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A page of the admin interface.
    pub async fn admin(&self, path: &str) -> Result<String, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        let response = reqwest::get(&url).await.map_err(|e| e.to_string())?;
        response.text().await.map_err(|e| e.to_string())
    }

    /// A counter from `/stats` (0 when absent); names as `/stats` shows them.
    pub async fn counter(&self, name: &str) -> u64 {
        let text = self
            .admin(&format!("/stats?filter={name}"))
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for BenchEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) a process has used, in microseconds, from
/// `/proc/<pid>/stat` (assumes the usual 100 clock ticks per second).
pub fn cpu_time_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10_000)
}

/// Busy and stolen time of one CPU so far, in microseconds, from `/proc/stat`
/// (`cpuN` line; busy = user + nice + system + irq + softirq; 100 ticks per second).
pub fn cpu_busy_steal_us(cpu: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let prefix = format!("cpu{cpu} ");
    let line = stat.lines().find(|line| line.starts_with(&prefix))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    Some((busy * 10_000, field(7) * 10_000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_tests::standins::Fixture;

    fn upstreams() -> Upstreams {
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Upstreams {
            echo: addr(1001),
            companion: addr(1002),
            tenant_service: addr(1003),
            login: addr(1004),
        }
    }

    fn filters_of(yaml: &str) -> Vec<String> {
        let doc: serde_norway::Value = serde_norway::from_str(yaml).expect("valid YAML");
        let filters = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"];
        filters
            .as_sequence()
            .expect("http_filters")
            .iter()
            .map(|f| f["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn the_three_configurations_differ_only_in_their_filter() {
        let acme = Fixture::default_fixture()
            .genesys_client("acme")
            .cloned()
            .expect("acme");
        let wasm = Path::new("/x/tokengate.wasm");
        let plain = render(10, 11, &Filter::None, &upstreams(), wasm);
        let injector = render(
            10,
            11,
            &Filter::CredentialInjector(acme),
            &upstreams(),
            wasm,
        );
        let tokengate = render(
            10,
            11,
            &Filter::Tokengate(
                serde_json::json!({"genesys": {"loginClusterPattern": "genesys_login"}}),
            ),
            &upstreams(),
            wasm,
        );
        for yaml in [&plain, &injector, &tokengate] {
            assert!(!yaml.contains("{{"), "placeholder left:\n{yaml}");
        }
        assert_eq!(filters_of(&plain), ["envoy.filters.http.router"]);
        assert_eq!(
            filters_of(&injector),
            [
                "envoy.filters.http.credential_injector",
                "envoy.filters.http.router"
            ]
        );
        assert_eq!(
            filters_of(&tokengate),
            ["tokengate", "envoy.filters.http.router"]
        );
        assert!(injector.contains(r#"uri: "http://login.mypurecloud.ie/oauth/token""#));
        assert!(injector.contains(r#"client_id: "acme-client""#));
        assert!(tokengate.contains(r#"filename: "/x/tokengate.wasm""#));
        let strip = |yaml: &str| {
            let doc: serde_norway::Value = serde_norway::from_str(yaml).expect("yaml");
            doc["static_resources"]["clusters"].clone()
        };
        assert_eq!(strip(&plain), strip(&tokengate));
    }
}
