//! A Redis Cluster's shards as the health monitor sees them: which primary serves which
//! slot range (`CLUSTER SLOTS`, asked of whichever node answers first), and whether
//! each primary answers a `PING` of its own.
//!
//! The cluster connection of the store routes each key to its shard by itself, and a
//! dead shard only shows there as a failed (or slow) operation. The monitor asks every
//! primary directly instead, on one small connection per node, so the health verdict
//! ([`crate::health`]) knows per slot range which keys Redis can serve right now, and a
//! lease of a key on a dead shard is sent to degraded mode without waiting on Redis.

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, Value};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::StoreError;

/// The number of hash slots of a Redis Cluster.
pub const SLOT_COUNT: u16 = 16_384;

/// The cluster slot of every key under the hash tag `tag` (see
/// [`key_tag`](super::key_tag)): CRC16 (XMODEM) of the tag, modulo [`SLOT_COUNT`], as
/// Redis computes it for a key whose name holds `{tag}`.
pub fn slot_of_tag(tag: &str) -> u16 {
    crc16_xmodem(tag.as_bytes()) % SLOT_COUNT
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

/// One slot range and the primary serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// First slot of the range.
    pub first_slot: u16,
    /// Last slot of the range (inclusive).
    pub last_slot: u16,
    /// The primary, `host:port`.
    pub node: String,
}

impl Shard {
    /// Whether `slot` is in this range.
    pub fn holds(&self, slot: u16) -> bool {
        (self.first_slot..=self.last_slot).contains(&slot)
    }

    /// The range as Redis writes it: `first-last`.
    pub fn slots(&self) -> String {
        format!("{}-{}", self.first_slot, self.last_slot)
    }
}

/// What the monitor learnt of one shard: its range and primary, and whether the
/// primary answered its `PING`.
#[derive(Debug)]
pub struct ShardProbe {
    /// The range and its primary.
    pub shard: Shard,
    /// The `PING`'s outcome.
    pub outcome: Result<(), StoreError>,
}

/// Asks the nodes of a Redis Cluster for its shards and pings every primary, on one
/// multiplexed connection per node, kept between probes and dropped when it fails.
pub struct NodeProber {
    /// A seed node's client: its credentials and TLS settings serve for every node.
    template: Client,
    /// The seed nodes, `host:port`, asked for the shards when no known primary answers.
    seeds: Vec<String>,
    /// Bound on one connect, `CLUSTER SLOTS` or `PING`.
    timeout: Duration,
    /// The open connection to each node, by `host:port`.
    connections: Mutex<HashMap<String, MultiplexedConnection>>,
}

