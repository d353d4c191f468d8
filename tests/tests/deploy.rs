//! The deployment artifacts: the Envoy configurations in `envoy/`, the compose stack,
//! the Dockerfiles, the Istio manifests and the Wasm OCI image in `deploy/`.
//!
//! - Every Envoy configuration is checked by the real binary, `envoy --mode validate`,
//!   with the module path pointed at the built `target/tokengate.wasm`. Validation loads
//!   the module and runs the filter's own configuration check (an unknown field fails
//!   it), reads the CA bundle the TLS clusters name, and does not resolve DNS: the
//!   LOGICAL_DNS and STRICT_DNS names validate offline. Two negative controls prove that
//!   a broken configuration fails.
//! - The production chain runs end to end: `envoy/production.yaml` with its upstreams
//!   pointed at the stand-ins and the JWT keys made local, so a client that forges
//!   `x-tenant-id` is shown to get its JWT's tenant, not the forged one.
//! - The compose file and the Dockerfiles are parsed and checked for consistency with each
//!   other and with the Envoy configuration that `deploy/envoy-entrypoint` renders for
//!   both builds (tests/tests/containers.rs runs them); the Istio manifests (no cluster
//!   here) with the README and the filter's region table.
//! - `deploy/package-wasm-oci` runs and its tarball is checked digest by digest.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use serde::Deserialize as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokengate::config::{FilterConfig, Mode};
use tokengate_core::Provider;
use tokengate_core::regions::GENESYS_REGIONS;
use tokengate_tests::harness::{
    Companion, Envoy, EnvoyPorts, EnvoyUpstreams, FilterBuild, Process, Redis, envoy_binary,
    envoy_log_args, free_port, native_module_dir, render_envoy_config, wasm_module, workspace_root,
};
use tokengate_tests::leak_scan::{LeakScan, receive};
use tokengate_tests::standins::{Endpoint, Fixture, Ports, StandIns};

/// Where the shipped configurations load the module from; replaced for validation.
const WASM_PLACEHOLDER: &str = "/etc/envoy/tokengate.wasm";
/// The CA bundle the TLS clusters trust (Debian's; validation reads it).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The release build of the companion, as the README documents it.
const COMPANION_BUILD: &str = "cargo build --release -p tokengate-companion";
/// The header the tenant travels in, from jwt_authn to the filter.
const TENANT_HEADER: &str = "x-tenant-id";

// ---------------------------------------------------------------------------------
// Files, YAML and Envoy's JSON shapes.
// ---------------------------------------------------------------------------------

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(text: &str, what: &str) -> Value {
    serde_norway::from_str(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"))
}

/// Every document of a multi-document YAML file (empty ones dropped).
fn yaml_documents(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{what}: a document is not valid YAML: {e}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// A shipped Envoy configuration with the module path pointed at the built module.
fn rendered(relative: &str) -> String {
    let text = read(relative);
    assert!(
        text.contains(WASM_PLACEHOLDER),
        "{relative} should load the module from {WASM_PLACEHOLDER}"
    );
    text.replace(WASM_PLACEHOLDER, &wasm_module().display().to_string())
}

/// The companion API key the compose renderings below are given (any 16+ characters).
const COMPOSE_TEST_KEY: &str = "0123456789abcdef0123456789abcdef";

/// `deploy/envoy-entrypoint` run on the host: Envoy's configuration as the compose
/// stack's Envoy container renders it for `build`, with the compose file's filter
/// configuration, a test key and the built wasm module's path; Err(its stderr) when the
/// entrypoint refuses.
fn compose_rendering(build: &str, plugin_config: &str, key: &str) -> Result<String, String> {
    let dir = tempfile::Builder::new()
        .prefix("tokengate-compose-render-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
    let key_file = dir.path().join("companion_api_key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap_or_else(|e| panic!("{e}"));
    let output_path = dir.path().join("envoy.yaml");
    let root = workspace_root();
    let result = Command::new(root.join("deploy/envoy-entrypoint"))
        .arg("true")
        .env(
            "TOKENGATE_ENVOY_TEMPLATE",
            root.join("envoy/compose.yaml.tmpl"),
        )
        .env("TOKENGATE_FILTER", build)
        .env("TOKENGATE_FILTER_TEMPLATES", root.join("envoy"))
        .env("TOKENGATE_WASM", wasm_module())
        .env("TOKENGATE_PLUGIN_CONFIG", plugin_config)
        .env("TOKENGATE_COMPANION_API_KEY_FILE", &key_file)
        .env("TOKENGATE_ENVOY_CONFIG", &output_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run deploy/envoy-entrypoint: {e}"));
    if result.status.success() {
        Ok(std::fs::read_to_string(&output_path).unwrap_or_else(|e| panic!("{e}")))
    } else {
        Err(String::from_utf8_lossy(&result.stderr).into_owned())
    }
}

/// The compose file's filter configuration (Envoy's TOKENGATE_PLUGIN_CONFIG).
fn compose_plugin_config() -> String {
    let compose = yaml(
        &read("deploy/docker-compose.yml"),
        "deploy/docker-compose.yml",
    );
    text(
        &compose,
        "/services/envoy/environment/TOKENGATE_PLUGIN_CONFIG",
    )
    .to_owned()
}

/// Envoy's configuration in the compose stack, for `build` (`wasm` or `native`).
fn compose_rendered(build: &str) -> String {
    compose_rendering(build, &compose_plugin_config(), COMPOSE_TEST_KEY)
        .unwrap_or_else(|e| panic!("deploy/envoy-entrypoint refuses the compose stack: {e}"))
}

/// `envoy/local.yaml.tmpl` as the harness renders it for the wasm build, with dummy ports.
fn local_template_rendered() -> String {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    render_envoy_config(
        &EnvoyPorts {
            listen: 10000,
            admin: 9901,
        },
        &EnvoyUpstreams {
            companion_port: 7070,
            tenant_service: loopback(18081),
            login: loopback(18082),
            echo: loopback(18083),
            idp: None,
        },
        // The shipped configurations load the wasm build; the native build's block of
        // this template is validated by tests/tests/native.rs.
        FilterBuild::Wasm,
        &Envoy::default_filter_config(),
    )
}

/// Every Envoy configuration the project ships, parsed: (name, configuration).
fn shipped_envoy_configs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "envoy/production.yaml",
            yaml(&read("envoy/production.yaml"), "envoy/production.yaml"),
        ),
        (
            "envoy/jwt-authn.yaml",
            yaml(&read("envoy/jwt-authn.yaml"), "envoy/jwt-authn.yaml"),
        ),
        (
            "envoy/compose.yaml.tmpl",
            yaml(&compose_rendered("wasm"), "envoy/compose.yaml.tmpl"),
        ),
        (
            "envoy/local.yaml.tmpl",
            yaml(&local_template_rendered(), "envoy/local.yaml.tmpl"),
        ),
    ]
}

fn get<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value.pointer(pointer).unwrap_or_else(|| {
        let mut shown = value.to_string();
        shown.truncate(300);
        panic!("no {pointer} in {shown}")
    })
}

fn array<'a>(value: &'a Value, pointer: &str) -> &'a Vec<Value> {
    get(value, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list"))
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    get(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string"))
}

fn clusters(config: &Value) -> &Vec<Value> {
    array(config, "/static_resources/clusters")
}

fn cluster<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    clusters(config).iter().find(|c| c["name"] == name)
}

