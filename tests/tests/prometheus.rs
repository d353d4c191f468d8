//! Day-two operations proven against a real Prometheus: the shipped scrape
//! configuration (`deploy/prometheus/prometheus.yml`) and rules
//! (`deploy/prometheus/tokengate.rules.yml`) run in a real `prometheus` process that
//! scrapes a real Envoy (`/stats/prometheus`, the build `$TOKENGATE_FILTER` names) and
//! companion. A tenant's credentials rejected by the IdP must show as its alert in
//! Prometheus' HTTP API, and every recording rule, every alert expression, every
//! metric the rules and the dashboard name and every query of the Grafana dashboard
//! (`deploy/grafana/tokengate.json`) must return data: a metric renamed in the code
//! fails here.
//!
//! Also checked without processes: every alert has a severity, a summary and a
//! `runbook_url` whose anchor is a heading of README.md, and a promtool case where it
//! fires and one where it does not.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokengate_tests::harness::{Process, Stack, eventually, free_port, workspace_root};
use tokengate_tests::standins::{Endpoint, Fault};

/// The shipped rules, scrape configuration, promtool tests and dashboard.
const RULES: &str = "deploy/prometheus/tokengate.rules.yml";
const SCRAPE_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const RULE_TESTS: &str = "deploy/prometheus/tokengate.rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/tokengate.json";

/// The alert a rejected client secret raises (no `for`: it fires at once).
const REJECTION_ALERT: &str = "TokengateCredentialsRejected";