impl std::fmt::Debug for NodeProber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProber")
            .field("seeds", &self.seeds)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl NodeProber {
    /// A prober of the cluster whose seed nodes are `seeds` (their clients), or `None`
    /// without any.
    pub fn new(seeds: &[Client], timeout: Duration) -> Option<Self> {
        let template = seeds.first()?.clone();
        let seeds = seeds
            .iter()
            .filter_map(|client| match client.get_connection_info().addr() {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    Some(format!("{host}:{port}"))
                }
                _ => None,
            })
            .collect();
        Some(Self {
            template,
            seeds,
            timeout,
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// The cluster's shards, asked of the primaries in `known` and the seed nodes at
    /// once (the first answer wins, so a dead node costs no wait), then a `PING` of
    /// every primary, all at once. An error if no node answered `CLUSTER SLOTS`.
    pub async fn probe(&self, known: &[Shard]) -> Result<Vec<ShardProbe>, StoreError> {
        let mut candidates: Vec<String> = known.iter().map(|shard| shard.node.clone()).collect();
        candidates.extend(self.seeds.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|node| seen.insert(node.clone()));
        let asks = candidates
            .iter()
            .map(|node| Box::pin(self.cluster_slots(node)));
        let (shards, _) = futures::future::select_ok(asks).await?;
        let pings = shards.into_iter().map(|shard| async move {
            let outcome = self.ping(&shard.node).await;
            ShardProbe { shard, outcome }
        });
        Ok(futures::future::join_all(pings).await)
    }

    /// `CLUSTER SLOTS` asked of `node`, as shards sorted by first slot.
    async fn cluster_slots(&self, node: &str) -> Result<Vec<Shard>, StoreError> {
        let reply = self
            .query(node, &redis::cmd("CLUSTER").arg("SLOTS").clone())
            .await?;
        let asked_host = node.rsplit_once(':').map_or(node, |(host, _)| host);
        let mut shards = parse_cluster_slots(&reply, asked_host).ok_or_else(|| {
            StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "CLUSTER SLOTS answered an unexpected shape",
            )))
        })?;
        shards.sort_by_key(|shard| shard.first_slot);
        Ok(shards)
    }

    /// `PING` of `node`.
    async fn ping(&self, node: &str) -> Result<(), StoreError> {
        self.query(node, &redis::cmd("PING")).await.map(|_| ())
    }

    /// Runs `cmd` on `node` under the timeout, on its kept connection (made if none);
    /// a connection that failed is dropped, so the next probe makes a new one.
    async fn query(&self, node: &str, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        let attempt = async {
            let mut conn = self.connection(node).await?;
            let result = cmd.query_async::<Value>(&mut conn).await;
            if result.is_err() {
                self.lock_connections().remove(node);
            }
            result.map_err(StoreError::from)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => {
                self.lock_connections().remove(node);
                Err(StoreError::Timeout(self.timeout))
            }
        }
    }

    async fn connection(&self, node: &str) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.lock_connections().get(node) {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self
            .client_for(node)?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.lock_connections()
            .insert(node.to_owned(), conn.clone());
        Ok(conn)
    }

    /// A client of `node` (`host:port`) with the seed nodes' credentials and TLS.
    fn client_for(&self, node: &str) -> Result<Client, StoreError> {
        let unparsable = || StoreError::Setup(format!("cluster node address {node:?}"));
        let (host, port) = node.rsplit_once(':').ok_or_else(unparsable)?;
        let port: u16 = port.parse().map_err(|_| unparsable())?;
        let host = host.to_owned();
        let info = self.template.get_connection_info().clone();
        let addr = match info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        Ok(Client::open(info.set_addr(addr))?)
    }

    fn lock_connections(&self) -> MutexGuard<'_, HashMap<String, MultiplexedConnection>> {
        // Every update is one insert or remove: consistent even after a panic.
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The shards of a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id, ...], replicas...], ...]`.
/// An empty host means the node asked (`asked_host`). `None` if the reply has another shape.
fn parse_cluster_slots(reply: &Value, asked_host: &str) -> Option<Vec<Shard>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(fields) = range else {
                return None;
            };
            let slot = |value: Option<&Value>| match value {
                Some(Value::Int(slot)) => u16::try_from(*slot).ok(),
                _ => None,
            };
            let (first_slot, last_slot) = (slot(fields.first())?, slot(fields.get(1))?);
            let Some(Value::Array(primary)) = fields.get(2) else {
                return None;
            };
            let host = match primary.first()? {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
                Value::SimpleString(text) => text.clone(),
                _ => return None,
            };
            let host = if host.is_empty() || host == "?" {
                asked_host.to_owned()
            } else {
                host
            };
            let Some(Value::Int(port)) = primary.get(1) else {
                return None;
            };
            Some(Shard {
                first_slot,
                last_slot,
                node: format!("{host}:{port}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_own() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of_tag("foo"), 12_182);
        assert_eq!(slot_of_tag("genesys:acme"), slot_of_tag("genesys:acme"));
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    }

    #[test]
    fn cluster_slots_replies_become_shards() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
        ]);
        let shards = parse_cluster_slots(&reply, "10.0.0.9").unwrap();
        assert_eq!(
            shards,
            vec![
                Shard {
                    first_slot: 0,
                    last_slot: 5460,
                    node: "127.0.0.1:7000".into()
                },
                Shard {
                    first_slot: 5461,
                    last_slot: 16383,
                    node: "10.0.0.9:7001".into()
                },
            ]
        );
        assert!(shards[1].holds(16383) && !shards[1].holds(5460));
        assert_eq!(shards[0].slots(), "0-5460");
        assert_eq!(parse_cluster_slots(&Value::Int(1), "h"), None);
    }
}
