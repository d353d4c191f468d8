//! Process setups the scenarios share: the echo upstream process, and a fleet of
//! Envoys (the test harness's, with `envoy/local.yaml.tmpl`), companions and one Redis
//! in front of the stand-ins, like the harness's `Cluster` but with a chosen fixture
//! and upstream.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokengate_tests::harness::{Companion, Envoy, EnvoyUpstreams, FilterBuild, Redis, free_port};
use tokengate_tests::standins::{Fixture, StandIns};

/// The echo upstream, in its own process; killed when dropped.
#[derive(Debug)]
pub struct EchoProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
}

impl EchoProcess {
    /// Starts `tokengate-bench echo` (this binary), pinned to `cpus` when given.
    pub fn start(cpus: Option<&str>) -> Result<EchoProcess, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = match cpus {
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.args(["-c", cpus]).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        let child = command
            .args(["echo", "--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
        let started = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err("the echo upstream did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(EchoProcess { addr, child })
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Envoys.
    pub envoys: usize,
    /// Workers per Envoy.
    pub concurrency: u32,
    /// Companions (Envoy `i` talks to companion `i % companions`).
    pub companions: usize,
    /// The filter configuration of every Envoy.
    pub filter_config: serde_json::Value,
    /// The upstream app.
    pub echo: SocketAddr,
    /// Which build of the filter the Envoys load.
    pub build: FilterBuild,
}

/// Stand-ins, Redis, companions and Envoys; everything stops when dropped.
#[derive(Debug)]
pub struct Fleet {
    /// Envoys (declared first so they stop first).
    pub envoys: Vec<Envoy>,
    /// Companions.
    pub companions: Vec<Companion>,
    /// The one Redis (the soak restarts it).
    pub redis: Redis,
    /// The stand-in Tenant Service and login (and the stand-in echo, unused).
    pub standins: StandIns,
    /// Logs and configs (removed with the fleet).
    pub dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts the stand-ins with `fixture`, Redis, the companions and the Envoys.
    pub async fn start(spec: &FleetSpec, fixture: Fixture) -> Result<Fleet, String> {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-bench-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let standins = StandIns::start(fixture)
            .await
            .map_err(|e| format!("stand-ins: {e}"))?;
        let redis = Redis::start(dir.path()).await;
        let mut companions = Vec::new();
        for _ in 0..spec.companions.max(1) {
            companions.push(Companion::start(dir.path(), &redis.url(), &[]).await);
        }
        let mut envoys = Vec::new();
        for index in 0..spec.envoys {
            let upstreams = EnvoyUpstreams {
                companion_port: companions[index % companions.len()].port,
                tenant_service: standins.tenant_service,
                login: standins.login,
                echo: spec.echo,
                idp: None,
            };
            envoys.push(
                Envoy::start_build(
                    spec.build,
                    dir.path(),
                    &upstreams,
                    &spec.filter_config,
                    spec.concurrency,
                )
                .await,
            );
        }
        Ok(Fleet {
            envoys,
            companions,
            redis,
            standins,
            dir,
        })
    }

    /// The listener address of Envoy `index`.
    pub fn envoy_addr(&self, index: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.envoys[index].port))
    }
}
