//! Waiting for another lease holder, collapsed per process and woken by Redis pub/sub.
//!
//! All leases of this process that wait on the same token key share one [`Waits::wait`]:
//! a single loop that looks at the key in Redis (token? lock still held?) and then
//! sleeps until either
//!
//! - the [subscriber](run_subscriber) hears the key's `ready` channel (the holder
//!   committed or aborted, possibly on another companion), or
//! - the re-check interval passes (the safety net for locks that expire without a
//!   message, and for messages lost while the subscription was down).
//!
//! The loop ends with [`WaitOutcome::Ready`] (a usable token is cached) or
//! [`WaitOutcome::LockFree`] (nobody holds the lock: the waiters race to take it), and
//! every waiter gets that outcome. Each waiter applies its own deadline around the
//! shared wait; when the last one gives up, the shared wait is dropped.
//!
//! No wake-up is lost between a look and the sleep after it: the wake-up handle (a
//! [`Notify`]) is registered before the loop's first look, a commit that lands before a
//! look is seen by it, and one that lands after it leaves a permit that ends the sleep
//! at once.

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokengate_core::CachedToken;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::hot::HotTokens;
use crate::stale::StaleTokens;
use crate::store::{self, Store, StoreError};

/// How a shared wait ended.
#[derive(Debug, Clone)]
pub enum WaitOutcome {
    /// A token that answers the wait is cached: hand it out.
    Ready(CachedToken),
    /// Nobody holds the lock any more (the holder aborted or its lock expired).
    LockFree,
}

type WaitResult = Result<WaitOutcome, StoreError>;
type SharedWait = Shared<BoxFuture<'static, WaitResult>>;

/// One key's shared wait.
struct Entry {
    /// Tells this entry apart from a later one for the same key.
    id: u64,
    /// Woken by the subscriber when the key's `ready` channel fires.
    wake: Arc<Notify>,
    /// The wait loop, polled by whichever waiter gets there first.
    wait: SharedWait,
}

/// What a wait waits for: a usable token of the key with this hash tag that expires
/// after the given instant (0 for any usable token).
type WaitKey = (String, u64);

/// The shared waits of this process.
pub struct Waits {
    /// In-progress waits, at most one per key and condition.
    entries: Mutex<HashMap<WaitKey, Entry>>,
    /// Source of entry ids.
    next_id: AtomicU64,
    /// Where the wait loops look.
    store: Store,
    /// Decides whether a cached token is still usable.
    clock: Arc<dyn Clock>,
    /// How often a wait loop looks even without a wake-up.
    recheck: Duration,
}

impl std::fmt::Debug for Waits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waits")
            .field("keys", &self.lock_entries().len())
            .field("recheck", &self.recheck)
            .finish_non_exhaustive()
    }
}

