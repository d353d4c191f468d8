//! A recording [`Host`] for tests of the worker: a clock the test drives, callouts it
//! records for the test to answer, shared data and wake queues in memory, and every
//! resumed request, reply, stat and log line kept for assertions; and a request's
//! headers for [`crate::ask`] ([`FakeHeaders`]).
//!
//! One [`FakeEnvoy`] holds what the workers of one Envoy share (the clock, shared data,
//! wake-ups, and optionally a keyed store for the gateway cache, as the native build
//! keeps: [`FakeEnvoy::keeping_records_in`]); each worker gets its own [`FakeHost`] on
//! it:
//!
//! ```
//! use tokengate::fake::FakeEnvoy;
//! let envoy = FakeEnvoy::starting_at(1_000);
//! let (mut first, mut second) = (envoy.host(), envoy.host());
//! envoy.advance(5);
//! assert_eq!(first.now(), second.now());
//! ```

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use crate::ask::RequestHeaders;
use crate::host::{Callout, Host, Level, Metric};
use crate::records::LruRecords;
use crate::slots::{KeyedStore, Table};

/// What the workers of one fake Envoy share.
#[derive(Debug, Default)]
struct Shared {
    now_ms: u64,
    /// Shared data: key -> (value, version).
    data: HashMap<String, (Vec<u8>, u32)>,
    /// Wake queues enqueued to, in order, not yet taken by the test.
    woken: Vec<u32>,
    /// Callout ids are unique across the Envoy, like Envoy's.
    next_callout_id: u32,
    /// The gateway cache's write generations, by bucket (absent: 0).
    generations: HashMap<u32, u64>,
}

/// One fake Envoy: its clock and the state its workers share.
#[derive(Debug, Clone, Default)]
pub struct FakeEnvoy {
    shared: Rc<RefCell<Shared>>,
    /// The gateway cache, when the hosts keep it themselves; else slots of shared data.
    records: Option<Rc<LruRecords>>,
}

impl FakeEnvoy {
    /// An Envoy whose clock reads `now_ms`.
    pub fn starting_at(now_ms: u64) -> Self {
        let envoy = Self::default();
        envoy.shared.borrow_mut().now_ms = now_ms;
        envoy
    }

    /// This Envoy with its workers' gateway cache in `records` (the native build's
    /// least-recently-used maps) instead of slot tables over shared data.
    pub fn keeping_records_in(mut self, records: LruRecords) -> Self {
        self.records = Some(Rc::new(records));
        self
    }

    /// A host for one more worker of this Envoy.
    pub fn host(&self) -> FakeHost {
        FakeHost {
            envoy: self.clone(),
            sent: Vec::new(),
            resumed: Vec::new(),
            replies: Vec::new(),
            gone: HashSet::new(),
            refused_clusters: HashSet::new(),
            tick_period_ms: 0,
            stats: HashMap::new(),
            logs: Vec::new(),
            level: Level::Info,
        }
    }

    /// Moves the clock on by `ms`.
    pub fn advance(&self, ms: u64) {
        let mut shared = self.shared.borrow_mut();
        shared.now_ms = shared.now_ms.saturating_add(ms);
    }

    /// The clock's reading.
    pub fn now(&self) -> u64 {
        self.shared.borrow().now_ms
    }

    /// A shared-data value, as a worker would read it.
    pub fn shared_value(&self, key: &str) -> Option<Vec<u8>> {
        self.shared
            .borrow()
            .data
            .get(key)
            .map(|(value, _)| value.clone())
    }

    /// How many keys shared data holds (Envoy never frees one).
    pub fn shared_len(&self) -> usize {
        self.shared.borrow().data.len()
    }

    /// How many records `table` of this Envoy's keyed store holds (`None`: slots of
    /// shared data).
    pub fn keyed_len(&self, table: Table) -> Option<usize> {
        self.records.as_ref().map(|records| records.len(table))
    }

    /// Moves the clock to `now_ms`, if that is later than it reads.
    pub fn advance_to(&self, now_ms: u64) {
        let mut shared = self.shared.borrow_mut();
        shared.now_ms = shared.now_ms.max(now_ms);
    }

    /// The wake queues enqueued to since the last call, in order.
    pub fn take_woken(&self) -> Vec<u32> {
        std::mem::take(&mut self.shared.borrow_mut().woken)
    }
}

/// A callout a worker sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCallout {
    /// The id its answer must carry.
    pub id: u32,
    /// Envoy cluster.
    pub cluster: String,
    /// `GET` or `POST`.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// The other headers.
    pub headers: Vec<(String, String)>,
    /// The body (empty when none).
    pub body: Vec<u8>,
    /// The timeout asked for.
    pub timeout_ms: u64,
}

impl SentCallout {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A paused request the worker resumed with a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// The request.
    pub context_id: u32,
    /// The header set.
    pub header: String,
    /// Its value.
    pub value: String,
}

/// A paused request the worker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request.
    pub context_id: u32,
    /// The status answered.
    pub status: u16,
    /// The JSON body answered.
    pub body: serde_json::Value,
}

/// One worker's host; see the module documentation.
#[derive(Debug)]
pub struct FakeHost {
    envoy: FakeEnvoy,
    /// Callouts sent and not yet taken by the test.
    sent: Vec<SentCallout>,
    /// Requests resumed, in order.
    pub resumed: Vec<Resumed>,
    /// Requests answered, in order.
    pub replies: Vec<Reply>,
    /// Requests that are gone: resuming or answering them fails.
    pub gone: HashSet<u32>,
    /// Clusters whose callouts the host refuses to send.
    pub refused_clusters: HashSet<String>,
    /// The tick period the worker last asked for (0: none).
    pub tick_period_ms: u64,
    stats: HashMap<Metric, u64>,
    /// Log lines written, in order.
    pub logs: Vec<(Level, String)>,
    /// The least severe level this host writes.
    pub level: Level,
}