fn cluster_names(config: &Value) -> BTreeSet<String> {
    clusters(config)
        .iter()
        .map(|c| text(c, "/name").to_owned())
        .collect()
}

/// The one endpoint of a cluster: (address, port).
fn endpoint(cluster: &Value) -> (String, u64) {
    let name = text(cluster, "/name");
    let localities = array(cluster, "/load_assignment/endpoints");
    assert_eq!(localities.len(), 1, "cluster {name}: one locality");
    let endpoints = array(&localities[0], "/lb_endpoints");
    assert_eq!(endpoints.len(), 1, "cluster {name}: one endpoint");
    let socket = get(&endpoints[0], "/endpoint/address/socket_address");
    let port = socket["port_value"]
        .as_u64()
        .unwrap_or_else(|| panic!("cluster {name}: no port"));
    (text(socket, "/address").to_owned(), port)
}

fn listener<'a>(config: &'a Value, name: &str) -> &'a Value {
    array(config, "/static_resources/listeners")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

fn http_connection_manager(listener: &Value) -> &Value {
    let filters = array(listener, "/filter_chains/0/filters");
    let hcm = filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        .unwrap_or_else(|| {
            panic!(
                "listener {} has no HTTP connection manager",
                listener["name"]
            )
        });
    get(hcm, "/typed_config")
}

fn http_filter_names(hcm: &Value) -> Vec<String> {
    array(hcm, "/http_filters")
        .iter()
        .map(|f| text(f, "/name").to_owned())
        .collect()
}

fn is_wasm(filter: &Value) -> bool {
    filter["typed_config"]["@type"]
        == "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
}

fn routes(hcm: &Value) -> Vec<&Value> {
    array(hcm, "/route_config/virtual_hosts")
        .iter()
        .flat_map(|host| array(host, "/routes"))
        .collect()
}

/// Every tokengate filter of every listener: (listener, filter name, configuration text).
fn wasm_filters(config: &Value) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for listener in array(config, "/static_resources/listeners") {
        let hcm = http_connection_manager(listener);
        for filter in array(hcm, "/http_filters").iter().filter(|f| is_wasm(f)) {
            found.push((
                text(listener, "/name").to_owned(),
                text(filter, "/name").to_owned(),
                text(filter, "/typed_config/config/configuration/value").to_owned(),
            ));
        }
    }
    found
}

fn parse_filter_config(where_: &str, json_text: &str) -> FilterConfig {
    FilterConfig::parse(json_text.as_bytes())
        .unwrap_or_else(|e| panic!("{where_}: the filter rejects its configuration: {e}"))
}

/// The cluster is TLS to `host` with SNI and the server certificate checked.
fn assert_verified_tls(cluster: &Value, host: &str) {
    let name = text(cluster, "/name");
    assert_eq!(
        cluster["transport_socket"]["name"], "envoy.transport_sockets.tls",
        "cluster {name} is TLS"
    );
    let tls = get(cluster, "/transport_socket/typed_config");
    assert_eq!(
        tls["@type"],
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "cluster {name}"
    );
    assert_eq!(tls["sni"], host, "cluster {name}: SNI");
    let validation = get(tls, "/common_tls_context/validation_context");
    assert_eq!(
        validation["trusted_ca"]["filename"], CA_BUNDLE,
        "cluster {name}: server certificate checked against the CA bundle"
    );
    assert_eq!(
        validation["match_typed_subject_alt_names"],
        json!([{ "san_type": "DNS", "matcher": { "exact": host } }]),
        "cluster {name}: server certificate checked against its host name"
    );
}

// ---------------------------------------------------------------------------------
// `envoy --mode validate`.
// ---------------------------------------------------------------------------------