impl Waits {
    /// Creates an empty set of waits.
    pub fn new(store: Store, clock: Arc<dyn Clock>, recheck: Duration) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            store,
            clock,
            recheck,
        })
    }

    /// Waits until the key of `tag` has a usable token expiring after `newer_than_ms`
    /// (0: any usable token; a lease that skips the cache passes the expiry of the token
    /// it skipped, so only a newly fetched one answers it) or a free lock, sharing the
    /// wait with the other waiters of this process. Has no deadline of its own: wrap it.
    pub fn wait(self: &Arc<Self>, tag: &str, newer_than_ms: u64) -> Joined {
        let key: WaitKey = (tag.to_owned(), newer_than_ms);
        let mut entries = self.lock_entries();
        let entry = entries.entry(key.clone()).or_insert_with(|| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let wake = Arc::new(Notify::new());
            let watch = KeyWatch {
                store: self.store.clone(),
                clock: Arc::clone(&self.clock),
                recheck: self.recheck,
                key: key.clone(),
                wake: Arc::clone(&wake),
            };
            let wait = watch.run(Arc::downgrade(self), id).boxed().shared();
            Entry { id, wake, wait }
        });
        Joined {
            wait: entry.wait.clone(),
            id: entry.id,
            key,
            waits: Arc::downgrade(self),
        }
    }

    /// Wakes the waits on the key of `tag`, if any (its holder committed or aborted).
    pub fn wake(&self, tag: &str) {
        for ((entry_tag, _), entry) in self.lock_entries().iter() {
            if entry_tag == tag {
                entry.wake.notify_one();
            }
        }
    }

    /// Wakes every wait (after the subscription was re-established: messages may be lost).
    pub fn wake_all(&self) {
        for entry in self.lock_entries().values() {
            entry.wake.notify_one();
        }
    }

    /// How many shared waits are in progress (one per key and condition).
    pub fn len(&self) -> usize {
        self.lock_entries().len()
    }

    /// Whether no wait is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, key: &WaitKey, id: u64) {
        let mut entries = self.lock_entries();
        if entries.get(key).is_some_and(|entry| entry.id == id) {
            entries.remove(key);
        }
    }

    fn lock_entries(&self) -> MutexGuard<'_, HashMap<WaitKey, Entry>> {
        // The map stays consistent even if a holder panicked: every update is one insert
        // or remove.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What one key's wait loop needs; owned by the loop, so it does not keep [`Waits`] alive.
struct KeyWatch {
    /// Where to look.
    store: Store,
    /// Decides whether the cached token is still usable.
    clock: Arc<dyn Clock>,
    /// How long to sleep between looks without a wake-up.
    recheck: Duration,
    /// The key's hash tag, and the expiry a token must exceed to answer.
    key: WaitKey,
    /// Fired by the subscriber when the key's `ready` channel is published.
    wake: Arc<Notify>,
}

impl KeyWatch {
    /// The loop behind one key's shared wait; leaves `waits` when it ends.
    async fn run(self, waits: Weak<Waits>, id: u64) -> WaitResult {
        let result = loop {
            let (tag, newer_than_ms) = (&self.key.0, self.key.1);
            match self.store.peek(tag).await {
                Err(e) => break Err(e),
                Ok(peek) => {
                    let now_ms = self.clock.now_ms();
                    let answers = |t: &CachedToken| {
                        store::is_usable(t, now_ms) && t.expires_at_ms > newer_than_ms
                    };
                    if let Some(token) = peek.token.filter(answers) {
                        break Ok(WaitOutcome::Ready(token));
                    }
                    if !peek.lock_held {
                        break Ok(WaitOutcome::LockFree);
                    }
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.recheck) => {}
            }
        };
        // Leave the map before answering, so a lease arriving from now on starts a fresh
        // wait instead of reading this (soon stale) outcome.
        if let Some(waits) = waits.upgrade() {
            waits.remove(&self.key, id);
        }
        result
    }
}

/// A waiter's share of a key's wait. Dropping the last share drops the wait.
pub struct Joined {
    /// This waiter's handle on the shared loop.
    wait: SharedWait,
    /// Which entry this share belongs to, to clean up only that one.
    id: u64,
    /// The entry's key in the map.
    key: WaitKey,
    /// The set to clean up on drop.
    waits: Weak<Waits>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish()
    }
}

impl Future for Joined {
    type Output = WaitResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<WaitResult> {
        Pin::new(&mut self.wait).poll(cx)
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let Some(waits) = self.waits.upgrade() else {
            return;
        };
        let mut entries = waits.lock_entries();
        // The map holds one share and this waiter another: if those are all, this was the
        // last waiter and the loop would run for nobody. (`None`: the loop finished and
        // already removed itself.)
        let last = entries
            .get(&self.key)
            .is_some_and(|entry| entry.id == self.id && self.wait.strong_count() == Some(2));
        if last {
            entries.remove(&self.key);
        }
    }
}