/// How long a query may take to return data: a few scrape and evaluation rounds of 1 s.
const SETTLE: Duration = Duration::from_secs(30);

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(relative: &str) -> serde_norway::Value {
    serde_norway::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// A `prometheus` server of its own: temporary storage, a free loopback port, scraping
/// and evaluating every second.
struct Prometheus {
    port: u16,
    process: Process,
}

impl Prometheus {
    /// Starts Prometheus on the shipped configuration, its targets replaced by this
    /// Envoy's admin port and this companion's port, and waits until it is ready.
    async fn start(dir: &Path, envoy_admin_port: u16, companion_port: u16) -> Prometheus {
        let config_path = dir.join("prometheus.yml");
        let config = Self::config(envoy_admin_port, companion_port);
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
        let port = free_port();
        let mut command = Command::new("prometheus");
        command.args([
            format!("--config.file={}", config_path.display()),
            format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_owned(),
        ]);
        let mut process = Process::spawn("prometheus", command, dir.join("prometheus.log"));
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        eventually("prometheus ready", Duration::from_secs(20), async || {
            process.assert_running();
            reqwest::get(&ready)
                .await
                .is_ok_and(|answer| answer.status().is_success())
        })
        .await;
        Prometheus { port, process }
    }

    /// `deploy/prometheus/prometheus.yml` with 1 s intervals, the rules file by its
    /// absolute path and the targets on loopback; its relabelling is kept as shipped.
    fn config(envoy_admin_port: u16, companion_port: u16) -> String {
        let mut config = yaml(SCRAPE_CONFIG);
        config["global"]["scrape_interval"] = "1s".into();
        config["global"]["evaluation_interval"] = "1s".into();
        let rules = workspace_root().join(RULES);
        config["rule_files"] = vec![serde_norway::Value::from(rules.display().to_string())].into();
        let serde_norway::Value::Sequence(jobs) = &mut config["scrape_configs"] else {
            panic!("{SCRAPE_CONFIG} has no scrape_configs");
        };
        for job in jobs.iter_mut() {
            let port = match job["job_name"].as_str() {
                Some("tokengate-envoy") => envoy_admin_port,
                Some("tokengate-companion") => companion_port,
                other => panic!("{SCRAPE_CONFIG}: unexpected job {other:?}"),
            };
            job["static_configs"][0]["targets"] =
                vec![serde_norway::Value::from(format!("127.0.0.1:{port}"))].into();
        }
        serde_norway::to_string(&config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `GET /api/v1/<path>` with `query`; the `data` of a successful answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        let answer: Value = reqwest::Client::new()
            .get(&url)
            .query(query)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(answer["status"], "success", "{url} {query:?}: {answer}");
        answer["data"].clone()
    }

    /// The samples an instant query returns now.
    async fn query(&mut self, promql: &str) -> Vec<Value> {
        self.process.assert_running();
        let data = self.api("query", &[("query", promql)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until every query returns at least one sample; fails naming those that
    /// still return none.
    async fn expect_data(&mut self, what: &str, queries: &BTreeSet<String>) {
        let mut empty = queries.clone();
        let started = std::time::Instant::now();
        while !empty.is_empty() && started.elapsed() < SETTLE {
            let mut still = BTreeSet::new();
            for promql in &empty {
                if self.query(promql).await.is_empty() {
                    still.insert(promql.clone());
                }
            }
            empty = still;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            empty.is_empty(),
            "{what}: no data within {SETTLE:?} for {empty:#?}"
        );
    }
}

/// Every rule of the rules file: `(record or alert name, expr, the rule)`.
fn rules() -> Vec<(String, String, serde_norway::Value)> {
    let rules = yaml(RULES);
    let groups = rules["groups"].as_sequence().cloned().unwrap_or_default();
    groups
        .iter()
        .flat_map(|group| group["rules"].as_sequence().cloned().unwrap_or_default())
        .map(|rule| {
            let name = rule["record"]
                .as_str()
                .or_else(|| rule["alert"].as_str())
                .unwrap_or_else(|| panic!("a rule without record or alert: {rule:?}"))
                .to_owned();
            let expr = rule["expr"].as_str().unwrap_or_default().trim().to_owned();
            (name, expr, rule)
        })
        .collect()
}

/// Every query of the dashboard's panels, with the panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    assert!(!panels.is_empty(), "{DASHBOARD} has no panels");
    panels
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "panel {title:?} has no query");
            targets.into_iter().map(move |target| {
                let expr = target["expr"].as_str().unwrap_or_default().to_owned();
                assert!(
                    !expr.is_empty(),
                    "panel {title:?} has a target without expr"
                );
                (title.clone(), expr)
            })
        })
        .collect()
}

/// The raw metric names (`tokengate_*`, not recording rules' `tokengate:*`) in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("tokengate_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_the_stack_and_fires_the_alert_of_a_rejected_tenant() {
    let stack = Stack::start().await;
    let mut prometheus = Prometheus::start(
        stack.dir.path(),
        stack.envoy.admin_port,
        stack.companion.port,
    )
    .await;

    // Prometheus holds the rejection counter at 0 before the rejection, so that its
    // increase is seen.
    let rejections = r#"tokengate_fetch_failed{code="oauth_invalid_grant"}"#;
    eventually("the first scrapes", SETTLE, async || {
        !prometheus.query(rejections).await.is_empty()
            && !prometheus
                .query("tokengate_companion_redis_healthy")
                .await
                .is_empty()
    })
    .await;

    for _ in 0..2 {
        assert_eq!(stack.get("/api", "acme").await.status, 200);
    }
    stack
        .standins
        .push_fault(Endpoint::Login, Fault::InvalidClient);
    let rejected = stack.get("/api", "initech").await;
    assert_eq!(rejected.status, 502, "{:?}", rejected.body);
    assert_eq!(rejected.body["code"], "OAUTH_INVALID_GRANT");

    let mut alert = Value::Null;
    eventually("the rejection's alert", SETTLE, async || {
        let alerts = prometheus.api("alerts", &[]).await;
        let found = alerts["alerts"].as_array().and_then(|alerts| {
            alerts
                .iter()
                .find(|alert| alert["labels"]["alertname"] == REJECTION_ALERT)
                .cloned()
        });
        match found {
            Some(found) => {
                alert = found;
                true
            }
            None => false,
        }
    })
    .await;
    println!(
        "alert in Prometheus' /api/v1/alerts:\n{}",
        serde_json::to_string_pretty(&alert).unwrap_or_default()
    );
    assert!(
        alert["state"] == "firing" || alert["state"] == "pending",
        "{alert}"
    );
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(alert["labels"]["code"], "oauth_invalid_grant");
    assert!(
        alert["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|url| url.ends_with("#tokengatecredentialsrejected")),
        "{alert}"
    );

    // Every recording rule and every metric the rules and the dashboard name have
    // series; every dashboard query returns data.
    let all_rules = rules();
    let records: BTreeSet<String> = all_rules
        .iter()
        .filter(|(_, _, rule)| rule["record"].is_string())
        .map(|(name, _, _)| name.clone())
        .collect();
    prometheus.expect_data("recording rules", &records).await;
    let mut names = metric_names(&read(RULES));
    names.extend(metric_names(&read(DASHBOARD)));
    prometheus
        .expect_data("metrics the rules and the dashboard name", &names)
        .await;
    let panels = dashboard_queries();
    for (title, expr) in &panels {
        println!("dashboard panel {title:?}: {expr}");
    }
    let queries = panels.into_iter().map(|(_, expr)| expr).collect();
    prometheus.expect_data("dashboard queries", &queries).await;

    // Every rule evaluates without error (an alert expression naming a metric that no
    // longer exists is empty, not an error: the names above cover that).
    let groups = prometheus.api("rules", &[]).await;
    let evaluated: Vec<(String, String, String)> = groups["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .map(|rule| {
            (
                rule["name"].as_str().unwrap_or_default().to_owned(),
                rule["health"].as_str().unwrap_or_default().to_owned(),
                rule["lastError"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(evaluated.len(), all_rules.len(), "{evaluated:?}");
    for (name, health, error) in evaluated {
        assert_eq!(health, "ok", "rule {name}: {error}");
    }
}

/// The README's headings as GitHub anchors them: lower case, spaces as `-`, other
/// punctuation dropped.
fn readme_anchors() -> BTreeSet<String> {
    read("README.md")
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_alert_has_a_severity_a_summary_a_runbook_anchor_and_promtool_cases() {
    let anchors = readme_anchors();
    let tests = yaml(RULE_TESTS);
    let cases: Vec<serde_norway::Value> = tests["tests"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|test| {
            test["alert_rule_test"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let alerts: Vec<_> = rules()
        .into_iter()
        .filter(|(_, _, rule)| rule["alert"].is_string())
        .collect();
    assert!(alerts.len() >= 9, "{} alerts", alerts.len());
    for (name, _, rule) in alerts {
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        assert!(
            rule["annotations"]["summary"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{name}: no summary"
        );
        let runbook = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let anchor = runbook.rsplit_once("README.md#").map(|(_, anchor)| anchor);
        assert!(
            anchor.is_some_and(|anchor| anchors.contains(anchor)),
            "{name}: runbook_url {runbook:?} is not a heading of README.md"
        );
        let of_alert = || {
            cases
                .iter()
                .filter(|case| case["alertname"].as_str() == Some(&name))
        };
        let fires = |case: &&serde_norway::Value| {
            case["exp_alerts"]
                .as_sequence()
                .is_some_and(|alerts| !alerts.is_empty())
        };
        assert!(
            of_alert().any(|case| fires(&case)),
            "{name}: no promtool case where it fires"
        );
        assert!(
            of_alert().any(|case| !fires(&case)),
            "{name}: no promtool case where it does not fire"
        );
    }
}

/// The keys Grafana's dashboard schema allows in a panel (`#Panel` of
/// `kinds/dashboard/dashboard_kind.cue`, a closed definition).
const PANEL_KEYS: [&str; 24] = [
    "type",
    "id",
    "pluginVersion",
    "tags",
    "targets",
    "title",
    "description",
    "transparent",
    "datasource",
    "gridPos",
    "links",
    "repeat",
    "repeatDirection",
    "repeatPanelId",
    "maxDataPoints",
    "thresholds",
    "timeRegions",
    "transformations",
    "interval",
    "timeFrom",
    "timeShift",
    "libraryPanel",
    "options",
    "fieldConfig",
];

/// The variable types of the schema's `#VariableType`.
const VARIABLE_TYPES: [&str; 8] = [
    "query",
    "adhoc",
    "constant",
    "datasource",
    "interval",
    "textbox",
    "custom",
    "system",
];

/// Whether `value` is an unsigned integer below `bound`.
fn below(value: &Value, bound: u64) -> bool {
    value.as_u64().is_some_and(|value| value < bound)
}

/// The constraints of Grafana's published dashboard schema (`dashboard_kind.cue`, CUE;
/// no CUE toolchain runs here) on the fields the dashboard uses, written out: panel keys,
/// types, grid positions, data source references, field configuration, thresholds,
/// value mappings, variables, and the top-level fields' types.
#[test]
fn the_dashboard_keeps_to_grafanas_dashboard_schema() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{e}"));
    assert!(below(&dashboard["schemaVersion"], 65_536));
    assert!(below(&dashboard["graphTooltip"], 3));
    assert!(dashboard["editable"].is_boolean());
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert!(
        dashboard.get("id").is_none_or(Value::is_i64),
        "id: int64 or absent"
    );
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for key in ["name", "datasource", "enable", "iconColor"] {
            assert!(annotation.get(key).is_some(), "annotation without {key}");
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let kind = variable["type"].as_str().unwrap_or_default();
        assert!(VARIABLE_TYPES.contains(&kind), "variable type {kind:?}");
        assert!(variable["name"].is_string());
        assert!(below(&variable["hide"], 3));
    }
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or_default();
        let keys = panel
            .as_object()
            .map(|panel| panel.keys().cloned().collect::<Vec<_>>());
        for key in keys.unwrap_or_default() {
            assert!(
                PANEL_KEYS.contains(&key.as_str()),
                "panel {title:?}: key {key:?}"
            );
        }
        assert!(panel["type"].as_str().is_some_and(|kind| !kind.is_empty()));
        assert!(below(&panel["id"], 1 << 32));
        let grid = &panel["gridPos"];
        assert!(
            below(&grid["x"], 24) && grid["y"].is_u64(),
            "{title:?}: {grid}"
        );
        assert!(grid["w"].as_u64().is_some_and(|w| (1..=24).contains(&w)));
        assert!(grid["h"].as_u64().is_some_and(|h| h > 0));
        for reference in std::iter::once(&panel["datasource"]).chain(
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|target| &target["datasource"]),
        ) {
            let keys = reference
                .as_object()
                .map(|r| r.keys().cloned().collect::<Vec<_>>());
            assert_eq!(keys.unwrap_or_default(), ["type", "uid"], "{title:?}");
        }
        assert!(panel["options"].is_object(), "{title:?}: options");
        let field_config = &panel["fieldConfig"];
        assert!(field_config["defaults"].is_object() && field_config["overrides"].is_array());
        let defaults = &field_config["defaults"];
        for step in defaults["thresholds"]["steps"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(step["color"].is_string(), "{title:?}: {step}");
            assert!(
                step.get("value").is_none_or(Value::is_number),
                "{title:?}: {step}"
            );
        }
        for mapping in defaults["mappings"].as_array().into_iter().flatten() {
            let kind = mapping["type"].as_str().unwrap_or_default();
            assert!(["value", "range", "regex", "special"].contains(&kind));
            assert!(mapping["options"].is_object(), "{title:?}: {mapping}");
        }
    }
}
