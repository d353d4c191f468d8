//! A Redis Cluster of real `redis-server` processes on free loopback ports, for the
//! tests of a cluster losing a shard: `primaries` primaries with `replicas` replicas
//! each, made with `redis-cli --cluster create`. A node dies (SIGKILL) when
//! [killed](RedisCluster::kill) or when the cluster is dropped.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Redis, free_port};

/// The cluster's nodes and their ports.
pub struct RedisCluster {
    /// The nodes, `None` once killed; primaries first, as `--cluster create` assigns them.
    nodes: Vec<Option<Redis>>,
    /// Every node's port, in the same order.
    pub ports: Vec<u16>,
    /// The nodes' logs and `nodes.conf` files.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

impl RedisCluster {
    /// Starts the nodes with `args` added (e.g. `--cluster-node-timeout`), creates the
    /// cluster, and waits until every node sees it `ok` and every replica is in sync.
    pub async fn start(primaries: usize, replicas: usize, args: &[&str]) -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-redis-cluster-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
        let dir_arg = dir.path().display().to_string();
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let port = free_port();
            let conf = dir.path().join(format!("nodes-{port}.conf"));
            let conf = conf.display().to_string();
            let mut node_args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--dir",
                &dir_arg,
            ];
            node_args.extend(args);
            nodes.push(Redis::start_with(dir.path(), port, &node_args).await);
        }
        let ports: Vec<u16> = nodes.iter().map(|node| node.port).collect();
        let addrs: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let replicas = replicas.to_string();
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        cli_output(None, &create).unwrap_or_else(|| panic!("redis-cli {create:?} failed"));
        for port in &ports {
            eventually("the cluster is ok", || {
                cli_output(Some(*port), &["CLUSTER", "INFO"])
                    .is_some_and(|out| out.contains("cluster_state:ok"))
            })
            .await;
            eventually("a replica is in sync", || {
                cli_output(Some(*port), &["INFO", "replication"]).is_some_and(|out| {
                    out.contains("role:master") || out.contains("master_link_status:up")
                })
            })
            .await;
        }
        RedisCluster {
            nodes: nodes.into_iter().map(Some).collect(),
            ports,
            _dir: dir,
        }
    }

    /// Every node's URL, comma-separated (the companion's `--redis-url` for a cluster).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let index = self.ports.iter().position(|p| *p == port);
        let index = index.unwrap_or_else(|| panic!("no node on port {port}"));
        if let Some(mut node) = self.nodes[index].take() {
            node.kill();
        }
    }

    /// The port of a node still running.
    pub fn live_port(&self) -> u16 {
        let index = self.nodes.iter().position(Option::is_some);
        self.ports[index.unwrap_or_else(|| panic!("every node was killed"))]
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let out = cli_output(Some(self.live_port()), &["CLUSTER", "KEYSLOT", key]);
        out.and_then(|out| out.trim().parse().ok())
            .unwrap_or_else(|| panic!("no slot for {key}"))
    }

    /// The port of the primary serving `slot` as a live node sees it, and whether that
    /// primary is flagged failed; `None` if no primary serves it.
    pub fn owner_of(&self, slot: u16) -> Option<(u16, bool)> {
        let nodes = cli_output(Some(self.live_port()), &["CLUSTER", "NODES"])?;
        // `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <state> <ranges…>`
        nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields.get(1)?.split('@').next()?;
            let port: u16 = address.rsplit(':').next()?.parse().ok()?;
            let flags = fields.get(2)?;
            let serves = fields.iter().skip(8).any(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                match (first.parse::<u16>(), last.parse::<u16>()) {
                    (Ok(first), Ok(last)) => (first..=last).contains(&slot),
                    _ => false,
                }
            });
            (serves && flags.contains("master")).then(|| (port, flags.contains("fail")))
        })
    }

    /// The port of the primary holding `key`.
    pub fn node_of(&self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        let owner = self.owner_of(slot);
        owner
            .unwrap_or_else(|| panic!("no node holds slot {slot}"))
            .0
    }

    /// Waits until a live primary other than `dead` serves `slot` (its replica was
    /// promoted), for up to `limit`; how long that took from `since`.
    pub async fn wait_for_promotion(
        &self,
        slot: u16,
        dead: u16,
        since: Instant,
        limit: Duration,
    ) -> Duration {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((port, false)) = self.owner_of(slot) {
                if port != dead {
                    return since.elapsed();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over slot {slot}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs `redis-cli [-p <port>] <args>`; its standard output, or `None` if it failed.
fn cli_output(port: Option<u16>, args: &[&str]) -> Option<String> {
    let mut command = Command::new("redis-cli");
    if let Some(port) = port {
        command.args(["-p", &port.to_string()]);
    }
    let output = command.args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls `condition` every 20 ms for up to 20 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