/// Keeps one `PSUBSCRIBE tokengate:*:ready` open and turns its messages into wake-ups.
///
/// `clients` are tried in turn: one for a single Redis; a Redis Cluster's seed nodes,
/// any of which serves (a cluster delivers every `PUBLISH` to subscribers on all its
/// nodes), so the subscription moves to another node when one fails.
/// Reconnects with backoff when the connection fails; after each (re)subscription it
/// wakes every wait, since messages sent while it was down are lost. A ping every
/// `keepalive` detects a connection that died silently. Each message also drops the
/// key's copy in `hot`, which is only used while the subscription is up, and an
/// invalidation's message the key's token in `stale`. Runs until its task is aborted.
pub async fn run_subscriber(
    clients: Vec<redis::Client>,
    waits: Arc<Waits>,
    hot: Arc<HotTokens>,
    stale: Arc<StaleTokens>,
    timeout: Duration,
    keepalive: Duration,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let Some(first) = clients.first().cloned() else {
        tracing::warn!("no Redis node to subscribe to; waiters rely on re-checking");
        return;
    };
    let mut backoff = MIN_BACKOFF;
    let mut failures: u32 = 0;
    let mut next = 0_usize;
    loop {
        let client = clients.get(next % clients.len()).unwrap_or(&first);
        next = next.wrapping_add(1);
        match subscribe(client, timeout).await {
            Ok(pubsub) => {
                tracing::info!(
                    pattern = store::READY_PATTERN,
                    "subscribed to commit notifications"
                );
                backoff = MIN_BACKOFF;
                failures = 0;
                // Stay on the node that works for the next attempt.
                next = next.wrapping_sub(1);
                hot.set_live(true);
                waits.wake_all();
                let reason = pump(pubsub, &waits, &hot, &stale, timeout, keepalive).await;
                hot.set_live(false);
                tracing::warn!(
                    reason,
                    "commit notifications lost; waiters fall back to re-checking until resubscribed"
                );
            }
            Err(e) => {
                failures += 1;
                // Say it once loudly, then quietly: Redis being down is also reported by
                // every request that needs it.
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot subscribe to commit notifications; retrying");
                } else {
                    tracing::debug!(error = %e, failures, "still cannot subscribe to commit notifications");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(
    client: &redis::Client,
    timeout: Duration,
) -> Result<redis::aio::PubSub, StoreError> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(store::READY_PATTERN).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// Forwards messages until the connection ends; returns why it ended.
async fn pump(
    pubsub: redis::aio::PubSub,
    waits: &Waits,
    hot: &HotTokens,
    stale: &StaleTokens,
    timeout: Duration,
    keepalive: Duration,
) -> &'static str {
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(keepalive);
    ping.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(message) => match store::tag_of_ready_channel(message.get_channel_name()) {
                    Some(tag) => {
                        hot.forget(tag);
                        if message.get_payload_bytes() == store::INVALIDATED_MESSAGE.as_bytes() {
                            stale.forget(tag);
                        }
                        waits.wake(tag);
                    }
                    None => tracing::debug!(channel = message.get_channel_name(), "ignoring message on unexpected channel"),
                },
                None => return "connection closed",
            },
            _ = ping.tick() => {
                // Any answer will do: in subscribed mode Redis answers PING with the array
                // `["pong", ""]`, not `+PONG`, so a typed answer would fail every ping.
                match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return "ping failed",
                    Err(_) => return "ping timed out",
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::Acquire;
    use std::io::{Read, Write};
    use std::process::{Child, Command, Stdio};
    use tokengate_core::SecretString;
    use tokengate_core::lease::LeaseId;

    const TAG: &str = "genesys:acme";

    /// A private redis-server, killed on drop.
    struct Redis(Child);

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_redis() -> (Redis, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let redis = Redis(child);
        for _ in 0..500 {
            let pong = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                let mut reply = [0u8; 7];
                s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut reply).is_ok()
                    && &reply == b"+PONG\r\n"
            });
            if pong {
                return (redis, port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not answer PING");
    }

    /// A store whose lock for [`TAG`] is held by `holder`, and waits re-checking rarely.
    async fn held(holder: &LeaseId) -> (Redis, Store, Arc<Waits>) {
        let (redis, port) = start_redis();
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let health = Arc::new(crate::health::Health::new(3, Default::default()));
        let backend = store::Backend::Single(client);
        let codec = crate::codec::Codec::Plain;
        let store = Store::new(&backend, Duration::from_secs(1), 10_000, health, codec).unwrap();
        assert_eq!(
            store.acquire(TAG, holder, Some(0)).await.unwrap(),
            Acquire::Locked
        );
        let waits = Waits::new(
            store.clone(),
            Arc::new(SystemClock),
            Duration::from_secs(30),
        );
        (redis, store, waits)
    }

    #[tokio::test]
    async fn the_subscription_outlives_its_keepalive_pings() {
        let (_redis, port) = start_redis();
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let health = Arc::new(crate::health::Health::new(3, Default::default()));
        let backend = store::Backend::Single(client.clone());
        let codec = crate::codec::Codec::Plain;
        let store = Store::new(&backend, Duration::from_secs(1), 10_000, health, codec).unwrap();
        let waits = Waits::new(store, Arc::new(SystemClock), Duration::from_secs(30));
        let hot = Arc::new(HotTokens::new(Arc::new(SystemClock)));
        let keepalive = Duration::from_millis(20);
        let subscriber = tokio::spawn(run_subscriber(
            vec![client],
            waits,
            Arc::clone(&hot),
            Arc::new(StaleTokens::new(Arc::new(SystemClock))),
            Duration::from_secs(1),
            keepalive,
        ));
        // Every change of the subscription's state moves the generation: 1 once it is up.
        for _ in 0..500 {
            if hot.generation() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let up = hot.generation();
        assert_eq!(up, 1, "the subscription did not come up");
        tokio::time::sleep(keepalive * 15).await;
        assert_eq!(
            hot.generation(),
            up,
            "the subscription was dropped and made again: a keepalive ping failed"
        );
        subscriber.abort();
    }

    async fn still_waiting(joined: &mut Joined) -> bool {
        tokio::time::timeout(Duration::from_millis(50), joined)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn waiters_share_one_wait_which_the_last_to_leave_removes() {
        let (_redis, _store, waits) = held(&LeaseId("holder".into())).await;
        let mut first = waits.wait(TAG, 0);
        let mut second = waits.wait(TAG, 0);
        assert_eq!(waits.len(), 1);
        assert!(still_waiting(&mut first).await && still_waiting(&mut second).await);

        drop(first);
        assert_eq!(waits.len(), 1, "the second waiter still waits");
        drop(second);
        assert!(waits.is_empty(), "nobody waits any more");
    }

    #[tokio::test]
    async fn a_commit_answers_every_waiter_and_ends_the_wait() {
        let holder = LeaseId("holder".into());
        let (_redis, store, waits) = held(&holder).await;
        let mut first = waits.wait(TAG, 0);
        let second = waits.wait(TAG, 0);
        assert!(still_waiting(&mut first).await);

        let token = CachedToken {
            access_token: SecretString::from("tok"),
            expires_at_ms: SystemClock.now_ms() + 60_000,
        };
        store.commit(TAG, &holder, &token).await.unwrap();
        // What the subscriber does when the commit's message arrives.
        waits.wake(TAG);

        for joined in [first, second] {
            match joined.await.unwrap() {
                WaitOutcome::Ready(got) => assert_eq!(got, token),
                other => panic!("expected the token, got {other:?}"),
            }
        }
        assert!(waits.is_empty());
    }

    #[tokio::test]
    async fn a_released_lock_ends_the_wait_as_lock_free() {
        let holder = LeaseId("holder".into());
        let (_redis, store, waits) = held(&holder).await;
        let mut joined = waits.wait(TAG, 0);
        assert!(still_waiting(&mut joined).await);

        assert!(store.release(TAG, &holder).await.unwrap());
        waits.wake(TAG);

        assert!(matches!(joined.await.unwrap(), WaitOutcome::LockFree));
        assert!(waits.is_empty());
    }
}