/// Runs `envoy --mode validate` on `config`: Ok(log) when Envoy accepts it.
fn envoy_validate(name: &str, config: &str) -> Result<String, String> {
    let binary = envoy_binary();
    assert!(
        binary.exists(),
        "no Envoy at {}: run scripts/setup",
        binary.display()
    );
    assert!(
        wasm_module().exists(),
        "no filter module at {}: run scripts/build-wasm",
        wasm_module().display()
    );
    if config.contains(CA_BUNDLE) {
        assert!(
            Path::new(CA_BUNDLE).exists(),
            "the TLS clusters trust {CA_BUNDLE}, which Envoy reads when validating: \
             install the ca-certificates package"
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("tokengate-validate-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
    let path = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
    let log_path = dir.path().join("validate.log");
    let log =
        std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("cannot create the log: {e}"));
    let log_err = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone the log handle: {e}"));
    let mut child = Command::new(&binary)
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&path)
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", native_module_dir())
        .args(["--log-level", "warn", "--disable-hot-restart", "--base-id"])
        .arg(free_port().to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot wait for Envoy: {e}"))
        {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("envoy --mode validate {name} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() && output.contains("OK") {
        Ok(output)
    } else {
        Err(format!("{status}\n{output}"))
    }
}

fn assert_valid(name: &str, config: &str) {
    if let Err(log) = envoy_validate(name, config) {
        panic!("envoy --mode validate rejects {name}:\n{log}");
    }
}

#[test]
fn production_config_is_valid_for_envoy() {
    assert_valid("production", &rendered("envoy/production.yaml"));
}

#[test]
fn jwt_authn_example_is_valid_for_envoy() {
    assert_valid("jwt-authn", &rendered("envoy/jwt-authn.yaml"));
}

#[test]
fn compose_config_is_valid_for_envoy_on_both_builds() {
    FilterBuild::Native.assert_built();
    for build in ["wasm", "native"] {
        let config = compose_rendered(build);
        assert!(
            config.contains(&format!("\"apiKey\": \"{COMPOSE_TEST_KEY}\"")),
            "{build}: the secret's key is the filter's companion.apiKey"
        );
        assert!(!config.contains("{{"), "{build}: a placeholder is left");
        assert_valid(&format!("compose-{build}"), &config);
    }
}

#[test]
fn envoy_entrypoint_refuses_a_bad_key_or_build() {
    let config = compose_plugin_config();
    for (build, key, refusal) in [
        ("wasm", "short", "16 to 256 characters"),
        (
            "wasm",
            "0123456789abcdef'; rm -rf /",
            "16 to 256 characters",
        ),
        ("lua", COMPOSE_TEST_KEY, "expected wasm or native"),
    ] {
        let error = compose_rendering(build, &config, key)
            .err()
            .unwrap_or_else(|| panic!("{build} with key {key:?} was rendered"));
        assert!(error.contains(refusal), "{build}, {key:?}: {error}");
    }
}

#[test]
fn local_template_is_valid_for_envoy() {
    assert_valid("local", &local_template_rendered());
}

/// Negative control: validation runs the filter's configuration check.
#[test]
fn validation_rejects_an_unknown_filter_field() {
    let good = rendered("envoy/production.yaml");
    let broken = good.replacen(
        "\"provider\": \"genesys\",",
        "\"provider\": \"genesys\", \"tenantHeadr\": \"x-tenant\",",
        1,
    );
    assert_ne!(
        good, broken,
        "the production filter configuration names its provider"
    );
    let log = envoy_validate("broken-filter", &broken)
        .err()
        .unwrap_or_else(|| panic!("Envoy accepted a filter configuration with an unknown field"));
    assert!(
        log.contains("invalid tokengate configuration at 'tenantHeadr'"),
        "the filter's own message names the field:\n{log}"
    );
}

/// Negative control: validation checks Envoy's own configuration too.
#[test]
fn validation_rejects_a_route_to_a_missing_cluster() {
    let good = rendered("envoy/production.yaml");
    let broken = good.replacen("cluster: whatsapp_graph", "cluster: no_such_cluster", 1);
    assert_ne!(good, broken, "production.yaml routes to whatsapp_graph");
    let log = envoy_validate("broken-route", &broken)
        .err()
        .unwrap_or_else(|| panic!("Envoy accepted a route to a cluster that does not exist"));
    assert!(log.contains("no_such_cluster"), "{log}");
}

// ---------------------------------------------------------------------------------
// The shape of the Envoy configurations.
// ---------------------------------------------------------------------------------

#[test]
fn production_has_a_verified_tls_cluster_per_genesys_region() {
    let config = yaml(&read("envoy/production.yaml"), "envoy/production.yaml");
    for (region, domain) in GENESYS_REGIONS {
        let name = format!("genesys_{region}");
        let host = format!("login.{domain}");
        let login = cluster(&config, &name)
            .unwrap_or_else(|| panic!("production.yaml has no cluster {name} for {host}"));
        assert_eq!(login["type"], "LOGICAL_DNS", "cluster {name}");
        assert_eq!(endpoint(login), (host.clone(), 443), "cluster {name}");
        assert_verified_tls(login, &host);
    }
    let regions: BTreeSet<String> = GENESYS_REGIONS
        .iter()
        .map(|(region, _)| format!("genesys_{region}"))
        .collect();
    let strays: Vec<String> = cluster_names(&config)
        .into_iter()
        .filter(|name| name.starts_with("genesys_") && !regions.contains(name))
        .collect();
    assert!(
        strays.is_empty(),
        "clusters for unknown regions: {strays:?}"
    );

    let graph = cluster(&config, "whatsapp_graph").unwrap_or_else(|| panic!("no whatsapp_graph"));
    assert_eq!(endpoint(graph), ("graph.facebook.com".to_owned(), 443));
    assert_verified_tls(graph, "graph.facebook.com");
}

/// No plaintext to port 443, no TLS without a certificate check, no admin off loopback.
#[test]
fn every_tls_cluster_checks_the_server_certificate_and_admin_is_loopback_only() {
    for (file, config) in shipped_envoy_configs() {
        assert_eq!(
            get(&config, "/admin/address/socket_address/address"),
            "127.0.0.1",
            "{file}: the admin interface listens on loopback only"
        );
        for cluster in clusters(&config) {
            let (host, port) = endpoint(cluster);
            if cluster.get("transport_socket").is_some() {
                assert_verified_tls(cluster, &host);
            } else {
                assert_ne!(
                    port, 443,
                    "{file}: cluster {} is plaintext to port 443",
                    cluster["name"]
                );
            }
        }
    }
}

/// Every filter configuration parses with the filter's own parser, and every cluster it
/// can call exists: the companion, the Tenant Service and the login cluster of every
/// region (jwt-authn.yaml, a short example, defines one region only).
#[test]
fn every_filter_configuration_parses_and_its_clusters_exist() {
    for (file, config) in shipped_envoy_configs() {
        let names = cluster_names(&config);
        let wasm = wasm_filters(&config);
        assert!(!wasm.is_empty(), "{file} has a tokengate filter");
        for (listener, filter, json_text) in wasm {
            let place = format!("{file}, listener {listener}, filter {filter}");
            let parsed = parse_filter_config(&place, &json_text);
            for needed in [&parsed.companion.cluster, &parsed.tenant_service.cluster] {
                assert!(
                    names.contains(needed),
                    "{place} calls cluster {needed}, which is missing"
                );
            }
            if parsed.provider == Provider::whatsapp() && parsed.mode == Mode::Inject {
                continue;
            }
            let regions: Vec<&str> = if file == "envoy/jwt-authn.yaml" {
                vec!["eu-west-1"]
            } else {
                GENESYS_REGIONS.iter().map(|(region, _)| *region).collect()
            };
            for region in regions {
                let login = parsed.login_cluster(region);
                assert!(
                    names.contains(&login),
                    "{place}: no login cluster {login} for {region}"
                );
            }
        }
    }
}

/// Header stripped first, then jwt_authn copies the verified claim, then tokengate reads it.
fn assert_tenant_from_jwt(file: &str, config: &Value) -> (Value, Value) {
    let hcm = http_connection_manager(listener(config, "ingress"));
    let filters = array(hcm, "/http_filters");
    let names = http_filter_names(hcm);
    let position = |name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{file}: no {name} in the ingress chain {names:?}"))
    };
    let strip = position("envoy.filters.http.header_mutation");
    let jwt = position("envoy.filters.http.jwt_authn");
    assert!(
        strip < jwt,
        "{file}: the client's {TENANT_HEADER} is removed before jwt_authn"
    );
    assert_eq!(
        get(&filters[strip], "/typed_config/mutations/request_mutations"),
        &json!([{ "remove": TENANT_HEADER }]),
        "{file}: the header mutation removes {TENANT_HEADER}"
    );
    let authn = get(&filters[jwt], "/typed_config");
    let providers = get(authn, "/providers")
        .as_object()
        .unwrap_or_else(|| panic!("{file}: jwt_authn has no providers"));
    assert!(!providers.is_empty());
    for (name, provider) in providers {
        assert_eq!(
            provider["claim_to_headers"],
            json!([{ "header_name": TENANT_HEADER, "claim_name": "tenant_id" }]),
            "{file}: provider {name} copies the tenant claim"
        );
        assert_eq!(
            provider["forward"], false,
            "{file}: the JWT is not forwarded upstream"
        );
        assert!(
            !provider["issuer"].is_null(),
            "{file}: provider {name} checks the issuer"
        );
    }
    let rules = array(authn, "/rules");
    assert!(
        rules
            .iter()
            .any(|rule| rule["match"] == json!({ "prefix": "/" }) && rule["requires"].is_object()),
        "{file}: a JWT is required on every path"
    );
    let wasm: Vec<usize> = filters
        .iter()
        .enumerate()
        .filter(|(_, f)| is_wasm(f))
        .map(|(index, _)| index)
        .collect();
    assert!(
        !wasm.is_empty(),
        "{file}: tokengate is in the ingress chain"
    );
    for index in wasm {
        assert!(index > jwt, "{file}: tokengate runs after jwt_authn");
        let configuration = text(&filters[index], "/typed_config/config/configuration/value");
        let parsed = parse_filter_config(file, configuration);
        assert_eq!(
            parsed.tenant_header, TENANT_HEADER,
            "{file}: tokengate reads the claim header"
        );
        assert_eq!(parsed.mode, Mode::Inject, "{file}: the ingress injects");
    }
    assert_eq!(
        names.last().map(String::as_str),
        Some("envoy.filters.http.router")
    );
    (filters[strip].clone(), filters[jwt].clone())
}

#[test]
fn the_tenant_comes_from_the_jwt_not_the_client() {
    let production = yaml(&read("envoy/production.yaml"), "envoy/production.yaml");
    let example = yaml(&read("envoy/jwt-authn.yaml"), "envoy/jwt-authn.yaml");
    let in_production = assert_tenant_from_jwt("envoy/production.yaml", &production);
    let in_example = assert_tenant_from_jwt("envoy/jwt-authn.yaml", &example);
    assert_eq!(
        in_production, in_example,
        "jwt-authn.yaml shows the same identity filters as production.yaml"
    );
    // The token API names tenants by design: it must not share the public listener.
    let token_api = http_connection_manager(listener(&production, "token_api"));
    for (_, _, json_text) in wasm_filters(&production)
        .into_iter()
        .filter(|(listener, _, _)| listener == "token_api")
    {
        assert_eq!(
            parse_filter_config("token_api", &json_text).mode,
            Mode::Endpoint
        );
    }
    assert!(!http_filter_names(token_api).contains(&"envoy.filters.http.jwt_authn".to_owned()));
    let ingress = http_connection_manager(listener(&production, "ingress"));
    for (_, _, json_text) in wasm_filters(&production)
        .into_iter()
        .filter(|(listener, _, _)| listener == "ingress")
    {
        assert_eq!(
            parse_filter_config("ingress", &json_text).mode,
            Mode::Inject
        );
    }
    assert!(!http_filter_names(ingress).contains(&"envoy.filters.http.buffer".to_owned()));
}

/// The buffer filter sits between tokengate and the router and is on for `/auth/token`
/// only (endpoint mode reads that body); every other route streams.
#[test]
fn the_buffer_filter_only_holds_token_api_requests() {
    let mut checked = Vec::new();
    for (file, config) in shipped_envoy_configs() {
        for listener in array(&config, "/static_resources/listeners") {
            let hcm = http_connection_manager(listener);
            let names = http_filter_names(hcm);
            let Some(buffer) = names.iter().position(|n| n == "envoy.filters.http.buffer") else {
                continue;
            };
            let place = format!("{file}, listener {}", listener["name"]);
            let filters = array(hcm, "/http_filters");
            assert!(
                filters[..buffer].iter().any(is_wasm),
                "{place}: the buffer comes after tokengate"
            );
            assert_eq!(
                buffer + 1,
                names.len() - 1,
                "{place}: the buffer is just before the router"
            );
            let mut token_routes = 0;
            for route in routes(hcm) {
                let disabled = route["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"]
                    == true;
                if route["match"]["path"] == "/auth/token" {
                    token_routes += 1;
                    assert!(!disabled, "{place}: the buffer is on for /auth/token");
                } else {
                    assert!(
                        disabled,
                        "{place}: the buffer is off for {}",
                        route["match"]
                    );
                }
            }
            assert_eq!(token_routes, 1, "{place}: one /auth/token route");
            checked.push(place);
        }
    }
    assert_eq!(
        checked.len(),
        3,
        "production (token_api), compose, local: {checked:?}"
    );
}

// ---------------------------------------------------------------------------------
// The production chain, end to end, with its upstreams pointed at the stand-ins.
// ---------------------------------------------------------------------------------

const JWT_KEY: &[u8] = b"tokengate deploy test HS256 key, 32+ bytes long";

/// An HS256 JWT over `claims`.
fn jwt(claims: &Value, key: &[u8]) -> String {
    let header =
        URL_SAFE_NO_PAD.encode(json!({ "alg": "HS256", "typ": "JWT", "kid": "test" }).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|e| panic!("HMAC takes any key length: {e}"));
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// production.yaml on loopback: listeners and admin on free ports, every cluster STATIC
/// to the matching stand-in (TLS and DNS removed), the issuer's JWKS replaced by a local
/// key. The HTTP filter chains are left exactly as shipped.
fn production_on_loopback(
    standins: &StandIns,
    companion_port: u16,
    ports: (u16, u16, u16),
) -> (Value, Value) {
    let (ingress, token_api, admin) = ports;
    let mut config = yaml(&rendered("envoy/production.yaml"), "envoy/production.yaml");
    config["admin"]["address"]["socket_address"]["port_value"] = json!(admin);
    let jwks = json!({ "keys": [{ "kty": "oct", "alg": "HS256", "kid": "test", "k": URL_SAFE_NO_PAD.encode(JWT_KEY) }] });
    let mut provider_seen = Value::Null;
    let listeners = config["static_resources"]["listeners"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("no listeners"));
    for listener in listeners {
        let port = match listener["name"].as_str() {
            Some("ingress") => ingress,
            Some("token_api") => token_api,
            other => panic!("unexpected listener {other:?}"),
        };
        listener["address"]["socket_address"] =
            json!({ "address": "127.0.0.1", "port_value": port });
        let filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            .as_array_mut()
            .unwrap_or_else(|| panic!("no HTTP filters"));
        for filter in filters {
            if filter["name"] != "envoy.filters.http.jwt_authn" {
                continue;
            }
            let providers = filter["typed_config"]["providers"]
                .as_object_mut()
                .unwrap_or_else(|| panic!("no providers"));
            for provider in providers.values_mut() {
                let provider = provider
                    .as_object_mut()
                    .unwrap_or_else(|| panic!("provider"));
                provider.remove("remote_jwks");
                provider.insert(
                    "local_jwks".into(),
                    json!({ "inline_string": jwks.to_string() }),
                );
                provider_seen = Value::Object(provider.clone());
            }
        }
    }
    let unused = free_port();
    let clusters = config["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("no clusters"));
    for cluster in clusters {
        let name = cluster["name"].as_str().unwrap_or_default().to_owned();
        let port = match name.as_str() {
            "app" | "whatsapp_graph" => standins.echo.port(),
            "tokengate_companion" => companion_port,
            "tenant_service" => standins.tenant_service.port(),
            login if login.starts_with("genesys_") => standins.login.port(),
            _ => unused,
        };
        let object = cluster
            .as_object_mut()
            .unwrap_or_else(|| panic!("cluster {name}"));
        object.remove("transport_socket");
        object.remove("dns_lookup_family");
        object.insert("type".into(), json!("STATIC"));
        object.insert(
            "load_assignment".into(),
            json!({ "cluster_name": name, "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "127.0.0.1", "port_value": port } } } }] }] }),
        );
    }
    (config, provider_seen)
}

async fn start_envoy(dir: &Path, config: &Value, admin: u16) -> Process {
    let path = dir.join("production-loopback.json");
    std::fs::write(&path, config.to_string()).unwrap_or_else(|e| panic!("cannot write: {e}"));
    let mut command = Command::new(envoy_binary());
    command.arg("-c").arg(&path).args([
        "--concurrency",
        "2",
        "--base-id",
        &admin.to_string(),
        "--disable-hot-restart",
    ]);
    command.args(envoy_log_args());
    let mut process = Process::spawn("envoy", command, dir.join("envoy.log"));
    let ready = format!("http://127.0.0.1:{admin}/ready");
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        process.assert_running();
        if let Ok(response) = client.get(&ready).send().await {
            if response.status().is_success() {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Envoy not live after 30 s:\n{}",
            process.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    process
}

struct Answer {
    status: u16,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    let received = receive(response).await;
    Answer {
        status: received.status,
        body: serde_json::from_str(&received.text).unwrap_or(Value::String(received.text)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_chain_takes_the_tenant_from_the_jwt_end_to_end() {
    let dir = tempfile::Builder::new()
        .prefix("tokengate-deploy-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
    let standins = StandIns::start(Fixture::default_fixture())
        .await
        .unwrap_or_else(|e| panic!("cannot start the stand-ins: {e}"));
    // Declared before the processes: dropped after them, it reads their whole logs.
    let _leak_scan = LeakScan::new(dir.path(), standins.secrets());
    let redis = Redis::start(dir.path()).await;
    let companion = Companion::start(dir.path(), &redis.url(), &[]).await;
    let ports = (free_port(), free_port(), free_port());
    let (config, provider) = production_on_loopback(&standins, companion.port, ports);
    let _envoy = start_envoy(dir.path(), &config, ports.2).await;
    let ingress = format!("http://127.0.0.1:{}", ports.0);
    let token_api = format!("http://127.0.0.1:{}", ports.1);
    let client = reqwest::Client::new();

    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let claims = |tenant: Option<&str>| {
        let mut claims = json!({
            "iss": provider["issuer"],
            "aud": provider["audiences"][0],
            "sub": "deploy-test",
            "exp": expiry,
        });
        if let Some(tenant) = tenant {
            claims["tenant_id"] = json!(tenant);
        }
        claims
    };

    // No JWT: refused by jwt_authn, whatever x-tenant-id says.
    let answer = send(
        client
            .get(format!("{ingress}/api/conversations"))
            .header(TENANT_HEADER, "acme"),
    )
    .await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    // A JWT signed with another key: refused too.
    let answer = send(
        client
            .get(format!("{ingress}/api/conversations"))
            .bearer_auth(jwt(
                &claims(Some("acme")),
                b"some other key of 32 bytes or more",
            )),
    )
    .await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_eq!(standins.calls(Endpoint::Echo), 0, "nothing reached the app");
    assert_eq!(
        standins.calls(Endpoint::TenantService),
        0,
        "no tenant was looked up"
    );

    // A valid JWT for acme and a forged x-tenant-id: globex. The app sees acme's token
    // and one x-tenant-id, acme; globex is never looked up.
    let answer = send(
        client
            .get(format!("{ingress}/api/conversations"))
            .header(TENANT_HEADER, "globex")
            .bearer_auth(jwt(&claims(Some("acme")), JWT_KEY)),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let acme = standins.tokens_issued_to("acme");
    assert_eq!(acme.len(), 1, "one Genesys token for acme");
    assert_eq!(
        answer.body["headers"]["authorization"],
        format!("Bearer {}", acme[0])
    );
    assert_eq!(
        answer.body["headers"][TENANT_HEADER], "acme",
        "{}",
        answer.body
    );
    assert!(standins.tokens_issued_to("globex").is_empty());

    // A valid JWT without the tenant claim: the forged header is gone, so no tenant.
    let answer = send(
        client
            .get(format!("{ingress}/api/conversations"))
            .header(TENANT_HEADER, "globex")
            .bearer_auth(jwt(&claims(None), JWT_KEY)),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.body["code"], "INVALID_REQUEST", "{}", answer.body);
    assert_eq!(
        standins.calls(Endpoint::Echo),
        1,
        "only the acme request reached the app"
    );

    // The Graph API route: the WhatsApp instance injects the tenant's WhatsApp token.
    let answer = send(
        client
            .get(format!("{ingress}/whatsapp/v21.0/12345/messages"))
            .header(TENANT_HEADER, "acme")
            .bearer_auth(jwt(&claims(Some("globex")), JWT_KEY)),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["path"], "/v21.0/12345/messages");
    assert_eq!(answer.body["headers"]["host"], "graph.facebook.com");
    assert_eq!(
        answer.body["headers"]["authorization"],
        "Bearer wa-globex-token-c4a7"
    );

    // The internal token API: the caller names the tenant (GET header, POST body).
    let answer = send(
        client
            .get(format!("{token_api}/auth/token"))
            .header(TENANT_HEADER, "acme"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["accessToken"],
        acme[0].as_str(),
        "acme's cached token"
    );
    let answer = send(
        client
            .post(format!("{token_api}/auth/token"))
            .json(&json!({ "tenantId": "umbrella", "type": "whatsapp" })),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["accessToken"], "wa-umbrella-token-88c0");
    assert_eq!(
        standins.calls(Endpoint::Echo),
        2,
        "the token API never reaches an upstream"
    );
}

// ---------------------------------------------------------------------------------
// Docker: the compose file and the Dockerfiles (no Docker engine here).
// ---------------------------------------------------------------------------------

/// A compose volume `source:target[:mode]`: (source, target).
fn volume(spec: &str) -> (&str, &str) {
    let mut parts = spec.split(':');
    let source = parts.next().unwrap_or_default();
    let target = parts
        .next()
        .unwrap_or_else(|| panic!("volume {spec} has no target"));
    (source, target)
}

#[test]
fn compose_file_is_consistent_with_the_repository_and_envoy_config() {
    let deploy = workspace_root().join("deploy");
    let compose = yaml(
        &read("deploy/docker-compose.yml"),
        "deploy/docker-compose.yml",
    );
    let services = get(&compose, "/services")
        .as_object()
        .unwrap_or_else(|| panic!("no services"));
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["companion", "envoy", "redis", "standins"]),
        "the demo's pieces"
    );

    for (name, service) in services {
        if let Some(build) = service.get("build") {
            let context = deploy.join(text(build, "/context"));
            assert!(
                context.is_dir(),
                "{name}: build context {}",
                context.display()
            );
            let dockerfile = context.join(text(build, "/dockerfile"));
            assert!(dockerfile.is_file(), "{name}: {}", dockerfile.display());
            let ignore = PathBuf::from(format!("{}.dockerignore", dockerfile.display()));
            let ignored = std::fs::read_to_string(&ignore)
                .unwrap_or_else(|e| panic!("{name}: {}: {e}", ignore.display()));
            assert!(
                ignored.lines().any(|l| l.trim_end_matches('/') == "target"),
                "{name}: the build context leaves target/ out"
            );
        } else {
            assert!(service["image"].is_string(), "{name}: an image or a build");
        }
        for spec in service["volumes"].as_array().into_iter().flatten() {
            let (source, _) = volume(spec.as_str().unwrap_or_default());
            let path = deploy.join(source);
            assert!(
                path.exists(),
                "{name} mounts {} which does not exist (target/tokengate.wasm: run scripts/build-wasm)",
                path.display()
            );
        }
        for dependency in service["depends_on"].as_object().into_iter().flatten() {
            assert!(
                names.contains(dependency.0.as_str()),
                "{name} depends on {}",
                dependency.0
            );
        }
        if let Some(mode) = service["network_mode"].as_str() {
            let owner = mode
                .strip_prefix("service:")
                .unwrap_or_else(|| panic!("{name}: {mode}"));
            assert!(names.contains(owner), "{name} joins {owner}'s network");
        }
    }

    // Envoy: the validated image version by default; the entrypoint renders the mounted
    // template and filter blocks (with the mounted module) where Envoy's command reads it.
    let envoy = &services["envoy"];
    assert!(
        text(envoy, "/image").contains(":-docker.io/envoyproxy/envoy:v1.40."),
        "Envoy 1.40 by default"
    );
    let mounts: BTreeMap<&str, &str> = array(envoy, "/volumes")
        .iter()
        .map(|spec| {
            let (source, target) = volume(spec.as_str().unwrap_or_default());
            (target, source)
        })
        .collect();
    for (target, source) in [
        ("/etc/tokengate/envoy-entrypoint", "./envoy-entrypoint"),
        (
            "/etc/tokengate/compose.yaml.tmpl",
            "../envoy/compose.yaml.tmpl",
        ),
        (
            "/etc/tokengate/filter-wasm.yaml.tmpl",
            "../envoy/filter-wasm.yaml.tmpl",
        ),
        (
            "/etc/tokengate/filter-native.yaml.tmpl",
            "../envoy/filter-native.yaml.tmpl",
        ),
        ("/etc/tokengate/tokengate.wasm", "../target/tokengate.wasm"),
    ] {
        assert_eq!(mounts.get(target), Some(&source), "Envoy's {target}");
    }
    assert_eq!(
        array(envoy, "/entrypoint"),
        &[json!("/etc/tokengate/envoy-entrypoint")]
    );
    assert_eq!(
        array(envoy, "/command")[..3],
        [json!("envoy"), json!("-c"), json!("/tmp/envoy.yaml")],
        "Envoy runs the rendered configuration"
    );

    // The Envoy configuration names the compose services; the stand-ins, which bind
    // loopback only, share Envoy's network namespace on their default ports.
    let config = yaml(&compose_rendered("wasm"), "envoy/compose.yaml.tmpl");
    let sidecars: Vec<&str> = services
        .iter()
        .filter(|(_, service)| service["network_mode"] == "service:envoy")
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(sidecars, ["standins"]);
    assert!(
        services["standins"].get("command").is_none(),
        "the stand-ins run on their default ports"
    );
    let loopback = BTreeMap::from([
        ("tenant_service", Ports::DEMO.tenant_service),
        ("genesys_login", Ports::DEMO.login),
        ("app", Ports::DEMO.echo),
    ]);
    for cluster in clusters(&config) {
        let name = text(cluster, "/name");
        let (address, port) = endpoint(cluster);
        if address == "127.0.0.1" {
            assert_eq!(
                loopback.get(name).map(|p| u64::from(*p)),
                Some(port),
                "cluster {name}"
            );
        } else {
            assert!(
                names.contains(address.as_str()),
                "cluster {name} goes to {address}: no such service"
            );
        }
    }
    let (companion_host, companion_port) =
        endpoint(cluster(&config, "tokengate_companion").unwrap_or_else(|| panic!("companion")));
    let environment = get(&services[companion_host.as_str()], "/environment");
    let listen = text(environment, "/TOKENGATE_LISTEN");
    assert!(
        listen.starts_with("0.0.0.0:") && listen.ends_with(&format!(":{companion_port}")),
        "the companion listens where Envoy calls it: {listen}"
    );
    let redis_url = text(environment, "/TOKENGATE_REDIS_URL");
    let redis_host = redis_url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("{redis_url}"));
    assert!(
        names.contains(redis_host),
        "the companion's Redis {redis_host} is a service"
    );

    // The published port is Envoy's listener.
    let listen_port = get(
        listener(&config, "ingress"),
        "/address/socket_address/port_value",
    );
    let published = array(envoy, "/ports");
    assert!(
        published.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.ends_with(&format!(":{listen_port}")))),
        "Envoy's listener port {listen_port} is published: {published:?}"
    );
}

#[test]
fn dockerfiles_build_with_the_documented_commands() {
    let readme = read("README.md");
    assert!(
        readme.contains(COMPANION_BUILD),
        "the README documents the companion's release build as `{COMPANION_BUILD}`"
    );
    let dockerfile = read("deploy/companion.Dockerfile");
    let builds: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("cargo build"))
        .collect();
    assert_eq!(builds.len(), 1, "one cargo build: {builds:?}");
    assert!(
        builds[0].contains(COMPANION_BUILD),
        "the Dockerfile builds with the README's command `{COMPANION_BUILD}`: {}",
        builds[0]
    );
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        stages,
        ["FROM ${BUILDER_IMAGE} AS build", "FROM ${RUNTIME_IMAGE}"],
        "a builder stage and a runtime stage, both images build arguments"
    );
    let default = |argument: &str| -> &str {
        dockerfile
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {argument}=")))
            .unwrap_or_else(|| panic!("no default for the build argument {argument}"))
    };
    let builder = default("BUILDER_IMAGE");
    assert!(builder.contains("/rust:"), "{builder}");
    let runtime = default("RUNTIME_IMAGE");
    assert!(
        runtime.starts_with("gcr.io/distroless/cc-debian12"),
        "the runtime image is not the toolchain: {runtime}"
    );
    assert!(dockerfile.contains("target/release/tokengate-companion"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/tokengate-companion\"]"));
    assert!(
        dockerfile.contains("ENV TOKENGATE_LISTEN=0.0.0.0:7070"),
        "the companion listens beyond the container's loopback"
    );

    // The builder's Rust is at least the workspace's rust-version.
    let toolchain = builder
        .split("rust:")
        .nth(1)
        .and_then(|tag| tag.split('-').next())
        .unwrap_or_else(|| panic!("{builder}"));
    let manifest = read("Cargo.toml");
    let minimum = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .unwrap_or_else(|| panic!("no rust-version in Cargo.toml"));
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap_or(0)).collect() };
    assert!(
        version(toolchain) >= version(minimum),
        "rust:{toolchain} >= {minimum}"
    );

    let standins = read("deploy/standins.Dockerfile");
    assert!(standins.contains("cargo build --release -p tokengate-tests --bin tokengate-standins"));
    assert!(read("tests/Cargo.toml").contains("name = \"tokengate-standins\""));
}

// ---------------------------------------------------------------------------------
// Istio.
// ---------------------------------------------------------------------------------

/// The filter configuration keys the README documents (its example document), as dotted
/// paths; an empty object there (`genesys.loginHosts`) is a map documented as a whole.
fn documented_filter_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, value: &Value, keys: &mut BTreeSet<String>) {
        for (key, value) in value.as_object().into_iter().flatten() {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value.as_object() {
                Some(object) if !object.is_empty() => walk(&path, value, keys),
                _ => {
                    keys.insert(path);
                }
            }
        }
    }
    let readme = read("README.md");
    let example = readme
        .split("### Filter configuration")
        .nth(1)
        .and_then(|section| section.split("```json").nth(1))
        .and_then(|block| block.split("```").next())
        .unwrap_or_else(|| panic!("README: no JSON example under 'Filter configuration'"));
    let example: Value = serde_json::from_str(example)
        .unwrap_or_else(|e| panic!("README: the filter configuration example is not JSON: {e}"));
    let mut keys = BTreeSet::new();
    walk("", &example, &mut keys);
    keys
}

fn assert_documented(prefix: &str, value: &Value, documented: &BTreeSet<String>) {
    for (key, value) in value.as_object().into_iter().flatten() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if documented.contains(&path) {
            continue;
        }
        let has_children = documented
            .iter()
            .any(|d| d.starts_with(&format!("{path}.")));
        assert!(
            value.is_object() && has_children,
            "pluginConfig key '{path}' is not documented in the README"
        );
        assert_documented(&path, value, documented);
    }
}

/// Istio's name of the outbound cluster of a host and port.
fn istio_cluster(host: &str, port: u64) -> String {
    format!("outbound|{port}||{host}")
}

#[test]
fn istio_manifests_are_consistent() {
    let dir = workspace_root().join("deploy/istio");
    let kustomization = yaml(
        &read("deploy/istio/kustomization.yaml"),
        "kustomization.yaml",
    );
    let resources: BTreeSet<String> = array(&kustomization, "/resources")
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_owned())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(
        resources, on_disk,
        "kustomization.yaml lists every manifest"
    );

    let api_versions = BTreeMap::from([
        ("WasmPlugin", "extensions.istio.io/v1alpha1"),
        ("ServiceEntry", "networking.istio.io/v1"),
        ("DestinationRule", "networking.istio.io/v1"),
        ("RequestAuthentication", "security.istio.io/v1"),
        ("AuthorizationPolicy", "security.istio.io/v1"),
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("Namespace", "v1"),
    ]);
    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for resource in &resources {
        let file = format!("deploy/istio/{resource}");
        for document in yaml_documents(&read(&file), &file) {
            let kind = text(&document, "/kind").to_owned();
            assert_eq!(
                api_versions.get(kind.as_str()).copied(),
                document["apiVersion"].as_str(),
                "{file}: apiVersion of a {kind}"
            );
            assert!(
                document["metadata"]["name"].is_string(),
                "{file}: a {kind} without a name"
            );
            by_kind.entry(kind).or_default().push(document);
        }
    }
    let one = |kind: &str| -> &Value {
        let documents = by_kind.get(kind).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(documents.len(), 1, "one {kind}");
        &documents[0]
    };

    // The WasmPlugin.
    let plugin = one("WasmPlugin");
    assert_eq!(
        plugin["spec"]["phase"], "AUTHZ",
        "after RequestAuthentication's jwt_authn"
    );
    assert_eq!(
        plugin["spec"]["failStrategy"], "FAIL_CLOSE",
        "never skip the injector"
    );
    assert!(
        text(plugin, "/spec/url").starts_with("oci://"),
        "an OCI image"
    );
    let plugin_config = get(plugin, "/spec/pluginConfig");
    assert!(plugin_config.is_object(), "pluginConfig is a JSON object");
    assert_documented("", plugin_config, &documented_filter_keys());
    let parsed = parse_filter_config("WasmPlugin pluginConfig", &plugin_config.to_string());
    let namespace = text(plugin, "/metadata/namespace");
    let selector = get(plugin, "/spec/selector");

    // Its clusters: the companion's Service, and ServiceEntries with TLS origination.
    let mut services = BTreeMap::new();
    for service in by_kind.get("Service").into_iter().flatten() {
        let host = format!(
            "{}.{}.svc.cluster.local",
            text(service, "/metadata/name"),
            text(service, "/metadata/namespace")
        );
        for port in array(service, "/spec/ports") {
            services.insert(
                istio_cluster(&host, port["port"].as_u64().unwrap_or(0)),
                service,
            );
        }
    }
    let mut entries = BTreeMap::new();
    for entry in by_kind.get("ServiceEntry").into_iter().flatten() {
        assert_eq!(
            entry["metadata"]["namespace"], namespace,
            "visible to the gateway"
        );
        for host in array(entry, "/spec/hosts") {
            for port in array(entry, "/spec/ports") {
                let host = host.as_str().unwrap_or_default();
                entries.insert(
                    istio_cluster(host, port["number"].as_u64().unwrap_or(0)),
                    (host, entry),
                );
            }
        }
    }
    let rules: BTreeMap<&str, &Value> = by_kind
        .get("DestinationRule")
        .into_iter()
        .flatten()
        .map(|rule| (text(rule, "/spec/host"), rule))
        .collect();
    // TLS origination to `wire_host`, certificate checked against that name.
    let assert_tls_origination = |host: &str, wire_host: &str| {
        let rule = rules
            .get(host)
            .unwrap_or_else(|| panic!("no DestinationRule for {host}"));
        assert_eq!(
            get(rule, "/spec/trafficPolicy/tls"),
            &json!({ "mode": "SIMPLE", "sni": wire_host, "subjectAltNames": [wire_host] }),
            "DestinationRule {host}"
        );
    };

    let companion = services
        .get(&parsed.companion.cluster)
        .unwrap_or_else(|| panic!("no Service for {}", parsed.companion.cluster));
    assert!(
        parsed
            .companion
            .cluster
            .ends_with(&format!("||{}", parsed.companion.authority))
    );
    let (tenant_host, tenant_entry) = entries
        .get(&parsed.tenant_service.cluster)
        .unwrap_or_else(|| panic!("no ServiceEntry for {}", parsed.tenant_service.cluster));
    let tenant_wire = text(tenant_entry, "/spec/endpoints/0/address");
    assert_tls_origination(tenant_host, tenant_wire);

    for (region, domain) in GENESYS_REGIONS {
        let login_host = format!("login.{domain}");
        let cluster = parsed.login_cluster(region);
        let (host, entry) = entries
            .get(&cluster)
            .unwrap_or_else(|| panic!("{region}: no ServiceEntry for {cluster}"));
        assert!(
            host.contains(region),
            "{region} appears in the ServiceEntry hosts: {host}"
        );
        let endpoints = array(entry, "/spec/endpoints");
        assert_eq!(endpoints.len(), 1, "{region}: one endpoint");
        assert_eq!(endpoints[0]["address"], login_host.as_str(), "{region}");
        assert_eq!(entry["spec"]["resolution"], "DNS", "{region}");
        let port_name = text(entry, "/spec/ports/0/name");
        assert_eq!(
            endpoints[0]["ports"][port_name], 443,
            "{region}: HTTPS on the wire"
        );
        assert_tls_origination(host, &login_host);
    }
    assert!(entries.contains_key(&istio_cluster("graph.facebook.com", 80)));
    assert_tls_origination("graph.facebook.com", "graph.facebook.com");
    for entry in by_kind.get("ServiceEntry").into_iter().flatten() {
        for host in array(entry, "/spec/hosts") {
            assert!(
                rules.contains_key(host.as_str().unwrap_or_default()),
                "{host}: every external host has TLS origination"
            );
        }
    }

    // The companion: its Deployment serves the Service's port and names a Redis.
    let deployment = one("Deployment");
    let container = get(deployment, "/spec/template/spec/containers/0");
    let env: BTreeMap<&str, &Value> = array(container, "/env")
        .iter()
        .map(|e| (text(e, "/name"), e))
        .collect();
    assert!(
        env.contains_key("TOKENGATE_REDIS_URL"),
        "the companion is given a Redis"
    );
    let container_port = get(container, "/ports/0/containerPort");
    let listen = text(env["TOKENGATE_LISTEN"], "/value");
    assert_eq!(listen, format!("0.0.0.0:{container_port}"));
    assert_eq!(
        get(companion, "/spec/ports/0/targetPort"),
        get(container, "/ports/0/name")
    );
    assert_eq!(
        get(companion, "/spec/selector"),
        get(deployment, "/spec/template/metadata/labels")
    );
    let namespaces: Vec<&str> = by_kind
        .get("Namespace")
        .into_iter()
        .flatten()
        .map(|n| text(n, "/metadata/name"))
        .collect();
    assert!(namespaces.contains(&text(deployment, "/metadata/namespace")));

    // The tenant claim goes to the header the plugin reads, on the same workloads.
    let authentication = one("RequestAuthentication");
    assert_eq!(get(authentication, "/spec/selector"), selector);
    assert_eq!(
        get(authentication, "/spec/jwtRules/0/outputClaimToHeaders"),
        &json!([{ "header": parsed.tenant_header, "claim": "tenant_id" }])
    );
    assert_eq!(
        authentication["spec"]["jwtRules"][0]["forwardOriginalToken"],
        false
    );
    let policy = one("AuthorizationPolicy");
    assert_eq!(get(policy, "/spec/selector"), selector);
    assert_eq!(
        get(policy, "/spec/rules/0/from/0/source/requestPrincipals"),
        &json!(["*"])
    );
}

// ---------------------------------------------------------------------------------
// The Wasm OCI image.
// ---------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The regular files of a tar archive, by path.
fn tar_files(bytes: &[u8], what: &str) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive
        .entries()
        .unwrap_or_else(|e| panic!("{what} is not a tar archive: {e}"))
    {
        let mut entry = entry.unwrap_or_else(|e| panic!("{what}: bad entry: {e}"));
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map(|p| p.to_string_lossy().trim_start_matches("./").to_owned())
            .unwrap_or_else(|e| panic!("{what}: bad path: {e}"));
        let mut content = Vec::new();
        entry
            .read_to_end(&mut content)
            .unwrap_or_else(|e| panic!("{what}: cannot read {path}: {e}"));
        files.insert(path, content);
    }
    files
}

