//! Where Redis is (one server or a Redis Cluster, from `--redis-url`,
//! `--redis-cluster` and `--redis-ca-file`) and the one reconnecting connection the
//! store shares, which runs a command on either.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, Value};

use super::StoreError;
use crate::config::{Config, redact_url};

/// Where Redis is: one server, or a Redis Cluster.
#[derive(Clone)]
pub enum Backend {
    /// One Redis server (or a proxy in front of several).
    Single(Client),
    /// A Redis Cluster: the cluster client, and one plain client per seed node for the
    /// pub/sub subscription (a `PUBLISH` reaches every node of a cluster, so any node
    /// serves the subscription).
    Cluster(ClusterClient, Vec<Client>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Single(_) => f.write_str("Backend::Single"),
            Backend::Cluster(_, nodes) => write!(f, "Backend::Cluster({} seed nodes)", nodes.len()),
        }
    }
}

impl Backend {
    /// The backend `config` names (`--redis-url`, `--redis-cluster`, `--redis-ca-file`),
    /// without connecting.
    pub fn from_config(config: &Config) -> Result<Self, StoreError> {
        let ca = match &config.redis_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                StoreError::Setup(format!("--redis-ca-file {}: {e}", path.display()))
            })?),
            None => None,
        };
        let client = |url: &str| -> Result<Client, StoreError> {
            let built = match &ca {
                Some(pem) => Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    },
                ),
                None => Client::open(url),
            };
            built.map_err(|e| StoreError::Setup(format!("--redis-url {}: {e}", redact_url(url))))
        };
        let urls = config.redis_urls();
        if !config.is_cluster() {
            let url = urls
                .first()
                .copied()
                .unwrap_or(crate::config::DEFAULT_REDIS_URL);
            return Ok(Backend::Single(client(url)?));
        }
        let nodes = urls
            .iter()
            .map(|url| client(url))
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = ClusterClient::builder(urls.iter().map(|url| (*url).to_owned()))
            .connection_timeout(config.redis_timeout())
            .response_timeout(config.redis_timeout())
            .retries(2);
        if let Some(pem) = &ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        let cluster = builder.build().map_err(|e| {
            StoreError::Setup(format!("--redis-url {}: {e}", config.redacted_redis_url()))
        })?;
        Ok(Backend::Cluster(cluster, nodes))
    }

    /// The plain clients the pub/sub subscriber may connect with, in order of preference.
    pub fn subscriber_clients(&self) -> Vec<Client> {
        match self {
            Backend::Single(client) => vec![client.clone()],
            Backend::Cluster(_, nodes) => nodes.clone(),
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Backend::Cluster(..))
    }
}

/// The shared, reconnecting connection to a [`Backend`]; cheap to clone.
#[derive(Clone)]
pub enum Connection {
    /// One server, through a connection manager that reconnects after failures.
    Single(ConnectionManager),
    /// A cluster connection: routes each command by its key's slot, follows
    /// `MOVED`/`ASK` redirections and reconnects to nodes by itself.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Single(_) => "Connection::Single",
            Connection::Cluster(_) => "Connection::Cluster",
        })
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}