impl FakeHost {
    /// The clock's reading.
    pub fn now(&self) -> u64 {
        self.envoy.now()
    }

    /// The Envoy this worker belongs to.
    pub fn envoy(&self) -> &FakeEnvoy {
        &self.envoy
    }

    /// The callouts sent since the last call, in order.
    pub fn take_sent(&mut self) -> Vec<SentCallout> {
        std::mem::take(&mut self.sent)
    }

    /// The value of a stat.
    pub fn stat(&self, metric: Metric) -> u64 {
        self.stats.get(&metric).copied().unwrap_or(0)
    }

    /// The lines logged at `level`.
    pub fn logs_at(&self, level: Level) -> Vec<&str> {
        self.logs
            .iter()
            .filter(|(at, _)| *at == level)
            .map(|(_, line)| line.as_str())
            .collect()
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.envoy.now()
    }

    fn keyed_store(&self) -> Option<&dyn KeyedStore> {
        self.envoy
            .records
            .as_deref()
            .map(|records| records as &dyn KeyedStore)
    }

    fn dispatch(&mut self, callout: Callout<'_>) -> Result<u32, String> {
        if self.refused_clusters.contains(callout.cluster) {
            return Err(format!("cluster '{}' refused the call", callout.cluster));
        }
        let id = {
            let mut shared = self.envoy.shared.borrow_mut();
            shared.next_callout_id += 1;
            shared.next_callout_id
        };
        self.sent.push(SentCallout {
            id,
            cluster: callout.cluster.to_owned(),
            method: callout.method.to_owned(),
            path: callout.path.to_owned(),
            authority: callout.authority.to_owned(),
            headers: callout
                .headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            body: callout.body.unwrap_or_default().to_vec(),
            timeout_ms: callout.timeout_ms,
        });
        Ok(id)
    }

    fn cache_generation(&self, bucket: u32) -> Option<u64> {
        // A host keeping the records itself models the native build: no generations.
        if self.envoy.records.is_some() {
            return None;
        }
        let shared = self.envoy.shared.borrow();
        Some(shared.generations.get(&bucket).copied().unwrap_or(0))
    }

    fn bump_cache_generation(&mut self, bucket: u32) {
        let mut shared = self.envoy.shared.borrow_mut();
        let generation = shared.generations.entry(bucket).or_default();
        *generation = generation.wrapping_add(1);
    }

    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        self.envoy.shared_value(key)
    }

    fn shared_set(&mut self, key: &str, value: &[u8]) {
        let mut shared = self.envoy.shared.borrow_mut();
        let entry = shared.data.entry(key.to_owned()).or_default();
        entry.0 = value.to_vec();
        entry.1 = entry.1.wrapping_add(1);
    }

    fn shared_get_versioned(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.envoy.shared.borrow().data.get(key).cloned()
    }

    fn shared_replace(&mut self, key: &str, value: &[u8], version: u32) -> bool {
        let mut shared = self.envoy.shared.borrow_mut();
        match shared.data.get_mut(key) {
            Some(entry) if entry.1 == version => {
                entry.0 = value.to_vec();
                entry.1 = entry.1.wrapping_add(1);
                true
            }
            _ => false,
        }
    }

    fn wake(&mut self, queue: u32) {
        self.envoy.shared.borrow_mut().woken.push(queue);
    }

    fn resume_with_header(&mut self, context_id: u32, header: &str, value: &str) -> bool {
        if self.gone.contains(&context_id) {
            return false;
        }
        self.resumed.push(Resumed {
            context_id,
            header: header.to_owned(),
            value: value.to_owned(),
        });
        true
    }

    fn reply_json(&mut self, context_id: u32, status: u16, body: &[u8]) -> bool {
        if self.gone.contains(&context_id) {
            return false;
        }
        self.replies.push(Reply {
            context_id,
            status,
            body: serde_json::from_slice(body).unwrap_or_default(),
        });
        true
    }

    fn set_tick_period_ms(&mut self, period_ms: u64) {
        self.tick_period_ms = period_ms;
    }

    fn add(&mut self, metric: Metric, amount: u64) {
        *self.stats.entry(metric).or_default() += amount;
    }

    fn log_level(&self) -> Level {
        self.level
    }

    fn log(&mut self, level: Level, message: &str) {
        if level >= self.level {
            self.logs.push((level, message.to_owned()));
        }
    }
}

/// A request's headers as a host hands them to [`crate::ask`]: name-value pairs, and
/// the name of the route Envoy chose, if any.
#[derive(Debug, Default)]
pub struct FakeHeaders {
    pairs: Vec<(&'static str, &'static str)>,
    route: Option<&'static str>,
}

impl FakeHeaders {
    /// A request with these headers, on no named route.
    pub fn new(pairs: Vec<(&'static str, &'static str)>) -> Self {
        Self { pairs, route: None }
    }

    /// These headers on route `route`.
    pub fn on_route(self, route: &'static str) -> Self {
        Self {
            route: Some(route),
            ..self
        }
    }
}

impl RequestHeaders for FakeHeaders {
    fn get(&self, name: &str) -> Option<String> {
        self.values(name).into_iter().next()
    }

    fn values(&self, name: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(header, _)| *header == name)
            .map(|(_, value)| (*value).to_owned())
            .collect()
    }

    fn route_name(&self) -> Option<String> {
        self.route.map(str::to_owned)
    }
}