/// The blob a descriptor points to, after checking its digest and size.
fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, descriptor: &Value) -> &'a [u8] {
    let digest = text(descriptor, "/digest");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("{digest}: not a sha256 digest"));
    let bytes = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("no blob {digest}"));
    assert_eq!(
        sha256_hex(bytes),
        hex,
        "blob {digest}: its content hashes to its name"
    );
    assert_eq!(descriptor["size"], bytes.len(), "blob {digest}: size");
    bytes
}

fn json_of(bytes: &[u8], what: &str) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"))
}

fn package(output: &Path) -> String {
    let script = workspace_root().join("deploy/package-wasm-oci");
    let result = Command::new(&script)
        .arg("--wasm")
        .arg(wasm_module())
        .arg("--output")
        .arg(output)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        result.status.success(),
        "package-wasm-oci failed ({}):\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8_lossy(&result.stdout).into_owned()
}

#[test]
fn oci_package_is_an_istio_compat_wasm_image_with_consistent_digests() {
    let module = std::fs::read(wasm_module()).unwrap_or_else(|e| {
        panic!(
            "no filter module at {} (run scripts/build-wasm): {e}",
            wasm_module().display()
        )
    });
    let dir = tempfile::Builder::new()
        .prefix("tokengate-oci-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
    let first = dir.path().join("first.tar");
    let printed = package(&first);
    let second = dir.path().join("second.tar");
    package(&second);
    let bytes = std::fs::read(&first).unwrap_or_else(|e| panic!("no tarball: {e}"));
    assert_eq!(
        bytes,
        std::fs::read(&second).unwrap_or_default(),
        "the same module packages to the same bytes (digests can pin it)"
    );

    let files = tar_files(&bytes, "the image tarball");
    assert_eq!(
        json_of(&files["oci-layout"], "oci-layout"),
        json!({ "imageLayoutVersion": "1.0.0" })
    );
    let index = json_of(&files["index.json"], "index.json");
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = array(&index, "/manifests");
    assert_eq!(manifests.len(), 1, "one image");
    assert_eq!(
        manifests[0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let version = read("Cargo.toml")
        .lines()
        .find_map(|l| {
            l.strip_prefix("version = ")
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("no version in Cargo.toml"));
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        version.as_str(),
        "tagged with the workspace version"
    );

    let manifest_digest = text(&manifests[0], "/digest");
    assert!(
        printed.contains(manifest_digest),
        "the script prints the digest to pin: {printed}"
    );
    let manifest = json_of(blob(&files, &manifests[0]), "the manifest");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["annotations"]["module.wasm.image/variant"],
        "compat"
    );
    let config_descriptor = get(&manifest, "/config");
    assert_eq!(
        config_descriptor["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config = json_of(blob(&files, config_descriptor), "the image configuration");
    let layers = array(&manifest, "/layers");
    assert_eq!(layers.len(), 1, "the compat variant has exactly one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(&files, &layers[0]);

    let mut layer_tar = Vec::new();
    flate2::read::GzDecoder::new(layer)
        .read_to_end(&mut layer_tar)
        .unwrap_or_else(|e| panic!("the layer is not gzip: {e}"));
    assert_eq!(
        config["rootfs"],
        json!({ "type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer_tar))] }),
        "the configuration's diff_id is the uncompressed layer's digest"
    );
    let layer_files = tar_files(&layer_tar, "the layer");
    assert_eq!(
        layer_files.keys().collect::<Vec<_>>(),
        ["plugin.wasm"],
        "the layer holds plugin.wasm at its root, alone"
    );
    assert!(
        layer_files["plugin.wasm"] == module,
        "plugin.wasm is target/tokengate.wasm"
    );

    let referenced: BTreeSet<String> = [
        manifest_digest,
        text(config_descriptor, "/digest"),
        text(&layers[0], "/digest"),
    ]
    .iter()
    .map(|d| format!("blobs/sha256/{}", d.trim_start_matches("sha256:")))
    .collect();
    let blobs: BTreeSet<String> = files
        .keys()
        .filter(|p| p.starts_with("blobs/"))
        .cloned()
        .collect();
    assert_eq!(blobs, referenced, "no stray blobs");
}

/// `skopeo ARGS`: its standard output, or a panic with its error.
fn skopeo(args: &[&str]) -> String {
    let output = Command::new("skopeo")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run skopeo (scripts/setup installs it): {e}"));
    assert!(
        output.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The tarball read by a real OCI tool, skopeo (as `skopeo copy ... docker://` would
/// push it): Istio's compat layout, the module's very bytes, and the digest a
/// WasmPlugin pins (Istio compares spec.sha256, or the url's @sha256:, with the image's
/// manifest digest).
#[test]
fn oci_package_read_by_skopeo_holds_the_module_and_gives_the_digest_to_pin() {
    let module = std::fs::read(wasm_module())
        .unwrap_or_else(|e| panic!("no {} (scripts/build-wasm): {e}", wasm_module().display()));
    let dir = tempfile::Builder::new()
        .prefix("tokengate-skopeo-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
    let archive = dir.path().join("tokengate-oci.tar");
    let printed = package(&archive);
    let reference = format!("oci-archive:{}", archive.display());

    let manifest = json_of(
        skopeo(&["inspect", "--raw", &reference]).as_bytes(),
        "skopeo's manifest",
    );
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["annotations"]["module.wasm.image/variant"],
        "compat"
    );
    let layers = array(&manifest, "/layers");
    assert_eq!(layers.len(), 1, "compat: one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let image = json_of(
        skopeo(&["inspect", &reference]).as_bytes(),
        "skopeo inspect",
    );
    let digest = text(&image, "/Digest");
    assert!(
        printed.contains(&format!("manifest {digest}"))
            && printed.contains(&format!(
                "WasmPlugin: sha256: {}",
                digest.trim_start_matches("sha256:")
            )),
        "package-wasm-oci prints the digest skopeo sees, {digest}: {printed}"
    );

    // The layer as a registry would hold it: plugin.wasm, byte for byte the module.
    let copy = dir.path().join("copy");
    skopeo(&[
        "copy",
        "--quiet",
        &reference,
        &format!("dir:{}", copy.display()),
    ]);
    let layer_digest = text(&layers[0], "/digest");
    let layer = std::fs::read(copy.join(layer_digest.trim_start_matches("sha256:")))
        .unwrap_or_else(|e| panic!("skopeo copied no layer {layer_digest}: {e}"));
    let mut layer_tar = Vec::new();
    flate2::read::GzDecoder::new(layer.as_slice())
        .read_to_end(&mut layer_tar)
        .unwrap_or_else(|e| panic!("the layer is not gzip: {e}"));
    let files = tar_files(&layer_tar, "the layer");
    assert_eq!(files.keys().collect::<Vec<_>>(), ["plugin.wasm"]);
    assert!(
        files["plugin.wasm"] == module,
        "the image holds target/tokengate.wasm"
    );
    let sha256 = digest.trim_start_matches("sha256:");
    eprintln!(
        "WasmPlugin for this module: spec.sha256: {sha256} \
         (or url: oci://REGISTRY/tokengate@{digest}); module sha256 {}",
        sha256_hex(&module)
    );
}
